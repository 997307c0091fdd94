"""Locating the subject word s* in a tokenized prompt.

ComfyUI tokenizes a prompt into 77-token chunks (start token, up to 75 tokens, end/padding) and
concatenates the chunks' encodings, so a position is `chunk * 77 + index`. Its word ids number
weighted segments, not words, so the subject is found by matching the token ids of the word as the
tokenizer encodes it (lower case, end-of-word form) inside each chunk.

Rule for a word that splits into several tokens: the nested value replaces the value of the word's
LAST token. CLIP's text encoder is causal, so the last token of a word is the one whose encoding
has seen the whole word. Every occurrence of the word counts. The tokens ComfyUI inserts at chunk
boundaries (start, end, padding: word id 0) are skipped, so a word it breaks across two chunks is
still found; with `ends_word`, only whole words match ("pet" is not found in "xpet").
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

CHUNK = 77


def token_id(item: Any) -> Any:
    """The id of one tokenizer item: ComfyUI gives (id, weight[, word_id]); embeddings are tensors."""
    return item[0] if isinstance(item, (tuple, list)) else item


def locate_word(
    chunks: Sequence[Sequence[Any]], word: Sequence[int], *, ends_word: Optional[Callable[[int], bool]] = None
) -> tuple[int, ...]:
    """Positions of every occurrence of the token sequence `word` in the chunks, at its last token.

    chunks: per 77-token chunk, the token items (ints, or ComfyUI's (id, weight, word_id) tuples;
        embedding vectors never match; items with word id 0 are ComfyUI's own tokens and are skipped).
    word: the word's token ids without start/end tokens.
    ends_word: optional test of whether a token id closes a word (CLIP BPE: its piece ends in '</w>').
        When given, an occurrence must start a word: the token before it closes one, or is an
        embedding vector, or there is none.
    """
    if not word:
        raise ValueError("the subject word encodes to no tokens")
    word = [int(w) for w in word]
    content = []  # (position, id) of the prompt's own tokens, chunk boundaries removed
    for c, chunk in enumerate(chunks):
        for i, item in enumerate(chunk):
            if not (isinstance(item, (tuple, list)) and len(item) > 2 and item[2] == 0):
                content.append((c * CHUNK + i, token_id(item)))
    positions = []
    for start in range(len(content) - len(word) + 1):
        window = [t for _, t in content[start:start + len(word)]]
        if not all(isinstance(t, int) and t == w for t, w in zip(window, word)):
            continue
        before = content[start - 1][1] if start else None
        if ends_word is None or before is None or not isinstance(before, int) or ends_word(before):
            positions.append(content[start + len(word) - 1][0])
    return tuple(positions)
