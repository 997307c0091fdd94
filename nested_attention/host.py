"""The ComfyUI glue that the nodes and the trainer share: one copy of everything that needs `comfy`.

The rest of the core package is pure torch and never imports this module (`nested_attention/__init__`
does not, and a test proves the core imports where `comfy` cannot be found). The nodes (`nodes/`) and
the trainer (`training/`) import it as `nested_attention.host`, so both call ComfyUI's attention the
same way, read a CLIP vision tower the same way, bind the subject to the same token of the same
tokenizer stream, and install the same patch: what is trained is what runs.

- Host attention: `comfy_attention`, ComfyUI's `optimized_attention` called as CrossAttention calls it.
- Models: `check_sdxl`, `attn2_patches` and `install_subject` (the per-layer patch install).
- CLIP vision: `clip_vision_spec`, `check_clip_vision`, `load_clip_vision`; photos -> tokens: `clip_vision_tokens`,
  `photo_tokens`.
- The subject word in ComfyUI's tokenizer: `subject_stream`, `word_token_ids`, `word_positions`,
  `locate_word` -> `TokenLocation`. The matching rule itself is the core's `nested_attention.tokens`.
- Per sampling run: `sigma_window`, `add_capture`, `add_auto_regions` (ComfyUI's OUTER_SAMPLE wrapper
  `SamplingRunWrapper` makes each run's `nested_attention.capture.SamplingRun`).

Errors are ValueError subclasses whose messages are written for the person at the graph.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import comfy.clip_vision
import comfy.ldm.modules.attention
import comfy.model_base
import comfy.model_patcher
import comfy.patcher_extension
import torch

from .capture import AUTO_MEASURE, RUN_KEY, AutoRegions, Capture, CaptureSink, SamplingRun, Window, token_grid
from .encoder import ClipVisionSpec, NestedEncoder, clip_vision_architecture, encode_clip_tokens
from .layers import SDXL_CONTEXT_DIM, LayerSpec, unet_context_dim
from .logs import LOG_PREFIX
from .patch import NestedAttentionPatch, SubjectBinding
from .tokens import locate_word as locate_ids
from .tokens import token_id, word_hints

log = logging.getLogger(__name__)


class NestedApplyError(ValueError):
    """The model, prompt or subject cannot be combined; the message says what to do."""


class NestedEncoderLoadError(ValueError):
    """The encoder or its CLIP vision model cannot be used; the message says what to do."""


class SubjectWordError(ValueError):
    """The subject word cannot be used with this prompt; the message names the word and the prompt."""


# ------------------------------------------------------------------------------------------------
# Host attention and the model


def comfy_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, extra_options: dict
) -> torch.Tensor:
    """ComfyUI's own cross-attention, called exactly as CrossAttention.forward calls it."""
    # Looked up at call time: ComfyUI picks the implementation at start-up from its arguments.
    return comfy.ldm.modules.attention.optimized_attention(
        q, k, v, heads, attn_precision=extra_options.get("attn_precision"), transformer_options=extra_options
    )


def check_sdxl(model: Any) -> None:
    """Refuse anything that is not an SDXL UNet (a ModelPatcher's `.model`) with a 2048-wide text context."""
    base = getattr(model, "model", None)
    if not isinstance(base, comfy.model_base.SDXL):
        raise NestedApplyError(
            f"nested attention needs an SDXL model, but got {type(base).__name__}. Nested encoders are "
            "trained for SDXL's cross-attention layers; load an SDXL checkpoint (base or a fine-tune of "
            "it)."
        )
    try:
        width = unet_context_dim(base.diffusion_model)
    except (ValueError, AttributeError) as e:
        raise NestedApplyError(
            f"this {type(base).__name__} model has no cross-attention layers to patch ({e})."
        ) from e
    if width != SDXL_CONTEXT_DIM:
        raise NestedApplyError(
            f"this model's cross-attention reads a text context of width {width}; SDXL's is "
            f"{SDXL_CONTEXT_DIM}. Load an SDXL checkpoint."
        )


def attn2_patches(
    layers: Sequence[LayerSpec],
    bindings: Sequence[SubjectBinding],
    *,
    existing: Mapping[tuple, Any] | None = None,
    models: Sequence[Any] = (),
) -> dict[tuple, NestedAttentionPatch]:
    """Per layer key, the `NestedAttentionPatch` that carries `bindings` with ComfyUI's attention as host.

    layers: the UNet's cross-attention layers in the encoder's order (the index into its projections).
    existing: the model's current attn2 replace patches. A NestedAttentionPatch there gets the bindings
        added (chained subjects, around the same wrapped patch, if any); another pack's patch (IPAdapter_plus,
        InstantID, PuLID) is wrapped as it is: it computes the base and the nested terms are added.
    models: ModelPatchers ComfyUI should load with the UNet (the encoder's), listed by each patch.
    """
    existing = existing or {}
    patches = {}
    for index, layer in enumerate(layers):
        patch = existing.get(layer.key)
        if isinstance(patch, NestedAttentionPatch):  # a chained subject: a new patch, the old one untouched
            patch = patch.with_subjects(bindings, models)
        elif patch is None or callable(patch):
            patch = NestedAttentionPatch(layer, index, list(bindings), comfy_attention, list(models), wrapped=patch)
        else:
            raise NestedApplyError(
                f"cross-attention layer {layer.key} of this model holds a {type(patch).__module__}."
                f"{type(patch).__qualname__} where ComfyUI expects an attn2 patch, something called with "
                "(q, k, v, extra_options). The node that set it is broken; remove it from this model's chain."
            )
        patches[layer.key] = patch
    return patches


