"""Files in the layouts of other projects, built by the tests with their real key names (random values).

Written independently of nested_attention/formats.py: the key names, the SDXL layer numbering and the
safetensors byte layout here are taken from the IP-Adapter sources and the safetensors format description,
not from the code under test.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable

import torch

_ST_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16", torch.float64: "F64"}


def write_safetensors(path, tensors: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                      fill: Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor], metadata=None,
                      truncate: int = 0) -> None:
    """Stream a .safetensors file tensor by tensor: only one tensor is in memory at a time.

    Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, the data.
    `truncate` drops that many bytes from the end (an interrupted download).
    """
    entries, offset = [], 0
    header = {}
    for name, shape, dtype in tensors:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        entries.append((name, shape, dtype))
        offset += size
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    total = 8 + len(blob) + offset
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in entries:
            t = fill(name, shape, dtype).to(dtype).contiguous()
            assert tuple(t.shape) == tuple(shape), name
            f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        if truncate:
            f.truncate(total - truncate)


class RandomPool:
    """Random values for big files without generating each element: tensors are slices of one random pool
    at a per-name random offset, so different tensors differ and every value is random."""

    def __init__(self, seed: int = 0, size: int = 1 << 24):
        g = torch.Generator().manual_seed(seed)
        self.pool = (torch.randn(size * 2, generator=g) * 0.02).to(torch.float16)
        self.size = size
        self.g = g

    def __call__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = torch.Size(shape).numel()
        parts, left = [], n
        while left:
            start = int(torch.randint(0, self.size, (1,), generator=self.g))
            take = min(left, self.size)
            parts.append(self.pool[start:start + take])
            left -= take
        return torch.cat(parts).reshape(shape).to(dtype)


def resampler_keys(prefix: str, *, dim: int, depth: int, inner: int, num_queries: int, clip_dim: int,
                   output_dim: int, ff_mult: int = 4, ff_bias: bool = False, latents_3d: bool = True):
    """IP-Adapter's Resampler state dict (resampler.py): names and shapes."""
    keys = [(f"{prefix}latents", (1, num_queries, dim) if latents_3d else (num_queries, dim)),
            (f"{prefix}proj_in.weight", (dim, clip_dim)), (f"{prefix}proj_in.bias", (dim,))]
    for n in range(depth):
        q = f"{prefix}layers.{n}."
        keys += [(q + "0.norm1.weight", (dim,)), (q + "0.norm1.bias", (dim,)),
                 (q + "0.norm2.weight", (dim,)), (q + "0.norm2.bias", (dim,)),
                 (q + "0.to_q.weight", (inner, dim)), (q + "0.to_kv.weight", (2 * inner, dim)),
                 (q + "0.to_out.weight", (dim, inner)),
                 (q + "1.0.weight", (dim,)), (q + "1.0.bias", (dim,)),
                 (q + "1.1.weight", (dim * ff_mult, dim)), (q + "1.3.weight", (dim, dim * ff_mult))]
        if ff_bias:
            keys += [(q + "1.1.bias", (dim * ff_mult,)), (q + "1.3.bias", (dim,))]
    keys += [(f"{prefix}proj_out.weight", (output_dim, dim)), (f"{prefix}proj_out.bias", (output_dim,)),
             (f"{prefix}norm_out.weight", (output_dim,)), (f"{prefix}norm_out.bias", (output_dim,))]
    return keys


# The 70 cross-attention layers of SDXL and the IP-Adapter key number of each, as docs/ARCHITECTURE.md §4
# ("Other projects' files") states them from the IP-Adapter sources (diffusers attn_processors: down blocks,
# up blocks, mid block; odd = attn2).
def sdxl_ip_adapter_table() -> dict[int, tuple[tuple[str, int, int], int]]:
    """IP-Adapter number -> (ComfyUI attn2 key, width)."""
    table = {}
    numbers = iter(range(1, 8, 2))  # keys 1-7: input 4|5, 2 blocks each, width 640
    for block in (4, 5):
        for index in range(2):
            table[next(numbers)] = (("input", block, index), 640)
    numbers = iter(range(9, 48, 2))  # keys 9-47: input 7|8, 10 blocks each, 1280
    for block in (7, 8):
        for index in range(10):
            table[next(numbers)] = (("input", block, index), 1280)
    numbers = iter(range(49, 108, 2))  # keys 49-107: output 0|1|2, 10 each, 1280
    for block in (0, 1, 2):
        for index in range(10):
            table[next(numbers)] = (("output", block, index), 1280)
    numbers = iter(range(109, 120, 2))  # keys 109-119: output 3|4|5, 2 each, 640
    for block in (3, 4, 5):
        for index in range(2):
            table[next(numbers)] = (("output", block, index), 640)
    numbers = iter(range(121, 140, 2))  # keys 121-139: middle 0, 10 blocks, 1280
    for index in range(10):
        table[next(numbers)] = (("middle", 0, index), 1280)
    return table


