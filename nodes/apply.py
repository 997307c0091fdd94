"""Apply Nested Attention (token, λ): install the core's attn2 patch on a clone of an SDXL model.

Each Apply node binds one subject to one prompt (a `SubjectBinding`, shared by all its layers, so its
K~/V~ cache is per subject) and adds it to the `NestedAttentionPatch` of every cross-attention layer.
Chained Apply nodes add their subjects to the same per-layer patch objects of their own clones;
the patch keeps subjects in a canonical order, so the order of the nodes does not matter.
"""

from __future__ import annotations

import math
from typing import Any

import comfy.ldm.modules.attention
import comfy.model_base
import torch

from nested_attention import SDXL_CONTEXT_DIM, unet_context_dim, unet_layers
from nested_attention.patch import NestedAttentionPatch, SubjectBinding

from .tokens import TokenLocation, locate_word
from .wires import CATEGORY, NESTED_SUBJECT, Subject

PROMPT_KEY = "nested_attention_prompt"  # model_options entry: the prompt chained subjects share


class NestedApplyError(ValueError):
    """The model, prompt or subject cannot be combined; the message says what to do."""


def comfy_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, extra_options: dict
) -> torch.Tensor:
    """ComfyUI's own cross-attention, called exactly as CrossAttention.forward calls it."""
    # Looked up at call time: ComfyUI picks the implementation at start-up from its arguments.
    return comfy.ldm.modules.attention.optimized_attention(
        q, k, v, heads, attn_precision=extra_options.get("attn_precision"), transformer_options=extra_options
    )


