"""CLIP vision: the architecture of a ComfyUI CLIP vision model, checked against an encoder's, and loading."""

from __future__ import annotations

import logging
import os
from typing import Any

import comfy.clip_vision

from nested_attention.encoder import ClipVisionSpec

from . import LOG_PREFIX

log = logging.getLogger(__name__)


class NestedEncoderLoadError(ValueError):
    """The encoder or its CLIP vision model cannot be used; the message says what to do."""


def clip_vision_spec(clip_vision: Any, name: str = "") -> ClipVisionSpec:
    """The architecture of a comfy.clip_vision.ClipVisionModel, read from its module shapes (no forward)."""
    vision = getattr(getattr(clip_vision, "model", None), "vision_model", None)
    embeddings = getattr(vision, "embeddings", None)
    position = getattr(getattr(embeddings, "position_embedding", None), "weight", None)
    layers = getattr(getattr(vision, "encoder", None), "layers", None)
    if position is None or layers is None:
        raise NestedEncoderLoadError(
            f"the CLIP vision input ({type(getattr(clip_vision, 'model', clip_vision)).__name__}) is not a "
            "CLIP or SigLIP vision transformer; nested encoders read the tokens of a CLIP ViT (e.g. "
            "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors). Connect the CLIP vision model the encoder was "
            "trained with."
        )
    num_tokens, hidden = (int(s) for s in position.shape)  # (tokens incl. CLS, width)
    return ClipVisionSpec(
        name=name,
        hidden_size=hidden,
        num_tokens=num_tokens,
        num_layers=len(layers),
        image_size=int(getattr(clip_vision, "image_size", 224)),
    )


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


def load_clip_vision(path: str) -> Any:
    """A comfy.clip_vision.ClipVisionModel from a file, with ComfyUI's loader (both file layouts)."""
    clip_vision = comfy.clip_vision.load(path)
    if clip_vision is None:
        raise NestedEncoderLoadError(f"{path} is not a CLIP vision model ComfyUI can load; replace the file.")
    return clip_vision