def ip_adapter_plus_sdxl_keys():
    """ip-adapter-plus_sdxl_vit-h.safetensors: every name and full-size shape (848 MB in fp16)."""
    keys = resampler_keys("image_proj.", dim=1280, depth=4, inner=1280, num_queries=16, clip_dim=1280,
                          output_dim=2048)
    for number, (_, width) in sorted(sdxl_ip_adapter_table().items()):
        keys += [(f"ip_adapter.{number}.to_k_ip.weight", (width, 2048)),
                 (f"ip_adapter.{number}.to_v_ip.weight", (width, 2048))]
    return keys


def ip_adapter_plus_keys(widths: dict[int, int], *, output_dim: int = 2048, **resampler):
    """IP-Adapter Plus's key names for any UNet: the Resampler (sizes as for `resampler_keys`) under
    `image_proj.`, and `ip_adapter.{n}.to_k_ip.weight` / `.to_v_ip.weight` [width, output_dim] for each
    IP-Adapter number n -> layer width in `widths`."""
    keys = resampler_keys("image_proj.", output_dim=output_dim, **resampler)
    for number, width in sorted(widths.items()):
        keys += [(f"ip_adapter.{number}.to_k_ip.weight", (width, output_dim)),
                 (f"ip_adapter.{number}.to_v_ip.weight", (width, output_dim))]
    return keys


def plausible_values(seed: int) -> Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor]:
    """A `fill` for small files: random values at the scale trained weights have (norm weights near 1,
    matrices scaled by 1/sqrt(fan-in), latents 0.5), so that a model built from them is not degenerate."""
    def fill(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        name_hash = sum(ord(c) * (i + 1) for i, c in enumerate(name))
        g = torch.Generator().manual_seed(seed * 1_000_003 + name_hash)
        values = torch.randn(shape, generator=g)
        if name.endswith("latents"):
            return values * 0.5
        if len(shape) == 1:  # LayerNorm weights and biases, linear biases
            return values * 0.1 + (1.0 if name.endswith(("norm1.weight", "norm2.weight", "1.0.weight",
                                                         "norm_out.weight")) else 0.0)
        return values * shape[-1] ** -0.5
    return fill


# The tiny test UNet's layers in diffusers' terms, written out by hand from its config (transformer depth 1 at
# input 4/5 and output 3/4/5, 2 at input 7/8, output 0/1/2 and the middle block).
TINY_DIFFUSERS_NAMES = {
    ("input", 4, 0): "down_blocks.1.attentions.0.transformer_blocks.0",
    ("input", 5, 0): "down_blocks.1.attentions.1.transformer_blocks.0",
    ("input", 7, 0): "down_blocks.2.attentions.0.transformer_blocks.0",
    ("input", 7, 1): "down_blocks.2.attentions.0.transformer_blocks.1",
    ("input", 8, 0): "down_blocks.2.attentions.1.transformer_blocks.0",
    ("input", 8, 1): "down_blocks.2.attentions.1.transformer_blocks.1",
    ("output", 0, 0): "up_blocks.0.attentions.0.transformer_blocks.0",
    ("output", 0, 1): "up_blocks.0.attentions.0.transformer_blocks.1",
    ("output", 1, 0): "up_blocks.0.attentions.1.transformer_blocks.0",
    ("output", 1, 1): "up_blocks.0.attentions.1.transformer_blocks.1",
    ("output", 2, 0): "up_blocks.0.attentions.2.transformer_blocks.0",
    ("output", 2, 1): "up_blocks.0.attentions.2.transformer_blocks.1",
    ("output", 3, 0): "up_blocks.1.attentions.0.transformer_blocks.0",
    ("output", 4, 0): "up_blocks.1.attentions.1.transformer_blocks.0",
    ("output", 5, 0): "up_blocks.1.attentions.2.transformer_blocks.0",
    ("middle", 0, 0): "mid_block.attentions.0.transformer_blocks.0",
    ("middle", 0, 1): "mid_block.attentions.0.transformer_blocks.1",
}
# ... and their IP-Adapter numbers: down blocks first, then up blocks, then the middle block (odd = attn2).
TINY_IP_ADAPTER_NUMBERS = {
    ("input", 4, 0): 1, ("input", 5, 0): 3, ("input", 7, 0): 5, ("input", 7, 1): 7, ("input", 8, 0): 9,
    ("input", 8, 1): 11, ("output", 0, 0): 13, ("output", 0, 1): 15, ("output", 1, 0): 17, ("output", 1, 1): 19,
    ("output", 2, 0): 21, ("output", 2, 1): 23, ("output", 3, 0): 25, ("output", 4, 0): 27, ("output", 5, 0): 29,
    ("middle", 0, 0): 31, ("middle", 0, 1): 33,
}


def plain_ip_adapter_keys() -> list[tuple[str, tuple[int, ...]]]:
    """The keys that mark a plain (non-Plus) IP-Adapter SDXL file: a linear projection of CLIP's pooled embedding to
    4 tokens (`image_proj.proj`, `image_proj.norm`), no Resampler; plus its first layer's K/V weights."""
    return [("image_proj.proj.weight", (8192, 1280)), ("image_proj.proj.bias", (8192,)),
            ("image_proj.norm.weight", (2048,)), ("image_proj.norm.bias", (2048,)),
            ("ip_adapter.1.to_k_ip.weight", (640, 2048)), ("ip_adapter.1.to_v_ip.weight", (640, 2048))]
