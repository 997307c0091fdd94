"""Locating the subject word with ComfyUI's CLIP tokenizer: chunks, syntax, multi-token words, errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from nested_attention_comfy.words import SubjectWordError, locate_word, word_token_ids


def locate(pack, clip, text, word):
    return locate_word(clip, clip.tokenize(text, return_word_ids=True), word, text)


def test_position_counts_the_start_token(pack, tiny_clip):
    # 0 <start>, 1 a, 2 photo, 3 of, 4 a, 5 pet
    loc = locate(pack, tiny_clip, "a photo of a pet", "pet")
    assert loc.positions == (5,) and loc.prompt_tokens == 77 and loc.stream == "g"


def test_comfy_prompt_syntax_weights_punctuation_and_case_keep_working(pack, tiny_clip):
    plain = locate(pack, tiny_clip, "a photo of a pet", "pet").positions
    assert locate(pack, tiny_clip, "a photo of a (pet:1.2)", "pet").positions == plain
    assert locate(pack, tiny_clip, "a photo of a Pet.", "pet").positions == plain
    assert locate(pack, tiny_clip, "a photo of a PET, outside", "Pet").positions == plain
    assert locate(pack, tiny_clip, "a photo of a ((pet))", "pet").positions == plain


def test_every_occurrence_counts(pack, tiny_clip):
    # 0 <start>, 1 a, 2 pet, 3 and, 4 another, 5 pet
    assert locate(pack, tiny_clip, "a pet and another pet", "pet").positions == (2, 5)


def test_only_whole_words_match(pack, tiny_clip):
    with pytest.raises(SubjectWordError):
        locate(pack, tiny_clip, "two pets on a carpet", "pet")


def test_long_prompt_positions_follow_comfy_77_token_chunks(pack, tiny_clip):
    text = " ".join(["photo"] * 80) + " of a pet"
    tokens = tiny_clip.tokenize(text, return_word_ids=True)
    loc = locate_word(tiny_clip, tokens, "pet", text)
    assert loc.prompt_tokens == 154
    (pos,) = loc.positions
    chunk, index = divmod(pos, 77)
    assert chunk == 1 and tokens["g"][chunk][index][0] == word_token_ids(tiny_clip, "pet")[0]
    [[cond, _]] = tiny_clip.encode_from_tokens_scheduled(tokens)
    assert cond.shape[1] == loc.prompt_tokens


def test_multi_token_word_uses_its_last_token(pack, tiny_clip):
    ids = word_token_ids(tiny_clip, "zephyrine")
    assert len(ids) > 1  # the rule under test needs a word the tokenizer splits
    text = "a photo of zephyrine"
    tokens = tiny_clip.tokenize(text, return_word_ids=True)
    loc = locate_word(tiny_clip, tokens, "zephyrine", text)
    assert loc.positions == (3 + len(ids),)  # <start> a photo of z e p h...: the last piece
    assert tokens["g"][0][loc.positions[0]][0] == ids[-1]


def test_multi_token_word_split_across_chunks_is_found_at_its_last_token(pack, tiny_clip):
    ids = word_token_ids(tiny_clip, "zephyrine")
    # One weighted segment of more than 8 tokens is broken wherever the 77-token chunk ends.
    text = " ".join(["photo"] * (75 - len(ids) + 1)) + " zephyrine"
    tokens = tiny_clip.tokenize(text, return_word_ids=True)
    assert len(tokens["g"]) == 2
    loc = locate_word(tiny_clip, tokens, "zephyrine", text)
    (pos,) = loc.positions
    assert divmod(pos, 77)[0] == 1 and tokens["g"][1][pos - 77][0] == ids[-1]


def test_embeddings_in_the_prompt_shift_positions_and_still_encode(pack, tiny_clip, tmp_path):
    save_file(
        {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, str(tmp_path / "myemb.safetensors")
    )
    tiny_clip.tokenizer.clip_l.embedding_directory = str(tmp_path)
    tiny_clip.tokenizer.clip_g.embedding_directory = str(tmp_path)
    try:
        text = "embedding:myemb a photo of a pet"
        tokens = tiny_clip.tokenize(text, return_word_ids=True)
        loc = locate_word(tiny_clip, tokens, "pet", text)
        assert loc.positions == (5 + 2,)  # two embedding vectors before "a photo of a"
        [[cond, _]] = tiny_clip.encode_from_tokens_scheduled(tokens)
        assert cond.shape == (1, 77, 2048)
    finally:
        tiny_clip.tokenizer.clip_l.embedding_directory = None
        tiny_clip.tokenizer.clip_g.embedding_directory = None


def test_absent_word_is_an_error_naming_the_word_and_the_prompt(pack, tiny_clip):
    with pytest.raises(SubjectWordError) as error:
        locate(pack, tiny_clip, "a photo of a dog", "person")
    assert "'person'" in str(error.value) and "'a photo of a dog'" in str(error.value)


def test_empty_word_is_an_error(pack, tiny_clip):
    with pytest.raises(SubjectWordError, match="empty"):
        locate(pack, tiny_clip, "a photo of a dog", "  ")
