"""What travels on the pack's wires. Wire type names carry the pack prefix and never change once shipped."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from comfy_api.latest import io

from nested_attention import NestedEncoder
from nested_attention.weights import weights_fingerprint

NESTED_ENCODER = "NESTED_ENCODER"
NESTED_SUBJECT = "NESTED_SUBJECT"
# The same types for the V3 node schema: `NestedEncoderType.Input(...)`, `NestedSubjectType.Output(...)`.
NestedEncoderType = io.Custom(NESTED_ENCODER)
NestedSubjectType = io.Custom(NESTED_SUBJECT)
CATEGORY = "nested_attention"


@dataclass(eq=False)
class EncoderHandle:
    """A loaded nested encoder, ready for ComfyUI's memory management.

    encoder: the NestedEncoder (Q-Former and per-layer projections).
    patcher: a ModelPatcher around it; the attention patches list it in `models()`, so ComfyUI loads and
        offloads it together with the UNet (low-VRAM mode included).
    clip_vision: the comfy.clip_vision.ClipVisionModel whose tokens the Q-Former reads.
    name: the encoder's file name, for messages.
    fingerprint: identifies these exact weights, so a saved subject is never used with another encoder.
    """

    encoder: NestedEncoder
    patcher: Any
    clip_vision: Any
    name: str

    @functools.cached_property
    def fingerprint(self) -> str:
        """`nested_attention.weights.weights_fingerprint` of the encoder, computed when a subject is first saved
        or loaded with it (hashing every weight takes seconds, which loading the encoder need not wait for)."""
        return weights_fingerprint(self.encoder)

    @property
    def config(self):
        return self.encoder.config


@dataclass(eq=False)
class Subject:
    """One subject: its encoder tokens E (1, n*M, C), CPU float32, and the encoder that made them.

    photos, clip_tokens: what Encode Subject Image(s) read, kept for the attention maps (nodes/maps.py): the n
    photos given to the CLIP vision model (n, H, W, 3), at most 512 pixels on the long side (the model sees
    their centre square when `crop`), and the CLIP tokens the Q-Former read (n, L, width), CPU float32. None
    for a subject loaded from a file.
    """

    tokens: torch.Tensor
    encoder: EncoderHandle
    name: str
    images: int
    photos: torch.Tensor | None = None
    clip_tokens: torch.Tensor | None = None
    crop: bool = True

    def describe(self) -> str:
        return (
            f"{self.name} ({self.images} image{'s' if self.images != 1 else ''}, encoder {self.encoder.name})"
        )


def choice_error(name: str, value: Any, choices: Sequence[str]) -> str | None:
    """What is wrong with a combo input's value, for a node's validate_inputs; None when it is one of the
    choices, or None (a linked value, known only when the node runs)."""
    if value is None or value in choices:
        return None
    return f"{name} is {value!r}; expected one of {', '.join(repr(c) for c in choices)}."


# The pack's own errors: ValueErrors defined in the core, the glue or this pack's modules, each written for the
# user.
_PACK_MODULES = ("nested_attention", "nested_attention_comfy", __name__.split(".")[0])


def names_the_node(display_name: str) -> Callable:
    """Decorate a node's entry method so that the pack's errors raised while it runs start with the node's
    display name ("Apply Nested Attention (token, λ): the word ..."). ComfyUI titles its error dialog with
    the node's class id (NestedAttentionApply); the message is the part the pack writes, so it names the node
    as the user sees it. Other errors (ComfyUI's, torch's) pass unchanged."""

    def decorate(method: Callable) -> Callable:
        @functools.wraps(method)
        def run(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            except ValueError as error:
                ours = type(error).__module__.split(".")[0] in _PACK_MODULES
                if ours and error.args and not str(error.args[0]).startswith(display_name):
                    error.args = (f"{display_name}: {error.args[0]}", *error.args[1:])
                raise

        return run

    return decorate
