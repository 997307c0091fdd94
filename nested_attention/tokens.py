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

import re
from collections.abc import Callable, Sequence
from typing import Any

CHUNK = 77


def token_id(item: Any) -> Any:
    """The id of one tokenizer item: ComfyUI gives (id, weight[, word_id]); embeddings are tensors."""
    return item[0] if isinstance(item, (tuple, list)) else item


def locate_word(
    chunks: Sequence[Sequence[Any]], word: Sequence[int], *, ends_word: Callable[[int], bool] | None = None
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


# ------------------------------------------------------------------------------------------------
# Why a word was not found: hints for the missing-word error, from the prompt's text

# Plurals that adding s / es / ies does not make (both directions are looked up).
IRREGULAR_FORMS = {
    "person": ("people", "persons"), "man": ("men",), "woman": ("women",), "child": ("children",),
    "mouse": ("mice",), "goose": ("geese",), "foot": ("feet",), "tooth": ("teeth",), "wolf": ("wolves",),
    "calf": ("calves",),
}
_LETTERS = re.compile(r"[^\W\d_]+")  # a run of letters, as CLIP's tokenizer splits words (apostrophes apart)
_EMBEDDING = re.compile(r"embedding:([^\s,()\[\]]+)", re.IGNORECASE)


def _forms(word: str) -> set[str]:
    """Other forms of a lower-case word: its plural and singular by the regular English rules, and IRREGULAR_FORMS."""
    forms = {word + "s", word + "es"}
    if word.endswith("y"):
        forms.add(word[:-1] + "ies")
    if word.endswith("ies"):
        forms.add(word[:-3] + "y")
    for suffix in ("es", "s"):
        if word.endswith(suffix) and len(word) > len(suffix) + 1:
            forms.add(word[: -len(suffix)])
    for singular, plurals in IRREGULAR_FORMS.items():
        if word == singular:
            forms.update(plurals)
        elif word in plurals:
            forms.add(singular)
    forms.discard(word)
    return forms


def _unspaced(word: str) -> bool:
    """Whether a word is written in a script that puts no spaces between words (CJK, kana, Thai, ...)."""
    return any(ord(c) >= 0x0E00 and c.isalpha() for c in word)


def word_hints(word: str, prompt: str) -> list[str]:
    """Sentences that say why `word` is not found in `prompt` when the text shows a likely reason.

    - another form of the word is there ("persons" for "person", "Pets'" for "pet"): only the exact word binds;
    - the word is written inside a longer run of letters, in a script without spaces (CJK): CLIP reads the run
      as one word;
    - the word appears only as an embedding name (`embedding:pet`): embeddings are vectors, not words.
    """
    w = word.strip().lower()
    text = prompt.lower()
    runs = _LETTERS.findall(text)
    hints = []
    others = sorted({r for r in runs if r in _forms(w)}, key=runs.index)
    if others:
        shown = " and ".join(repr(o) for o in others)
        hints.append(
            f"The prompt has {shown}, another form of {word!r}: only the exact word is bound. Write {word!r} in "
            f"the prompt, or set the node's token to {others[0]!r}."
        )
    inside = [r for r in runs if w in r and r != w]
    if inside and _unspaced(w):
        hints.append(
            f"{word!r} is written inside {inside[0]!r}: CLIP's tokenizer reads letters with no space between "
            f"them as one word. Put a space before and after {word!r} in the prompt."
        )
    if any(name.lower() == w for name in _EMBEDDING.findall(prompt)):
        hints.append(
            f"{word!r} is only the name of an embedding (embedding:{word}): an embedding stands for vectors, not "
            "for the word. Add the word itself to the prompt."
        )
    return hints
