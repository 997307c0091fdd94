"""Prompts users actually write, through the real node path: Apply Nested Attention run as ComfyUI runs it
(pack_helpers.run_node) with the tiny SDXL CLIP's real tokenizer, then ComfyUI's real sampler.

Each prompt either works (the word is bound where the tokenizer put it, the conditioning is CLIP Text
Encode's, the subject changes the sampled image) or gets a clear error saying what to change. The expected
positions are counted by hand from the CLIP BPE pieces shown in each comment (position 0 is ComfyUI's start
token; a chunk is 77 tokens).
"""

from __future__ import annotations

import logging

import pytest
import torch
from pack_helpers import apply
from safetensors.torch import save_file

from nested_attention_comfy.model import attn2_replacements
from nested_attention_comfy.words import LONG_PROMPT_CHUNKS, SubjectWordError


@pytest.fixture
def embeddings(tiny_clip, tmp_path):
    """An embeddings folder for the tiny CLIP holding `myemb` (2 vectors) and `pet` (1 vector)."""
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, str(tmp_path / "myemb.safetensors"))
    save_file({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, str(tmp_path / "pet.safetensors"))
    for tokenizer in (tiny_clip.tokenizer.clip_l, tiny_clip.tokenizer.clip_g):
        tokenizer.embedding_directory = str(tmp_path)
    yield tmp_path
    for tokenizer in (tiny_clip.tokenizer.clip_l, tiny_clip.tokenizer.clip_g):
        tokenizer.embedding_directory = None


def piece(clip, text: str, position: int) -> str:
    """The BPE piece at a context position of the tokenized prompt (stream g)."""
    chunk, index = divmod(position, 77)
    token = clip.tokenize(text)["g"][chunk][index][0]
    return clip.tokenizer.clip_g.tokenizer.convert_ids_to_tokens(int(token))


def assert_works(pack, model, clip, subject, text, positions, last_piece, *, token="", encode, sample):
    """Apply binds the word at `positions` (each the BPE piece `last_piece`), gives CLIP Text Encode's
    conditioning, and the subject changes what ComfyUI's sampler draws."""
    patched, conditioning = apply(pack, model, clip, subject, text, token=token)
    bound = attn2_replacements(patched)[("input", 4, 0)].subjects
    assert [s.positions for s in bound] == [positions], (text, [s.positions for s in bound])
    assert all(piece(clip, text, p) == last_piece for p in positions)
    [[cond, extra]] = conditioning
    [[reference, reference_extra]] = encode(clip, text)
    assert torch.equal(cond, reference) and torch.equal(extra["pooled_output"], reference_extra["pooled_output"])
    negative = encode(clip, "")
    with_subject = sample(patched, conditioning, negative, seed=3, steps=2)
    without = sample(model, conditioning, negative, seed=3, steps=2)
    assert torch.isfinite(with_subject).all() and not torch.equal(with_subject, without), text


@pytest.mark.parametrize(
    "text, positions, last_piece",
    [
        # <start> a photo of a pet 🐶 on the beach 🏖: the emoji are bytes the BPE knows; pet is 5.
        ("a photo of a pet 🐶 on the beach 🏖️", (5,), "pet</w>"),
        # <start> ä¸ Ģ åı ª</w> pet</w> ...: CJK before the word, written with spaces.
        ("一只 pet 在海滩上", (5,), "pet</w>"),
        # The prompt is the word alone.
        ("pet", (1,), "pet</w>"),
        # <start> pet</w>(1.1) ,</w> pet</w> !</w> pet</w>: weights, punctuation, upper case; every occurrence.
        ("(Pet), PET! pet", (1, 3, 5), "pet</w>"),
        # <start> the pet 's toy: the possessive splits off.
        ("the pet's toy", (2,), "pet</w>"),
        # <start> a pet - friendly café.
        ("a pet-friendly café", (2,), "pet</w>"),
    ],
)
def test_prompts_users_write_bind_the_word_and_sample(pack, tiny_unet, tiny_clip, pet, encode, sample, text,
                                                      positions, last_piece):
    assert_works(pack, tiny_unet, tiny_clip, pet, text, positions, last_piece, encode=encode, sample=sample)


def test_the_word_inside_nested_weights_keeps_its_weight(pack, tiny_unet, tiny_clip, person, encode, sample):
    text = "((person:1.2), smiling:0.9)"  # <start> person</w>(1.2) ,</w>(0.9) smiling</w>(0.9)
    assert_works(pack, tiny_unet, tiny_clip, person, text, (1,), "person</w>", encode=encode, sample=sample)
    item = tiny_clip.tokenize(text)["g"][0][1]
    assert item[1] == pytest.approx(1.2)


def test_a_cjk_subject_word_written_with_spaces_binds_at_its_last_piece(pack, tiny_unet, tiny_clip, pet, encode,
                                                                        sample):
    # <start> ä¸ Ģ åı ª</w> å® ł ç ī ©</w> åľ ...: "宠物" is five byte pieces, 5..9; bound at the last.
    assert_works(pack, tiny_unet, tiny_clip, pet, "一只 宠物 在海滩上", (9,), "©</w>", token="宠物",
                 encode=encode, sample=sample)


def test_embedding_names_shift_positions_and_a_missing_one_is_dropped(pack, tiny_unet, tiny_clip, pet, embeddings,
                                                                      encode, sample):
    # <start> [2 vectors of myemb] a photo of a pet: pet at 7. A missing embedding is dropped (ComfyUI warns).
    assert_works(pack, tiny_unet, tiny_clip, pet, "embedding:myemb a photo of a pet", (7,), "pet</w>",
                 encode=encode, sample=sample)
    assert_works(pack, tiny_unet, tiny_clip, pet, "embedding:nosuch a photo of a pet", (5,), "pet</w>",
                 encode=encode, sample=sample)


def long_prompt(chunks: int) -> str:
    """'a photo of a pet' then one-token filler words up to `chunks` chunks of 75, ending '... the pet'."""
    filler = (chunks - 1) * 75 + 40 - 5 - 3  # content tokens between the two phrases
    return "a photo of a pet " + " ".join(["garden"] * filler) + " with the pet"


def test_a_long_prompt_works_and_warns_once(pack, tiny_unet, tiny_clip, pet, encode, sample, caplog):
    text = long_prompt(LONG_PROMPT_CHUNKS + 2)  # 4 chunks
    last = 5 + (LONG_PROMPT_CHUNKS + 1) * 75 + 40 - 5 - 3 + 3  # content index of the second "pet" (1-based)
    chunk, offset = divmod(last - 1, 75)
    with caplog.at_level(logging.WARNING, logger="nested_attention_comfy.words"):
        assert_works(pack, tiny_unet, tiny_clip, pet, text, (5, chunk * 77 + 1 + offset), "pet</w>",
                     encode=encode, sample=sample)
        apply(pack, tiny_unet, tiny_clip, pet, text)  # again (as a second Apply node would): no second warning
        apply(pack, tiny_unet, tiny_clip, pet, long_prompt(LONG_PROMPT_CHUNKS))  # 2 chunks: no warning
    assert len(tiny_clip.tokenize(text)["g"]) == LONG_PROMPT_CHUNKS + 2
    warnings = [r.getMessage() for r in caplog.records if "chunks of 77 tokens" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"is {LONG_PROMPT_CHUNKS + 2} chunks" in warnings[0] and "'pet'" in warnings[0]
    assert "Shorten the prompt" in warnings[0] and "raise λ" in warnings[0]


@pytest.mark.parametrize(
    "text, token, expected",
    [
        ("", "", r"^Apply Nested Attention \(token, λ\): the prompt is empty\. .* subject word 'pet'"),
        ("   ", "", r"^Apply Nested Attention \(token, λ\): the prompt is empty\."),
        ("🐶🐶", "", r"'pet' is not in the prompt '🐶🐶'"),
        ("two Pets' toys", "", r"'pet' is not in .*\nThe prompt has 'pets', another form of 'pet'.*token to 'pets'"),
        ("a photo of two persons", "person", r"\nThe prompt has 'persons', another form of 'person'"),
        ("people on a beach", "person", r"\nThe prompt has 'people', another form of 'person'"),
        ("a puppy", "puppies", r"\nThe prompt has 'puppy', another form of 'puppies'"),
        ("一只宠物在海滩上", "宠物", r"'宠物' is written inside '一只宠物在海滩上'.*Put a space before and after"),
        ("a carpet", "", r"'pet' is not in the prompt 'a carpet'\.[^\n]*$"),  # no hint for another word
    ],
)
def test_a_missing_word_says_why_when_the_prompt_shows_it(pack, tiny_unet, tiny_clip, pet, text, token, expected):
    with pytest.raises(SubjectWordError, match=expected):
        apply(pack, tiny_unet, tiny_clip, pet, text, token=token)


def test_the_word_only_as_an_embedding_name_is_an_error_saying_so(pack, tiny_unet, tiny_clip, pet, embeddings):
    with pytest.raises(SubjectWordError, match=r"'pet' is only the name of an embedding \(embedding:pet\)"):
        apply(pack, tiny_unet, tiny_clip, pet, "embedding:pet in the garden")