def attn2_replacements(model: Any) -> dict:
    """The attn2 replace patches set on a ModelPatcher, by layer key ({} when none)."""
    return model.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})


def install_subject(
    model: Any, binding: SubjectBinding, layers: Sequence[LayerSpec], *, models: Sequence[Any] = ()
) -> None:
    """Add `binding` to every cross-attention layer of `model`, an already-cloned ModelPatcher.

    Another pack's attn2 patch on a layer is wrapped (see `attn2_patches`), never changed.
    """
    for key, patch in attn2_patches(layers, [binding], existing=attn2_replacements(model), models=models).items():
        model.set_model_attn2_replace(patch, *key)
    if binding.auto_region:
        add_auto_regions(model)


# ------------------------------------------------------------------------------------------------
# CLIP vision


def clip_vision_spec(clip_vision: Any, name: str = "") -> ClipVisionSpec:
    """The architecture of a comfy.clip_vision.ClipVisionModel, read from its parameter shapes (no forward;
    `nested_attention.encoder.clip_vision_architecture`, which reads a file's header the same way)."""
    model = getattr(clip_vision, "model", None)
    shapes = {key: p.shape for key, p in model.named_parameters()} if isinstance(model, torch.nn.Module) else {}
    try:
        return clip_vision_architecture(shapes, name, image_size=int(getattr(clip_vision, "image_size", 224)))
    except ValueError:
        raise NestedEncoderLoadError(
            f"the CLIP vision input ({type(getattr(clip_vision, 'model', clip_vision)).__name__}) is not a "
            "CLIP or SigLIP vision transformer; nested encoders read the tokens of a CLIP ViT (e.g. "
            "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors). Connect the CLIP vision model the encoder was "
            "trained with."
        ) from None


def check_clip_vision(expected: ClipVisionSpec, clip_vision: Any, name: str, encoder_name: str) -> None:
    """Refuse a CLIP vision model of another architecture; warn about another file name of the same one."""
    found = clip_vision_spec(clip_vision, name)
    if not expected.same_architecture(found):
        # A connected model comes without its file name (ComfyUI does not keep it).
        given = f"the one given, {name}, is" if name else "the one connected to the clip_vision input is"
        raise NestedEncoderLoadError(
            f"{encoder_name} was trained with the CLIP vision model {expected.describe()}, but {given} "
            f"{found.architecture()}. The encoder cannot read its tokens. Connect the CLIP vision model the "
            f"encoder was trained with (put {expected.name} in models/clip_vision and leave the clip_vision "
            "input unconnected, or load it with a Load CLIP Vision node)."
        )
    if name and expected.name and os.path.basename(name) != os.path.basename(expected.name):
        log.warning(
            "%s %s was trained with %s; the connected CLIP vision model is %s, which has the same "
            "architecture. Results are only as good as the two models are alike.",
            LOG_PREFIX,
            encoder_name,
            expected.name,
            name,
        )


def clip_vision_tokens(
    clip_vision: Any, spec: ClipVisionSpec, images: torch.Tensor, *, crop: bool = True, encoder_name: str = "the encoder"
) -> torch.Tensor:
    """The CLIP tokens an encoder trained on `spec` reads from photos (n, H, W, 3) in [0, 1]: ComfyUI's
    `ClipVisionModel.encode_image(images, crop=crop)` at `spec.hidden_layer` (the last layer for the pack's
    encoders, the penultimate for IP-Adapter) -> (n, L, width), on the model's device and in its dtype.

    Raises NestedEncoderLoadError when the tokens are not of the shape `spec` says.
    """
    out = clip_vision.encode_image(images, crop=crop)[spec.output_key]  # (n, L, width)
    if tuple(out.shape[1:]) != (spec.num_tokens, spec.hidden_size):
        raise NestedEncoderLoadError(
            f"the CLIP vision model gave tokens of shape {tuple(out.shape[1:])}; encoder {encoder_name} "
            f"expects ({spec.num_tokens}, {spec.hidden_size}) from {spec.name}. Load the encoder with "
            "that CLIP vision model."
        )
    return out


