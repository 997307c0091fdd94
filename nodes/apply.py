"""Apply Nested Attention (token, λ): install the core's attn2 patch on a clone of an SDXL model.

Each Apply node binds one subject to one prompt (a `SubjectBinding`, shared by all its layers, so its
K~/V~ cache is per subject) and adds it to the `NestedAttentionPatch` of every cross-attention layer.
Chained Apply nodes add their subjects to the same per-layer patch objects of their own clones;
the patch keeps subjects in a canonical order, so the order of the nodes does not matter.
"""

from __future__ import annotations

from typing import Any

import torch
from comfy_api.latest import io

from nested_attention import SDXL_CONTEXT_DIM, unet_layers
from nested_attention.patch import NestedAttentionPatch, SubjectBinding
from nested_attention_comfy.model import NestedApplyError, attn2_replacements, check_sdxl, install_subject
from nested_attention_comfy.sampling import sigma_window
from nested_attention_comfy.words import TokenLocation, locate_word

from .wires import CATEGORY, NestedSubjectType, Subject, names_the_node

PROMPT_KEY = "nested_attention_prompt"  # model_options entry: the prompt chained subjects share
REGIONS = ("mask", "auto")  # the Apply node's region choices

__all__ = ["NestedApplyError", "NestedAttentionApply", "apply_subject", "bind_subject", "check_conditioning", "check_sdxl"]


def check_conditioning(conditioning: list, clip: Any) -> None:
    """Refuse a CLIP whose conditioning is not SDXL's 2048 wide (e.g. an SD1.5 CLIP, 768), before sampling.

    Without this the sampler fails deep inside the UNet (`mat1 and mat2 shapes cannot be multiplied`).
    """
    for cond, _ in conditioning:  # [[cond (B, T, width), {"pooled_output": ...}], ...]
        width = int(cond.shape[-1])
        if width != SDXL_CONTEXT_DIM:
            raise NestedApplyError(
                f"the clip input ({type(clip.cond_stage_model).__name__}) encodes the prompt to a "
                f"conditioning {width} wide, but SDXL's cross-attention reads {SDXL_CONTEXT_DIM} (its two "
                "text encoders, CLIP-L 768 + CLIP-G 1280). Connect the CLIP output of the SDXL checkpoint "
                "the model comes from (Load Checkpoint's CLIP), not the CLIP of an SD1.5 or other checkpoint."
            )


def apply_subject(
    model: Any,
    subject: Subject,
    location: TokenLocation,
    lambda_: float = 1.0,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    mask: torch.Tensor | None = None,
    region: str = "mask",
) -> Any:
    """A clone of `model` (an SDXL ModelPatcher: `check_sdxl`) with `subject` bound to the located word in all
    cross-attention layers; see `bind_subject` for the arguments. The Apply node checks the model first (before
    the prompt) and calls bind_subject itself, so the check runs once per Apply."""
    check_sdxl(model)
    return bind_subject(model, subject, location, lambda_, start_percent, end_percent, mask, region)


def check_settings(
    lambda_: float, start_percent: float, end_percent: float, mask: torch.Tensor | None, region: str
) -> None:
    """Refuse an Apply setting out of range, or a mask with region auto (bind_subject's rules)."""
    if region not in REGIONS:
        raise NestedApplyError(f"region is {region!r}; expected one of {', '.join(REGIONS)}.")
    if region == "auto" and mask is not None:
        raise NestedApplyError(
            "region is auto and a mask is connected: auto finds the subject's region itself. Disconnect the "
            "mask, or set region to mask to use it."
        )
    if not lambda_ >= 1.0:
        raise NestedApplyError(
            f"λ is {lambda_}; expected 1 or more. λ multiplies the subject word's positive attention "
            "logits (logit -> max(logit, λ·logit)): 1 is the trained behaviour, higher makes the subject "
            "stronger. A λ below 1 cannot weaken the subject; to weaken it, narrow start_percent / "
            "end_percent or use a mask."
        )
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise NestedApplyError(
            f"start_percent {start_percent} and end_percent {end_percent}: expected 0 <= start_percent <= "
            "end_percent <= 1 (the part of sampling the subject is active in)."
        )


def bind_subject(
    model: Any,
    subject: Subject,
    location: TokenLocation,
    lambda_: float = 1.0,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    mask: torch.Tensor | None = None,
    region: str = "mask",
) -> Any:
    """A clone of `model` with `subject` bound to the located word in all cross-attention layers.

    lambda_ >= 1: under logit[s*] = max(logit, lambda * logit) a lambda below 1 never weakens the subject
    (it would only lift the subject's negative logits), so it is refused rather than misread.
    region: "mask" (the mask, or everywhere without one) or "auto" (found from the word's own attention in
    the first steps of each sampling run, disjoint from the other auto subjects': nested_attention.capture).
    """
    check_settings(lambda_, start_percent, end_percent, mask, region)
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
    attn2 = attn2_replacements(m)
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

    window = sigma_window(m, start_percent, end_percent)
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
        lam=float(lambda_),
        sigma_start=window.sigma_start,
        sigma_end=window.sigma_end,
        mask=mask,
        name=f"{subject.name} ('{location.word}')",
        auto_region=region == "auto",
        source=subject,
    )
    install_subject(m, binding, layers, models=[subject.encoder.patcher])
    m.model_options[PROMPT_KEY] = location.signature
    return m


class NestedAttentionApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NestedAttentionApply",
            display_name="Apply Nested Attention (token, λ)",
            category=CATEGORY,
            description="Renders one word of the prompt as the subject, with nested attention in all SDXL "
            "cross-attention layers. Returns a patched copy of the model and the prompt's conditioning; "
            "chain several for several subjects.",
            inputs=[
                io.Model.Input(
                    "model", tooltip="An SDXL model. It is not changed; a patched copy is returned."
                ),
                io.Clip.Input(
                    "clip",
                    tooltip="The SDXL checkpoint's CLIP: tokenizes the prompt to find the subject word, and "
                    "encodes the prompt.",
                ),
                NestedSubjectType.Input(
                    "subject", tooltip="From Encode Subject Image(s) (or Load Nested Subject)."
                ),
                io.String.Input(
                    "text",
                    multiline=True,
                    dynamic_prompts=True,
                    tooltip="The prompt. It must contain the subject word, e.g. 'a photo of a pet on the "
                    "beach'. ComfyUI's syntax works: (pet:1.2), embedding:name, long prompts.",
                ),
                io.String.Input(
                    "token",
                    default="",
                    tooltip="The subject word in the prompt; empty = the encoder's word (e.g. 'person', "
                    "'pet'). Every occurrence counts. A word of several tokens uses its last token.",
                ),
                # Named "λ": ComfyUI 0.3.75's frontend labels a widget with its input name (an input's
                # display_name is not read), and Python accepts λ as a keyword argument.
                io.Float.Input(
                    "λ",
                    default=1.0,
                    min=1.0,
                    max=10.0,
                    step=0.05,
                    tooltip="Multiplies the subject word's attention logit where it is positive: logit -> "
                    "max(logit, λ·logit), per query and head. 1 = as trained; higher = the subject takes "
                    "more of the attention (stronger identity, less of the prompt). Values below 1 would not "
                    "weaken the subject (they only lift its negative logits), so 1 is the minimum.",
                ),
                io.Float.Input(
                    "start_percent",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="Fraction of sampling after which the subject becomes active.",
                ),
                io.Float.Input(
                    "end_percent",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="Fraction of sampling after which the subject stops.",
                ),
                io.Mask.Input(
                    "mask",
                    optional=True,
                    tooltip="Confines the subject to a region of the image (white = subject).",
                ),
                io.Combo.Input(
                    "region",
                    options=list(REGIONS),
                    default="mask",
                    optional=True,
                    tooltip="mask: the subject acts inside the mask (everywhere without one). auto: the subject's "
                    "region is found from its word's attention in the first steps, and each place goes to one "
                    "subject only: for two people ('a man and a woman') on two Apply nodes set to auto.",
                ),
            ],
            # Output ids must differ from input ids on ComfyUI 0.3.75; workflows know outputs by display_name.
            outputs=[
                io.Model.Output(
                    "patched_model",
                    display_name="model",
                    tooltip="A patched copy of the model (the input model is not changed).",
                ),
                io.Conditioning.Output(
                    "conditioning",
                    display_name="conditioning",
                    tooltip="The prompt encoded exactly as CLIP Text Encode does; use it (or that of the "
                    "last chained node) as the positive conditioning, so that the subject word sits where "
                    "the patch expects it.",
                ),
            ],
        )

    @classmethod
    @names_the_node("Apply Nested Attention (token, λ)")
    def execute(
        cls,
        model: Any,
        clip: Any,
        subject: Subject,
        text: str,
        token: str = "",
        λ: float = 1.0,
        start_percent: float = 0.0,
        end_percent: float = 1.0,
        mask: torch.Tensor | None = None,
        region: str = "mask",
    ) -> io.NodeOutput:
        if clip is None:
            raise RuntimeError(
                "ERROR: clip input is invalid: None\n\nIf the clip is from a checkpoint loader node your "
                "checkpoint does not contain a valid clip or text encoder model."
            )
        check_sdxl(model)
        word = token.strip() or subject.encoder.config.token
        tokens = clip.tokenize(text, return_word_ids=True)
        location = locate_word(clip, tokens, word, text)
        conditioning = clip.encode_from_tokens_scheduled(tokens)
        check_conditioning(conditioning, clip)
        patched = bind_subject(model, subject, location, λ, start_percent, end_percent, mask, region)
        return io.NodeOutput(patched, conditioning)
