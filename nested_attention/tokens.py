"""Locating the subject word s* in a tokenized prompt.

ComfyUI tokenizes a prompt into 77-token chunks (start token, up to 75 tokens, end/padding) and
concatenates the chunks' encodings, so a position is `chunk * 77 + index`. Its word ids number
weighted segments, not words, so the subject is found by matching the token ids of the word as the
tokenizer encodes it (lower case, end-of-word form) inside each chunk.

Rule for a word that splits into several tokens: the nested value replaces the value of the word's
LAST token. CLIP's text encoder is causal, so the last token of a word is the one whose encoding
has seen the whole word. Every occurrence of the word counts.
"""

from __future__ import annotations

from typing import Any, Sequence

CHUNK = 77


def token_id(item: Any) -> Any:
    """The id of one tokenizer item: ComfyUI gives (id, weight[, word_id]); embeddings are tensors."""
    return item[0] if isinstance(item, (tuple, list)) else item


def locate_word(chunks: Sequence[Sequence[Any]], word: Sequence[int]) -> tuple[int, ...]:
    """Positions of every occurrence of the token sequence `word` in the chunks, at its last token.

    chunks: per 77-token chunk, the token items (ints, or ComfyUI's (id, weight, word_id) tuples;
        embedding vectors never match).
    word: the word's token ids without start/end tokens.
    """
    if not word:
        raise ValueError("the subject word encodes to no tokens")
    word = [int(w) for w in word]
    positions = []
    for c, chunk in enumerate(chunks):
        ids = [token_id(item) for item in chunk]
        for i in range(len(ids) - len(word) + 1):
            window = ids[i:i + len(word)]
            if all(isinstance(t, int) and t == w for t, w in zip(window, word)):
                positions.append(c * CHUNK + i + len(word) - 1)
    return tuple(positions)