def check_sdxl(model: Any) -> None:
    """Refuse anything that is not an SDXL UNet with a 2048-wide text context."""
    base = getattr(model, "model", None)
    if not isinstance(base, comfy.model_base.SDXL):
        raise NestedApplyError(
            f"Apply Nested Attention needs an SDXL model, but got {type(base).__name__}. Nested encoders are "
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


def apply_subject(
    model: Any,
    subject: Subject,
    location: TokenLocation,
    lambda_: float = 1.0,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    mask: torch.Tensor | None = None,
) -> Any:
    """A clone of `model` with `subject` bound to the located word in all cross-attention layers."""
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise NestedApplyError(
            f"start_percent {start_percent} and end_percent {end_percent}: expected 0 <= start_percent <= "
            "end_percent <= 1 (the part of sampling the subject is active in)."
        )
    check_sdxl(model)
    layers = unet_layers(model.model.diffusion_model)
    expected = tuple(subject.encoder.config.layers)
    if layers != expected:
        raise NestedApplyError(
            f"encoder {subject.encoder.name} projects for {len(expected)} cross-attention layers "
            f"({expected[0].key}..{expected[-1].key}), but this model has {len(layers)} "
            f"({layers[0].key if layers else None}..{layers[-1].key if layers else None}), or their widths "
            "differ. Use an encoder trained for this model family (SDXL base layout)."
        )

    m = model.clone()
    shared = m.model_options.get(PROMPT_KEY)
    if shared is not None and shared != location.signature:
        raise NestedApplyError(
            "this model already carries a subject bound to a different prompt. Chained Apply Nested "
            "Attention nodes must all be given the same prompt text (connect one text to all of them) and "
            "the last node's CONDITIONING must go to the sampler."
        )
    attn2 = m.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
    taken = {
        p: s.name
        for patch in attn2.values()
        if isinstance(patch, NestedAttentionPatch)
        for s in patch.subjects
        for p in s.positions
    }
    clash = sorted(set(location.positions) & set(taken))
    if clash:
        raise NestedApplyError(
            f"the word at token position(s) {clash} is already bound to {taken[clash[0]]}. Each subject "
            "needs its own word: give this Apply node another token (e.g. 'person' and 'pet' in 'a person "
            "and their pet')."
        )

    sampling = m.get_model_object("model_sampling")
    if mask is not None:
        mask = mask.detach().to("cpu", torch.float32)
        mask = mask[0] if mask.dim() == 3 else mask  # (H, W); one region for every image of the batch
        if mask.dim() != 2:
            raise NestedApplyError(
                f"the mask has shape {tuple(mask.shape)}; expected a MASK (H, W) or (B, H, W)."
            )
    binding = SubjectBinding(
        encoder=subject.encoder.encoder,
        tokens=subject.tokens,
        positions=location.positions,
        prompt_tokens=location.prompt_tokens,
        scale=float(lambda_),
        # The whole schedule is open-ended, so the patch never reads sigma back from the device.
        sigma_start=math.inf if start_percent <= 0.0 else float(sampling.percent_to_sigma(start_percent)),
        sigma_end=float(sampling.percent_to_sigma(end_percent)),
        mask=mask,
        name=f"{subject.name} ('{location.word}')",
    )
    patcher = subject.encoder.patcher
    for index, layer in enumerate(layers):
        existing = attn2.get(layer.key)
        if existing is None:
            patch = NestedAttentionPatch(layer, index, [binding], comfy_attention, [patcher])
        elif isinstance(existing, NestedAttentionPatch):
            patch = existing.with_subject(binding, patcher)
        else:
            raise NestedApplyError(
                f"cross-attention layer {layer.key} of this model is already replaced by another node "
                f"({type(existing).__module__}.{type(existing).__qualname__}). Nested attention cannot share "
                "a layer with it: remove that node from this model's chain, or apply nested attention to a "
                "model without it."
            )
        m.set_model_attn2_replace(patch, *layer.key)
    m.model_options[PROMPT_KEY] = location.signature
    return m


class NestedAttentionApply:
    DESCRIPTION = (
        "Renders one word of the prompt as the subject, with nested attention in all SDXL cross-attention "
        "layers. Returns a patched copy of the model and the prompt's conditioning; chain several for "
        "several subjects."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CONDITIONING")
    RETURN_NAMES = ("model", "conditioning")
    OUTPUT_TOOLTIPS = (
        "A patched copy of the model (the input model is not changed).",
        (
            "The prompt encoded exactly as CLIP Text Encode does; use it (or that of the last chained node) "
            "as the positive conditioning, so that the subject word sits where the patch expects it."
        ),
    )
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (
                    "MODEL",
                    {"tooltip": "An SDXL model. It is not changed; a patched copy is returned."},
                ),
                "clip": (
                    "CLIP",
                    {
                        "tooltip": "The SDXL checkpoint's CLIP: tokenizes the prompt to find the subject "
                        "word, and encodes the prompt."
                    },
                ),
                "subject": (
                    NESTED_SUBJECT,
                    {"tooltip": "From Encode Subject Image(s) (or Load Nested Subject)."},
                ),
                "text": (
                    "STRING",
                    {
                        "multiline": True,
                        "dynamicPrompts": True,
                        "tooltip": "The prompt. It must contain the subject word, e.g. 'a photo of a pet on "
                        "the beach'. ComfyUI's syntax works: (pet:1.2), embedding:name, long prompts.",
                    },
                ),
                "token": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "The subject word in the prompt; empty = the encoder's word (e.g. "
                        "'person', 'pet'). Every occurrence counts. A word of several tokens uses its last "
                        "token.",
                    },
                ),
                "lambda_": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 10.0,
                        "step": 0.05,
                        "display_name": "λ",
                        "tooltip": "Boosts the subject word's attention: 1 = as trained; higher = stronger "
                        "identity, less prompt adherence.",
                    },
                ),
                "start_percent": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.001,
                        "tooltip": "Fraction of sampling after which the subject becomes active.",
                    },
                ),
                "end_percent": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.001,
                        "tooltip": "Fraction of sampling after which the subject stops.",
                    },
                ),
            },
            "optional": {
                "mask": (
                    "MASK",
                    {"tooltip": "Confines the subject to a region of the image (white = subject)."},
                ),
            },
        }

    def apply(
        self,
        model: Any,
        clip: Any,
        subject: Subject,
        text: str,
        token: str = "",
        lambda_: float = 1.0,
        start_percent: float = 0.0,
        end_percent: float = 1.0,
        mask: torch.Tensor | None = None,
    ):
        if clip is None:
            raise RuntimeError(
                "ERROR: clip input is invalid: None\n\nIf the clip is from a checkpoint loader node your "
                "checkpoint does not contain a valid clip or text encoder model."
            )
        check_sdxl(model)
        word = token.strip() or subject.encoder.config.token
        tokens = clip.tokenize(text, return_word_ids=True)
        location = locate_word(clip, tokens, word, text)
        patched = apply_subject(model, subject, location, lambda_, start_percent, end_percent, mask)
        return (patched, clip.encode_from_tokens_scheduled(tokens))
