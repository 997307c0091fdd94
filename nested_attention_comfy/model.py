"""The model: refuse what is not SDXL, and install a subject's patch on every cross-attention layer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import comfy.model_base

from nested_attention.layers import SDXL_CONTEXT_DIM, LayerSpec, unet_context_dim
from nested_attention.patch import NestedAttentionPatch, SubjectBinding

from .attention import comfy_attention
from .sampling import add_auto_regions


class NestedApplyError(ValueError):
    """The model, prompt or subject cannot be combined; the message says what to do."""


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