@torch.no_grad()
def photo_tokens(
    clip_vision: Any, spec: ClipVisionSpec, encoder: NestedEncoder, images: torch.Tensor, *, crop: bool = True
) -> torch.Tensor:
    """Photos (n, H, W, 3) in [0, 1] -> subject tokens E (n, M, C), CPU float32: `clip_vision_tokens`, then the
    encoder (`nested_attention.encoder.encode_clip_tokens`). Encode Subject Image(s) runs the same two steps
    (one photo per CLIP call, with its progress bar)."""
    return encode_clip_tokens(encoder, clip_vision_tokens(clip_vision, spec, images, crop=crop))


def load_clip_vision(path: str) -> Any:
    """A comfy.clip_vision.ClipVisionModel from a file, with ComfyUI's loader (both file layouts)."""
    clip_vision = comfy.clip_vision.load(path)
    if clip_vision is None:
        raise NestedEncoderLoadError(f"{path} is not a CLIP vision model ComfyUI can load; replace the file.")
    return clip_vision


# ------------------------------------------------------------------------------------------------
# Per sampling run: capture and auto regions
#
# What a run observes lives in a `SamplingRun` made for that run only, never on a patch (patches are shared
# between model clones from ComfyUI 0.14 on). ComfyUI calls a ModelPatcher's OUTER_SAMPLE wrappers once per
# run of the sampler (CFGGuider.sample, which has already copied model_options for the run); ours puts the
# run in transformer_options[RUN_KEY], which reaches every attn2 patch as extra_options[RUN_KEY].

RUN_WRAPPER_CAPTURE = "nested_attention_capture"  # wrapper keys on a ModelPatcher
RUN_WRAPPER_AUTO = "nested_attention_auto_region"


def sigma_window(model: Any, start_percent: float, end_percent: float) -> Window:
    """start/end percent of sampling as a sigma range, with the model's own schedule. From 0, the range is
    open-ended, so that the whole schedule never needs sigma read back from the device."""
    sampling = model.get_model_object("model_sampling")
    return Window(math.inf if start_percent <= 0.0 else float(sampling.percent_to_sigma(start_percent)),
                  float(sampling.percent_to_sigma(end_percent)))


class SamplingRunWrapper:
    """ComfyUI OUTER_SAMPLE wrapper: a fresh SamplingRun for each run of the sampler, for the patches to find.

    capture: (window, sink, sources): observe that part of sampling (with the token weights when `sources`) and
    publish the result to the sink when the run ends. auto: set up `region: auto` for the run. The wrapper holds nothing a run changes; clones of a model
    share it (ModelPatcher.clone copies the wrapper lists, not the wrappers).
    """

    def __init__(self, *, capture: tuple[Window, CaptureSink, bool] | None = None, auto: bool = False):
        self.capture = capture
        self.auto = auto

    def __call__(self, executor: Any, noise: torch.Tensor, latent_image: torch.Tensor, sampler: Any,
                 sigmas: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        guider = executor.class_obj
        saved = guider.model_options
        guider.model_options = comfy.model_patcher.create_model_options_clone(saved)  # this run's alone
        options = guider.model_options.setdefault("transformer_options", {})
        run = options.get(RUN_KEY)  # made by the first of our wrappers in this run
        if run is None:
            run = options[RUN_KEY] = SamplingRun(batch=int(noise.shape[0]), latent=tuple(noise.shape[-2:]))
        if self.auto and run.auto is None:
            steps = int(sigmas.shape[-1]) - 1
            measured = min(steps, max(1, round(AUTO_MEASURE * steps)))  # the first steps, at least one
            run.auto = AutoRegions(float(sigmas[max(0, measured)]), run.batch)
        capture = None
        if self.capture is not None:
            window, _, sources = self.capture
            capture = Capture(window, token_grid(run.latent), run.batch, sources)
            run.captures.append(capture)
        try:
            samples = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            guider.model_options = saved
        if capture is not None:
            regions = None if run.auto is None else run.auto.regions
            self.capture[1].publish(capture.result(run.latent, regions))
        return samples

    def __deepcopy__(self, memo: dict) -> SamplingRunWrapper:
        return self  # holds no per-run state; the sink must stay the capture node's


def add_capture(model: Any, sink: CaptureSink, window: Window | None = None, sources: bool = True) -> None:
    """Observe `window` (default: all) of every sampling run of `model`, an already-cloned ModelPatcher, into
    `sink`; `sources`: also the token weights (the source map), which cost more than nested attention does."""
    window = Window() if window is None else window
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, RUN_WRAPPER_CAPTURE,
                               SamplingRunWrapper(capture=(window, sink, sources)))


def add_auto_regions(model: Any) -> None:
    """Let the subjects bound with `auto_region` find their regions in every sampling run of `model` (an
    already-cloned ModelPatcher); once per model, however many subjects are auto. install_subject calls it."""
    if not model.get_wrappers(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, RUN_WRAPPER_AUTO):
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, RUN_WRAPPER_AUTO,
                                   SamplingRunWrapper(auto=True))


# ------------------------------------------------------------------------------------------------
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
