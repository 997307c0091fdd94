"""The variants compared: nested attention as the Apply node installs it, and an IP-Adapter-style patch.

Plain SDXL is the model itself. Models with random weights come from the shared builders
(training/tiny.py: the test bed's too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from nested_attention import SDXL_CONTEXT_DIM, LayerSpec, NestedEncoder
from nested_attention.patch import SubjectBinding

from .workload import CHUNK, IP_TOKENS, SUBJECT_POSITION


def subject_binding(
    encoder: NestedEncoder, tokens: torch.Tensor, name: str = "benchmark subject"
) -> SubjectBinding:
    """One subject on a one-chunk prompt, as the Apply node binds it (lambda 1, always active, no mask)."""
    return SubjectBinding(
        encoder=encoder, tokens=tokens, positions=(SUBJECT_POSITION,), prompt_tokens=CHUNK, name=name
    )


def with_nested(model: Any, binding: SubjectBinding, layers: Sequence[LayerSpec]) -> Any:
    """A clone of `model` with the subject on every cross-attention layer, installed as the Apply node does."""
    from nested_attention_comfy.model import (
        install_subject,  # imports comfy: only once the benchmark has set it up
    )

    m = model.clone()
    install_subject(m, binding, layers)
    return m


class IPAdapterStylePatch:
    """attn2 replacement with IP-Adapter's decoupled cross-attention: attn(q, K, V) + scale * attn(q, K_ip, V_ip).

    K_ip, V_ip come from the image tokens through this layer's own to_k_ip / to_v_ip, projected on
    every call and applied to every row (cond and uncond), as IP-Adapter implementations do.
    """

    def __init__(
        self,
        *,
        image_tokens: torch.Tensor,
        to_k_ip: torch.Tensor,
        to_v_ip: torch.Tensor,
        host: Callable,
        scale: float = 1.0,
    ):
        self.image_tokens = image_tokens  # (1, T_ip, context)
        self.to_k_ip, self.to_v_ip = to_k_ip, to_v_ip  # (dim, context) each
        self.host = host
        self.scale = scale

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict
    ) -> torch.Tensor:
        heads = extra_options["n_heads"]
        out = self.host(q, k, v, heads, extra_options)
        tokens = self.image_tokens.to(q.device, q.dtype)
        k_ip = F.linear(tokens, self.to_k_ip.to(q.device, q.dtype)).expand(
            q.shape[0], -1, -1
        )  # (B, T_ip, dim)
        v_ip = F.linear(tokens, self.to_v_ip.to(q.device, q.dtype)).expand(q.shape[0], -1, -1)
        return out + self.scale * self.host(q, k_ip, v_ip, heads, extra_options)

    def __deepcopy__(self, memo: dict) -> "IPAdapterStylePatch":
        return self  # immutable; ModelPatcher.clone() deep-copies model_options


def with_ip_adapter(
    model: Any,
    layers: Sequence[LayerSpec],
    host: Callable,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    num_tokens: int = IP_TOKENS,
) -> Any:
    """A clone of `model` with an IP-Adapter-style patch (random to_k_ip / to_v_ip) on every cross-attention layer."""
    m = model.clone()
    tokens = torch.randn(1, num_tokens, SDXL_CONTEXT_DIM, generator=torch.Generator().manual_seed(seed))
    tokens = tokens.to(device, dtype)
    for layer in layers:
        weights = torch.empty(2, layer.dim, SDXL_CONTEXT_DIM, device=device, dtype=dtype)
        if device.type != "meta":
            weights.copy_(
                torch.randn(weights.shape, generator=torch.Generator().manual_seed(seed + layer.dim))
            )
            weights.mul_(SDXL_CONTEXT_DIM**-0.5)
        patch = IPAdapterStylePatch(image_tokens=tokens, to_k_ip=weights[0], to_v_ip=weights[1], host=host)
        m.set_model_attn2_replace(patch, *layer.key)
    return m


def patches_by_key(model: Any) -> dict:
    return dict(model.model_options["transformer_options"]["patches_replace"]["attn2"])


@dataclass
class Variant:
    name: str
    model: Any
    rows: int  # UNet rows per CFG step that carry the injection: 0 plain, 1 nested (cond only), 2 IP-Adapter
    num_tokens: int = 0
    binding: Optional[SubjectBinding] = None
    projections: Optional[dict] = None
    first_s: float = 0.0
    step_s: list = field(default_factory=list)
    peak_bytes: int = 0
    projections_first: int = 0
    projections_later: int = 0
    finite: bool = True
