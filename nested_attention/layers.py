"""The cross-attention layers nested attention patches, named by ComfyUI's attn2 patch keys.

A layer is (block, number, index): ("input", 4, 0) is the first transformer block of the UNet's
fifth input block. An encoder file stores the table it was trained for, and is refused by a model
whose table differs, so a projection can never be applied to the wrong layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

BLOCKS = ("input", "middle", "output")  # ComfyUI's names of the UNet's stages


@dataclass(frozen=True, order=True)
class LayerSpec:
    block: str  # "input", "middle" or "output"
    number: int  # index of the block inside its UNet stage
    index: int  # transformer block inside the SpatialTransformer
    dim: int  # width of the layer's attention (to_k / to_v out_features)

    @property
    def key(self) -> tuple[str, int, int]:
        """The key ComfyUI's `set_model_attn2_replace` registers and looks up."""
        return (self.block, self.number, self.index)

    def to_json(self) -> list:
        return [self.block, self.number, self.index, self.dim]

    @classmethod
    def from_json(cls, item: list) -> LayerSpec:
        """[block, number, index, dim] as `to_json` writes it; anything else raises ValueError."""
        if not isinstance(item, list) or len(item) != 4:
            raise ValueError(f"a layer is [block, number, index, dim], got {item!r}")
        block, number, index, dim = item
        if block not in BLOCKS or not all(type(v) is int for v in (number, index, dim)) or min(number, index) < 0 \
                or dim < 1:
            raise ValueError(f"layer {item!r}: expected a block of {BLOCKS}, two counts >= 0 and a width >= 1")
        return cls(block, number, index, dim)


def _stage(block: str, numbers: Iterable[int], depth: int, dim: int) -> list[LayerSpec]:
    return [LayerSpec(block, n, i, dim) for n in numbers for i in range(depth)]


# SDXL base: 2 transformer blocks at width 640, 10 at width 1280; 70 cross-attention layers.
SDXL_LAYERS: tuple[LayerSpec, ...] = tuple(
    _stage("input", (4, 5), 2, 640)
    + _stage("input", (7, 8), 10, 1280)
    + _stage("middle", (0,), 10, 1280)
    + _stage("output", (0, 1, 2), 10, 1280)
    + _stage("output", (3, 4, 5), 2, 640)
)

SDXL_CONTEXT_DIM = 2048


def attn2_modules(diffusion_model: torch.nn.Module) -> dict[tuple[str, int, int], torch.nn.Module]:
    """The cross-attention (attn2) module of each transformer block of a UNet, keyed as LayerSpec.key.

    Walks the input, middle and output blocks for SpatialTransformer modules (anything with
    `transformer_blocks`) so that tiny test UNets and full SDXL are read the same way. The order is
    the walk's: input blocks, middle block, output blocks, which is the order of `unet_layers`.
    """
    stages = [
        ("input", list(diffusion_model.input_blocks)),
        ("middle", [diffusion_model.middle_block]),
        ("output", list(diffusion_model.output_blocks)),
    ]
    modules = {}
    for block, blocks in stages:
        for number, module in enumerate(blocks):
            for child in module:
                for index, transformer in enumerate(getattr(child, "transformer_blocks", ())):
                    attn2 = getattr(transformer, "attn2", None)
                    if attn2 is not None:
                        modules[(block, number, index)] = attn2
    return modules


def unet_layers(diffusion_model: torch.nn.Module) -> tuple[LayerSpec, ...]:
    """The cross-attention layers of a ComfyUI UNet (`model.diffusion_model`), in `attn2_modules` order."""
    return tuple(
        LayerSpec(*key, attn2.to_k.out_features) for key, attn2 in attn2_modules(diffusion_model).items()
    )


def unet_context_dim(diffusion_model: torch.nn.Module) -> int:
    """Width of the text context the UNet's cross-attention expects (2048 for SDXL)."""
    for module in diffusion_model.modules():
        attn2 = getattr(module, "attn2", None)
        if attn2 is not None:
            return attn2.to_k.in_features
    raise ValueError("this model has no cross-attention layers; nested attention needs an SDXL UNet")
