"""CLIP vision: the architecture of a ComfyUI CLIP vision model, checked against an encoder's, and loading."""

from __future__ import annotations

import logging
import os
from typing import Any

import comfy.clip_vision
import torch

from nested_attention.encoder import (
    ClipVisionSpec,
    NestedEncoder,
    clip_vision_architecture,
    encode_clip_tokens,
)
from nested_attention.logs import LOG_PREFIX

log = logging.getLogger(__name__)


class NestedEncoderLoadError(ValueError):
    """The encoder or its CLIP vision model cannot be used; the message says what to do."""


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
    """Photos (n, H, W, 3) in [0, 1] -> subject tokens E (n, M, C): `clip_vision_tokens`, then the encoder
    (`nested_attention.encoder.encode_clip_tokens`). Encode Subject Image(s) runs the same two steps (its
    photos in CLIP calls of bounded size, with its progress bar)."""
    return encode_clip_tokens(encoder, clip_vision_tokens(clip_vision, spec, images, crop=crop))


def load_clip_vision(path: str) -> Any:
    """A comfy.clip_vision.ClipVisionModel from a file, with ComfyUI's loader (both file layouts)."""
    clip_vision = comfy.clip_vision.load(path)
    if clip_vision is None:
        raise NestedEncoderLoadError(f"{path} is not a CLIP vision model ComfyUI can load; replace the file.")
    return clip_vision
