"""The subject word in ComfyUI's tokenizer: which stream, its token ids, where it is in a prompt."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nested_attention.logs import LOG_PREFIX
from nested_attention.tokens import locate_word as locate_ids
from nested_attention.tokens import token_id, word_hints

log = logging.getLogger(__name__)


class SubjectWordError(ValueError):
    """The subject word cannot be used with this prompt; the message names the word and the prompt."""


# The subject word in ComfyUI's tokenizer
#
# `clip.tokenize(text, return_word_ids=True)` gives, per text encoder ("g" and "l" for SDXL), a list of
# 77-token chunks of (token, weight, word_id); the conditioning concatenates the chunks, so a token's
# position in the context is `chunk * 77 + index`. ComfyUI's word ids number weighted segments, not
# words, so the word is found by its token ids. The rules (the matching itself is the core's
# `nested_attention.tokens.locate_word`; this adds the word's ids and where words end):
# - The word is matched by its token ids as the tokenizer encodes it on its own (lower case,
#   end-of-word form), so ComfyUI's prompt syntax keeps working: weights `(pet:1.2)`, `embedding:`
#   names (their vectors are skipped), punctuation (`pet.`, `pet,`) and case (`Pet`).
# - It must be a whole word: "pet" does not match "pets" or "carpet".
# - Every occurrence counts.
# - A word that the tokenizer splits into several tokens (or a phrase of several words) occupies the
#   position of its LAST token: CLIP's text encoder is causal, so that is where the whole word has been
#   read. The other tokens of the word keep their ordinary values.
# - Start, end and padding tokens that ComfyUI inserts (word id 0) are never matched; a word that
#   ComfyUI breaks across two chunks is still found, at its last token.
# - The stream searched is chosen by `subject_stream`, in the nodes and in the trainer alike.


# A prompt longer than this many 77-token chunks gets a warning (once per prompt): past it the subject word's
# share of the attention, and so the likeness, has fallen the most (README, "Rules worth knowing").
LONG_PROMPT_CHUNKS = 2
_warned_long_prompts: set[str] = set()


def warn_long_prompt(prompt: str, chunks: int, word: str) -> None:
    """Log once per prompt (per process) that a prompt of `chunks` 77-token chunks weakens the subject."""
    if prompt in _warned_long_prompts:
        return
    if len(_warned_long_prompts) >= 1024:  # a bound on what a long-running server remembers
        _warned_long_prompts.clear()
    _warned_long_prompts.add(prompt)
    log.warning(
        "%s the prompt is %d chunks of 77 tokens (over %d): the subject word %r shares the attention with every "
        "token of every chunk (each chunk brings its own start, end and padding tokens), so the likeness "
        "weakens as the prompt grows, and CLIP reads each chunk on its own. Shorten the prompt to %d chunks "
        "(about %d words or fewer) or raise λ. Prompt: %.120r%s",
        LOG_PREFIX, chunks, LONG_PROMPT_CHUNKS, word, LONG_PROMPT_CHUNKS, LONG_PROMPT_CHUNKS * 75 * 3 // 4,
        prompt, "..." if len(prompt) > 120 else "",
    )


@dataclass(frozen=True)
class TokenLocation:
    word: str  # the subject word as given
    positions: tuple[int, ...]  # context positions of the word's last token, one per occurrence
    prompt_tokens: int  # length of the prompt's token sequence (77 * chunks)
    stream: str  # which tokenizer stream was searched ("g" or "l")
    token_ids: tuple[int, ...]  # the word's token ids
    signature: tuple  # the prompt's content tokens, to compare the prompts of chained nodes


def subject_stream(tokens: Mapping[str, Any]) -> str:
    """The tokenizer stream the subject is located in: SDXL's "g" (CLIP-G), else "l", else the only one.

    Both SDXL streams tokenize the prompt identically (same vocabulary, same chunking), so the choice only
    has to be the same everywhere; this is the one place it is made.
    """
    return "g" if "g" in tokens else "l" if "l" in tokens else next(iter(tokens))


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


def _word_ends(sd_tok: Any) -> Callable[[int], bool]:
    """Whether a token id closes a word: CLIP BPE marks that with '</w>'; special tokens do too."""
    special = set(getattr(sd_tok.tokenizer, "all_special_ids", ()))

    def ends(token: int) -> bool:
        piece = sd_tok.tokenizer.convert_ids_to_tokens(token)
        return token in special or piece is None or piece.endswith("</w>")

    return ends


def word_positions(
    clip: Any, chunks: Sequence[Sequence[Any]], ids: Sequence[int], stream: str
) -> tuple[int, ...]:
    """Positions of the word with token `ids` in one stream's chunks; () when it is absent.

    chunks: `clip.tokenize(..., return_word_ids=True)[stream]`, or a prefix of its chunks.
    """
    return locate_ids(chunks, ids, ends_word=_word_ends(_sd_tokenizer(clip, stream)))


def locate_word(clip: Any, tokens: dict, word: str, prompt: str) -> TokenLocation:
    """Positions of `word` in `tokens` (from `clip.tokenize(prompt, return_word_ids=True)`).

    Raises SubjectWordError, naming the word and the prompt, when the word is empty or absent.
    """
    word = word.strip()
    stream = subject_stream(tokens)
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
    if any(len(item) < 3 for chunk in chunks for item in chunk):
        raise SubjectWordError("the prompt was tokenized without word ids; use return_word_ids=True")
    positions = word_positions(clip, chunks, ids, stream)
    if not positions:
        if not prompt.strip():
            raise SubjectWordError(
                f"the prompt is empty. Nested attention draws the subject where its word is, so the prompt must "
                f"contain the subject word {word!r} (e.g. 'a photo of a {word}')."
            )
        hints = word_hints(word, prompt)
        raise SubjectWordError(
            f"the subject word {word!r} is not in the prompt {prompt!r}. Nested attention replaces that word "
            f"with the subject, so the prompt must contain it as a whole word (e.g. 'a photo of a {word}'); "
            "add it to the prompt or set the node's token to a word the prompt contains."
            + "".join(f"\n{hint}" for hint in hints)
        )
    if len(chunks) > LONG_PROMPT_CHUNKS:
        warn_long_prompt(prompt, len(chunks), word)
    # The prompt's own tokens (word id 0 marks ComfyUI's start/end/padding): what chained nodes compare.
    content = [token_id(item) for chunk in chunks for item in chunk if item[2] != 0]
    signature = tuple(t if isinstance(t, int) else ("embedding", tuple(t.shape)) for t in content)
    prompt_tokens = sum(len(chunk) for chunk in chunks)
    return TokenLocation(word, positions, prompt_tokens, stream, ids, signature)
