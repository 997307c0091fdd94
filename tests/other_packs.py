"""A stand-in for another pack's attn2 patch, following the contract IPAdapter_plus, InstantID and PuLID share.

Written from what those packs do (docs: /work/shared/DESIGN.md 4.9), not from their code. Their patch object is
called `(q, k, v, extra_options)` and returns the plain attention of (q, k, v) plus, for each callback added to
it, that callback's own attention over extra (image) tokens, with its own softmax, on every row: conditional
rows read the conditional tokens, unconditional rows the unconditional ones. Their nodes install per layer key:
a new object where the key is free, else `.add(callback, **kwargs)` on whatever object holds it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from nested_attention import unet_layers
from nested_attention_comfy.model import attn2_replacements


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Their own call of the plain attention, (B, N, D) x (B, T, D) -> (B, N, D), torch's fused kernel."""
    b, n, d = q.shape
    qh, kh, vh = (t.reshape(b, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))  # (B, h, ., d)
    return F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(b, n, d)


def row_tokens(extra_options: dict, batch: int, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """(B, T_ip, C): each row's image tokens, by ComfyUI's chunk flags (0 conditional, 1 unconditional)."""
    flags = extra_options.get("cond_or_uncond") or [0]
    chunk = batch // len(flags)
    return torch.cat([(cond, uncond)[f].expand(chunk, -1, -1) for f in flags])


def image_attention(q: torch.Tensor, extra_options: dict, *, cond: torch.Tensor, uncond: torch.Tensor,
                    to_k: torch.Tensor, to_v: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """One callback's own term X: weight * softmax(q K_ip^T / sqrt(d)) V_ip per head, on every row."""
    tokens = row_tokens(extra_options, q.shape[0], cond, uncond).to(q.dtype)
    k_ip, v_ip = F.linear(tokens, to_k.to(q.dtype)), F.linear(tokens, to_v.to(q.dtype))
    return weight * plain_attention(q, k_ip, v_ip, extra_options["n_heads"])


class OtherPackPatch:
    """The other packs' patch object: callbacks added in order, each adding its own term to the plain attention."""

    def __init__(self, callback: Callable = image_attention, **kwargs: Any):
        self.callbacks = [callback]
        self.kwargs = [kwargs]

    def add(self, callback: Callable, **kwargs: Any) -> None:
        self.callbacks.append(callback)
        self.kwargs.append(kwargs)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        out = plain_attention(q, k, v, extra_options["n_heads"])
        for callback, kwargs in zip(self.callbacks, self.kwargs):
            out = out + callback(q, extra_options, **kwargs)
        return out

    def to(self, device: Any, *args: Any, **kwargs: Any) -> OtherPackPatch:
        return self  # as theirs: what they hold stays where they put it


def install_like_other_packs(model: Any, key: tuple, callback: Callable = image_attention, **kwargs: Any) -> None:
    """What their nodes do for one layer key of an already-cloned model."""
    patches = attn2_replacements(model)
    if key in patches:
        patches[key].add(callback, **kwargs)
    else:
        model.set_model_attn2_replace(OtherPackPatch(callback, **kwargs), *key)


def with_other_pack(model: Any, seed: int = 0) -> Any:
    """A clone of `model` with the stand-in on every cross-attention layer, installed as their nodes install it."""
    m = model.clone()
    for i, layer in enumerate(unet_layers(m.model.diffusion_model)):
        install_like_other_packs(m, layer.key, **image_kwargs(layer.dim, tokens=4, weight=2.0, seed=seed + i))
    return m


def image_kwargs(dim: int, *, context: int = 2048, tokens: int = 4, weight: float = 1.0, seed: int = 0) -> dict:
    """Seeded callback arguments for a layer of width `dim`: cond/uncond tokens and to_k/to_v of the layer."""
    g = torch.Generator().manual_seed(seed)
    cond, uncond = torch.randn(1, tokens, context, generator=g), torch.randn(1, tokens, context, generator=g)
    scale = 1 / math.sqrt(context)
    to_k, to_v = (torch.randn(dim, context, generator=g) * scale for _ in range(2))
    return {"cond": cond, "uncond": uncond, "to_k": to_k, "to_v": to_v, "weight": weight}


def reference_their_term(q: torch.Tensor, extra_options: dict, kwargs_list: Sequence[dict]) -> torch.Tensor:
    """X of every callback summed, in float64, with an explicit softmax (independent of the stand-in's kernel)."""
    q = q.double()
    b, _, d = q.shape
    heads = extra_options["n_heads"]
    dh = d // heads
    total = torch.zeros_like(q)
    for kw in kwargs_list:
        tokens = row_tokens(extra_options, b, kw["cond"], kw["uncond"]).double()
        k_ip, v_ip = tokens @ kw["to_k"].double().T, tokens @ kw["to_v"].double().T  # (B, T_ip, D)
        for h in range(heads):
            sl = slice(h * dh, (h + 1) * dh)
            p = torch.softmax(q[..., sl] @ k_ip[..., sl].transpose(1, 2) / math.sqrt(dh), dim=-1)  # (B, N, T_ip)
            total[..., sl] += kw["weight"] * (p @ v_ip[..., sl])
    return total


def state(patch: OtherPackPatch) -> tuple:
    """Everything of the stand-in that a change in place would touch: its fields, lists and tensors."""
    def frozen(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return ("tensor", id(value), value._version, value.clone())
        if isinstance(value, dict):
            return ("dict", id(value), tuple((k, frozen(v)) for k, v in value.items()))
        if isinstance(value, list):
            return ("list", id(value), tuple(frozen(v) for v in value))
        return value

    return tuple((k, frozen(v)) for k, v in sorted(vars(patch).items()))


def same_state(a: tuple, b: tuple) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b
