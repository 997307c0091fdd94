"""Two people in one image: one face encoder, two photos, two Apply nodes on two words of one prompt, each
confined to its own region (left and right halves, as the shipped workflow makes them with core mask nodes).

What the math gives (docs/ARCHITECTURE.md §3): a subject's terms vanish where its region weight is 0, and
its λ there is 1, so in the region of one subject a layer's output is exactly that of the model with that
subject alone, at any λ. Through the real sampler the convolutions mix the halves, so there the tests check
only that both subjects act and that the order of the Apply nodes does not matter.
"""

from __future__ import annotations

import pytest
import tiny_models
import torch
from pack_helpers import apply, encode_subject, layer_inputs

from nested_attention_comfy.attention import comfy_attention
from nested_attention_comfy.model import attn2_replacements
from nested_attention_comfy.words import SubjectWordError

PROMPT = "a photo of a man and a woman sitting on a park bench"
H = W = 4  # the grid of the layer inputs below


def halves(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) MASKs (1, size, size): what Solid Mask + Mask Composite + Invert Mask make in the
    shipped workflow."""
    left = torch.zeros(1, size, size)
    left[..., : size // 2] = 1.0
    return left, 1.0 - left


@pytest.fixture
def two_people(pack, load_handle):
    """Two subjects from ONE face encoder (default word 'person'): two photos, two identities."""
    faces = load_handle(seed=2, domain="faces", token="person", num_queries=4)
    return encode_subject(pack, faces, seed=20), encode_subject(pack, faces, seed=21)


def test_one_encoder_binds_two_people_to_two_words_of_one_prompt(pack, tiny_unet, tiny_clip, two_people):
    man, woman = two_people
    left, right = halves()
    first, conditioning = apply(pack, tiny_unet, tiny_clip, man, PROMPT, token="man", mask=left)
    both, conditioning_2 = apply(pack, first, tiny_clip, woman, PROMPT, token="woman", mask=right)
    assert torch.equal(
        conditioning[0][0], conditioning_2[0][0]
    )  # one prompt, encoded once as CLIP Text Encode

    tokens = tiny_clip.tokenize(PROMPT)["g"][0]  # [(token id, weight), ...] of the first 77-token chunk
    word_id = {
        w: tiny_clip.tokenize(w)["g"][0][1][0] for w in ("man", "woman")
    }  # the word alone: [start, w, ...]
    for patch in attn2_replacements(both).values():
        bound = {s.name.split("'")[1]: s.positions for s in patch.subjects}
        assert set(bound) == {"man", "woman"}
        for (
            word,
            positions,
        ) in bound.items():  # each word where the tokenizer put it, once ("woman" is not "man")
            assert [tokens[p][0] for p in positions] == [word_id[word]]
        assert (
            len({s.encoder for s in patch.subjects}) == 1 and len(patch.models()) == 1
        )  # one encoder, loaded once


@pytest.mark.parametrize("lambda_", [1.0, 2.5])
def test_in_each_region_the_layer_output_is_that_of_its_own_subject_alone(
    pack, tiny_unet, tiny_clip, two_people, lambda_
):
    man, woman = two_people
    left, right = halves()
    only_man, _ = apply(pack, tiny_unet, tiny_clip, man, PROMPT, token="man", lambda_=lambda_, mask=left)
    only_woman, _ = apply(
        pack, tiny_unet, tiny_clip, woman, PROMPT, token="woman", lambda_=lambda_, mask=right
    )
    both, _ = apply(pack, only_man, tiny_clip, woman, PROMPT, token="woman", lambda_=lambda_, mask=right)
    for key in [("input", 4, 0), ("middle", 0, 1), ("output", 5, 0)]:
        patch = attn2_replacements(both)[key]
        q, k, v, extra = layer_inputs(patch, h=H, w=W)

        def grid(t):  # (B, N, D) -> (B, h, w, D)
            return t.reshape(2, H, W, -1)

        out = grid(patch(q, k, v, extra))
        man_alone = grid(attn2_replacements(only_man)[key](q, k, v, extra))
        woman_alone = grid(attn2_replacements(only_woman)[key](q, k, v, extra))
        torch.testing.assert_close(out[0, :, : W // 2], man_alone[0, :, : W // 2], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[0, :, W // 2 :], woman_alone[0, :, W // 2 :], rtol=1e-5, atol=1e-6)
        assert (man_alone[0] - woman_alone[0]).abs().amax() > 1e-3  # the two halves really differ
        plain = grid(comfy_attention(q, k, v, extra["n_heads"], extra))
        assert torch.equal(out[1], plain[1])  # the unconditional row: no subject


def test_two_people_sample_together_and_the_order_of_the_apply_nodes_does_not_matter(
    pack, tiny_unet, tiny_clip, two_people, encode
):
    man, woman = two_people
    left, right = halves()
    only_man, positive = apply(pack, tiny_unet, tiny_clip, man, PROMPT, token="man", mask=left)
    only_woman, _ = apply(pack, tiny_unet, tiny_clip, woman, PROMPT, token="woman", mask=right)
    man_then_woman, _ = apply(pack, only_man, tiny_clip, woman, PROMPT, token="woman", mask=right)
    woman_then_man, _ = apply(pack, only_woman, tiny_clip, man, PROMPT, token="man", mask=left)
    negative = encode(tiny_clip, "")

    def sample(model):
        return tiny_models.sample(model, positive, negative, 0, steps=2, size=16)

    both = sample(man_then_woman)
    assert torch.equal(both, sample(woman_then_man))
    scale = both.abs().max()
    for single in (only_man, only_woman):
        assert (both - sample(single)).abs().max() > 1e-3 * scale


def test_a_word_inside_another_word_is_not_that_word(pack, tiny_unet, tiny_clip, two_people):
    man, _ = two_people
    with pytest.raises(SubjectWordError, match="man"):
        apply(pack, tiny_unet, tiny_clip, man, "a photo of a woman sitting on a park bench", token="man")
