"""Subject word location in ComfyUI-style token chunks."""

import pytest
import torch

from nested_attention.tokens import CHUNK, locate_word


def chunk(*ids):
    body = [49406, *ids, 49407]
    return [(t, 1.0, 1) for t in body + [49407] * (CHUNK - len(body))]


def test_every_occurrence_counts_across_chunks():
    chunks = [chunk(1, 2, 7, 3), chunk(7, 5)]
    assert locate_word(chunks, [7]) == (3, CHUNK + 1)


def test_multi_token_word_maps_to_its_last_token():
    assert locate_word([chunk(1, 8, 9, 4, 8, 9)], [8, 9]) == (3, 6)
    assert locate_word([chunk(1, 8, 4, 9)], [8, 9]) == ()


def test_embedding_vectors_never_match():
    c = chunk(1, 7)
    c[1] = (torch.zeros(4), 1.0, 1)
    assert locate_word([c], [1, 7]) == ()
    assert locate_word([c], [7]) == (2,)


def test_plain_ids_are_accepted_and_empty_word_refused():
    assert locate_word([[49406, 5, 6, 49407]], [6]) == (2,)
    with pytest.raises(ValueError):
        locate_word([[1, 2]], [])


def test_word_broken_across_chunks_by_comfy_is_found_at_its_last_token():
    # ComfyUI's own start/end/padding tokens carry word id 0; a long segment is broken wherever a chunk ends.
    first = [(49406, 1.0, 0)] + [(5, 1.0, 1)] * 74 + [(8, 1.0, 1), (49407, 1.0, 0)]
    second = [(49406, 1.0, 0), (9, 1.0, 1), (49407, 1.0, 0)] + [(49407, 1.0, 0)] * (CHUNK - 3)
    assert locate_word([first, second], [8, 9]) == (CHUNK + 1,)


def test_ends_word_keeps_matches_to_whole_words():
    ends = {1, 7}.__contains__  # ids 1 and 7 close a word, id 2 does not (a prefix piece)
    chunks = [chunk(1, 7, 2, 7)]  # "a pet", then "x" + "pet" as one word
    assert locate_word(chunks, [7]) == (2, 4)
    assert locate_word(chunks, [7], ends_word=ends) == (2,)
