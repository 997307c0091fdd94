"""Locate the subject word in a prompt tokenized by ComfyUI's CLIP tokenizer.

The matching itself is the core's `nested_attention.tokens.locate_word`, shared with the trainer so
that both bind the nested value to the same position; this module adds what needs ComfyUI's
tokenizer (the word's ids, where words end) and the messages for the person at the graph.

`clip.tokenize(text, return_word_ids=True)` gives, per text encoder ("g" and "l" for SDXL), a list of
77-token chunks of (token, weight, word_id). The conditioning ComfyUI builds from them concatenates
the chunks, so a token's position in the context is `chunk * 77 + index`.

Rules:
- The word is matched by its token ids as the tokenizer encodes it on its own (lower case,
  end-of-word form), so ComfyUI's prompt syntax keeps working: weights `(pet:1.2)`, `embedding:`
  names (their vectors are skipped), punctuation (`pet.`, `pet,`) and case (`Pet`).
- It must be a whole word: "pet" does not match "pets" or "carpet".
- Every occurrence counts.
- A word that the tokenizer splits into several tokens (or a phrase of several words) occupies the
  position of its LAST token: CLIP's text encoder is causal, so that is where the whole word has been
  read. The other tokens of the word keep their ordinary values.
- Start, end and padding tokens that ComfyUI inserts (word id 0) are never matched; a word that
  ComfyUI breaks across two chunks is still found, at its last token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nested_attention.tokens import locate_word as locate_ids
from nested_attention.tokens import token_id


class SubjectWordError(ValueError):
    """The subject word cannot be used with this prompt; the message names the word and the prompt."""


@dataclass(frozen=True)
class TokenLocation:
    word: str  # the subject word as given
    positions: tuple[int, ...]  # context positions of the word's last token, one per occurrence
    prompt_tokens: int  # length of the prompt's token sequence (77 * chunks)
    stream: str  # which tokenizer stream was searched ("g" or "l")
    token_ids: tuple[int, ...]  # the word's token ids
    signature: tuple  # the prompt's content tokens, to compare the prompts of chained nodes


def _sd_tokenizer(clip: Any, stream: str) -> Any:
    """ComfyUI's per-encoder SDTokenizer ("g" -> clip_g, "l" -> clip_l)."""
    outer = clip.tokenizer
    for name in (f"clip_{stream}", stream):
        inner = getattr(outer, name, None)
        if inner is not None and hasattr(inner, "tokenizer"):
            return inner
    if hasattr(outer, "tokenizer"):  # a single-encoder tokenizer
        return outer
    raise SubjectWordError(
        f"cannot find the '{stream}' tokenizer of this CLIP ({type(outer).__name__}); connect the CLIP of "
        "the SDXL checkpoint the model comes from."
    )


def word_token_ids(clip: Any, word: str, stream: str = "g") -> tuple[int, ...]:
    """The ids of `word` as the stream's tokenizer encodes it (lower case, without start/end tokens)."""
    sd_tok = _sd_tokenizer(clip, stream)
    ids = sd_tok.tokenizer(word.lower())["input_ids"]
    end = -1 if getattr(sd_tok, "tokenizer_adds_end_token", True) else None
    return tuple(int(t) for t in ids[getattr(sd_tok, "tokens_start", 1) : end])


def _word_ends(sd_tok: Any):
    """Whether a token id closes a word: CLIP BPE marks that with '</w>'; special tokens do too."""
    special = set(getattr(sd_tok.tokenizer, "all_special_ids", ()))

    def ends(token: int) -> bool:
        piece = sd_tok.tokenizer.convert_ids_to_tokens(token)
        return token in special or piece is None or piece.endswith("</w>")

    return ends


def locate_word(clip: Any, tokens: dict, word: str, prompt: str) -> TokenLocation:
    """Positions of `word` in `tokens` (from `clip.tokenize(prompt, return_word_ids=True)`).

    Raises SubjectWordError, naming the word and the prompt, when the word is empty or absent.
    """
    word = word.strip()
    stream = "g" if "g" in tokens else "l" if "l" in tokens else next(iter(tokens))
    chunks = tokens[stream]  # 77-token chunks of (token, weight, word_id)
    if not word:
        raise SubjectWordError(
            f"the subject word is empty (prompt: {prompt!r}). Type the word that stands for the subject, "
            "e.g. 'person' or 'pet', or leave it empty only if the encoder file names one."
        )
    ids = word_token_ids(clip, word, stream)
    if not ids:
        raise SubjectWordError(
            f"the subject word {word!r} gives no tokens (prompt: {prompt!r}); use a plain word."
        )
    sd_tok = _sd_tokenizer(clip, stream)
    if any(len(item) < 3 for chunk in chunks for item in chunk):
        raise SubjectWordError("the prompt was tokenized without word ids; use return_word_ids=True")
    positions = locate_ids(chunks, ids, ends_word=_word_ends(sd_tok))
    if not positions:
        raise SubjectWordError(
            f"the subject word {word!r} is not in the prompt {prompt!r}. Nested attention replaces that word "
            f"with the subject, so the prompt must contain it as a whole word (e.g. 'a photo of a {word}'); "
            "add it to the prompt or set the node's token to a word the prompt contains."
        )
    # The prompt's own tokens (word id 0 marks ComfyUI's start/end/padding): what chained nodes compare.
    content = [token_id(item) for chunk in chunks for item in chunk if item[2] != 0]
    signature = tuple(t if isinstance(t, int) else ("embedding", tuple(t.shape)) for t in content)
    prompt_tokens = sum(len(chunk) for chunk in chunks)
    return TokenLocation(word, positions, prompt_tokens, stream, ids, signature)
