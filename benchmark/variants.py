"""The variants compared: nested attention as the Apply node installs it, and an IP-Adapter-style patch.

Plain SDXL is the model itself. Models with random weights come from the shared builders
(training/tiny/models.py: the test bed's too).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from nested_attention import SDXL_CONTEXT_DIM, ClipVisionSpec, LayerSpec, NestedEncoder, QFormerConfig
from nested_attention.patch import SubjectBinding

from .workload import CHUNK, IP_TOKENS, SUBJECT_POSITION

IP_NAME = f"IP-Adapter {IP_TOKENS} tokens"
IP_LAYOUT = f"IP-Adapter Plus layout (M={IP_TOKENS})"


def subject_binding(
    encoder: NestedEncoder, tokens: torch.Tensor, name: str = "benchmark subject"
) -> SubjectBinding:
    """One subject on a one-chunk prompt, as the Apply node binds it (lambda 1, always active, no mask)."""
    return SubjectBinding(
        encoder=encoder, tokens=tokens, positions=(SUBJECT_POSITION,), prompt_tokens=CHUNK, name=name
    )


PREVIOUS = " (previous)"  # name suffix of the variants that run the previous implementation


def nested_name(num_tokens: int, previous: bool = False) -> str:
    return f"nested M={num_tokens}" + (PREVIOUS if previous else "")


def with_nested(model: Any, binding: SubjectBinding, layers: Sequence[LayerSpec], previous: bool = False) -> Any:
    """A clone of `model` with the subject on every cross-attention layer, installed as the Apply node does.

    previous: each patch computes with the previous implementation (benchmark/previous.py) instead.
    """
    from nested_attention_comfy.model import (
        install_subject,  # imports comfy: only once the benchmark has set it up
    )

    from .previous import PreviousNestedPatch

    m = model.clone()
    install_subject(m, binding, layers)
    if previous:
        for key, patch in patches_by_key(m).items():
            m.set_model_attn2_replace(
                PreviousNestedPatch(patch.layer, patch.index, patch.subjects, patch.host_attention, patch.models()), *key
            )
    return m


class NaiveIPAdapterPatch:
    """attn2 replacement with IP-Adapter's decoupled cross-attention: attn(q, K, V) + scale * attn(q, K_ip, V_ip).

    Deliberately naive, to time what IP-Adapter implementations do: K_ip, V_ip come from the image tokens
    through this layer's own to_k_ip / to_v_ip, projected on every call and applied to every row (cond and
    uncond). The product's decoupled patch (the evaluation's baseline) is
    training.evaluation.generation.DecoupledAttentionPatch; tests/test_evaluation.py checks both against the
    formula written out.
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

    def __deepcopy__(self, memo: dict) -> NaiveIPAdapterPatch:
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
        patch = NaiveIPAdapterPatch(image_tokens=tokens, to_k_ip=weights[0], to_v_ip=weights[1], host=host)
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
    binding: SubjectBinding | None = None
    projections: dict | None = None
    first_s: float = 0.0
    step_s: list = field(default_factory=list)
    peak_bytes: int = 0
    projections_first: int = 0
    projections_later: int = 0
    finite: bool = True


def ip_adapter_plus_layout(
    layers: Sequence[LayerSpec], device: torch.device, dtype: torch.dtype, clip: ClipVisionSpec, projections: Any,
    tiny: bool = False,
) -> NestedEncoder:
    """An encoder in IP-Adapter Plus SDXL's layout (random weights): its Resampler (width 1280, 4 blocks of 20
    heads, 16 queries, no feed-forward biases) over the tower's penultimate tokens; `projections` shared."""
    from training.tiny.models import build_encoder, tiny_qformer

    qformer = (dataclasses.replace(tiny_qformer(), ff_bias=False) if tiny
               else QFormerConfig(dim=1280, depth=4, heads=20, dim_head=64, ff_bias=False))
    return build_encoder(IP_TOKENS, layers, device, dtype, seed=7, qformer=qformer, projections=projections,
                         clip_vision=dataclasses.replace(clip, hidden_layer="penultimate"))
