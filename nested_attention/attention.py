"""Nested attention (Patashnik et al. 2025, arXiv 2501.01407), in its efficient form.

In a cross-attention layer with queries q (B, N, D), text keys K and values V (B, T, D), the value of
the subject token s* is replaced, per query, by a nested attention over the subject's encoder
tokens:

    v*_q   = softmax(q K~^T / sqrt(d)) V~                 (per head)
    v*_q  <- alpha * |V[s*]| * v*_q / |v*_q|             (norms over the whole width D)
    out_q  = softmax(logits_q) V_q,  V_q[s*] = v*_q,  logit[s*] <- max(logit, lambda * logit)

No (N x T x D) tensor is built. With P the softmax of the plain logits, P' the softmax of the
lambda-adjusted logits and r = Z / Z' the ratio of their normalizers, the output is

    out = r * base + sum_s ( P'[s] * v*_s - r * P[s] * V[s] )

where base = P V is the host's own attention output (so rows without a subject are bit-identical
to the unpatched model) and s runs over every subject position. Each subject adds its own terms;
only r couples them, and it is computed once from all adjusted positions.

A region weight w in [0, 1] per query confines a subject: lambda becomes 1 + w (lambda - 1) and
the nested value becomes w v* + (1 - w) V[s], so w = 0 leaves the output unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class NestedSubject:
    """One subject's inputs at one cross-attention layer.

    key, value: the nested keys K~ and values V~, (M, D) shared by all rows, or (B, M, D) with one
        subject per batch row (training).
    positions: indices of the subject token s* in the text context (one per occurrence).
    scale: lambda, the inference-time boost of the subject's attention logit (1 = trained).
    alpha: the norm regularization factor; |v*| = alpha * |V[s*]|.
    weight: optional region weight per query in [0, 1], (N,) or (B, N); None means everywhere.
    A leading B always counts the whole batch; `nested_attention` picks the rows it works on.
    """

    key: torch.Tensor
    value: torch.Tensor
    positions: torch.Tensor
    scale: float = 1.0
    alpha: float = 2.0
    weight: Optional[torch.Tensor] = None


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Plain multi-head attention, (B, N, D) x (B, T, D) -> (B, N, D), with torch's fused kernel."""
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return rearrange(out, "b h n d -> b n (h d)")


def nested_values(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
    """The raw nested value per query, softmax(q K~^T / sqrt(d)) V~ per head: (B, N, D)."""
    b = q.shape[0]
    if key.dim() == 2:  # shared by every row: expand is a view, not a copy
        key, value = key.expand(b, -1, -1), value.expand(b, -1, -1)
    return sdpa_attention(q, key.to(q.dtype), value.to(q.dtype), heads)


def regularize_norm(v_star: torch.Tensor, v_token: torch.Tensor, alpha: float) -> torch.Tensor:
    """Rescale v* (B, N, D) to alpha * |V[s*]| with V[s*] (B, D); norms over the whole width."""
    target = alpha * v_token.norm(dim=-1, keepdim=True).unsqueeze(1)  # (B, 1, 1)
    return v_star * (target / v_star.norm(dim=-1, keepdim=True).clamp_min(1e-6))


def _select_rows(s: NestedSubject, rows: torch.Tensor) -> NestedSubject:
    """The subject restricted to the given batch rows (tensors without a batch dim are shared)."""
    key, value, weight = s.key, s.value, s.weight
    if key.dim() == 3:
        key, value = key[rows.to(key.device)], value[rows.to(value.device)]
    if weight is not None and weight.dim() == 2 and weight.shape[0] > 1:
        weight = weight[rows.to(weight.device)]
    return replace(s, key=key, value=value, weight=weight)


def _row_weight(weight: Optional[torch.Tensor], batch: int, n: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    if weight is None:
        return None
    weight = weight.to(device=like.device, dtype=torch.float32)
    if weight.shape[-1] != n:
        raise ValueError(f"region weight has {weight.shape[-1]} queries, the layer has {n}")
    return weight.reshape(-1, n).expand(batch, n)  # (B, N)


def nested_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    subjects: Sequence[NestedSubject],
    *,
    heads: int,
    rows: Optional[torch.Tensor] = None,
    attention: Attention = sdpa_attention,
) -> torch.Tensor:
    """Cross-attention with the subjects' nested values, (B, N, D) x (B, T, D) -> (B, N, D).

    rows: indices (or a bool mask) of the batch rows that receive nested values (the conditional
    rows under classifier-free guidance); None means every row. Other rows get `attention`'s output
    unchanged. attention(q, k, v, heads) is the host's plain attention; base rows come from it.
    """
    base = attention(q, k, v, heads)
    if not subjects:
        return base
    if rows is None:
        rows = torch.arange(q.shape[0], device=q.device)
    elif rows.dtype == torch.bool:
        rows = rows.nonzero().flatten()
    if rows.numel() == 0:
        return base
    picked = [_select_rows(s, rows) for s in subjects]
    sub = _nested_rows(q[rows], k[rows], v[rows], base[rows], picked, heads)
    out = base.clone()
    out[rows] = sub.to(out.dtype)
    return out


def _nested_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, base: torch.Tensor,
    subjects: Sequence[NestedSubject], heads: int,
) -> torch.Tensor:
    b, n, width = q.shape
    dim_head = width // heads
    qh = rearrange(q, "b n (h d) -> b h n d", h=heads).float()
    kh = rearrange(k, "b t (h d) -> b h t d", h=heads).float()
    vh = rearrange(v, "b t (h d) -> b h t d", h=heads).float()

    # Plain logits and their log-normalizer; P[s] is only ever needed at subject positions.
    logits = torch.einsum("bhnd,bhtd->bhnt", qh, kh) * dim_head**-0.5  # (B, h, N, T)
    lse = logits.logsumexp(dim=-1)  # (B, h, N)

    adjusted = logits.clone()
    weights = []
    for s in subjects:
        pos = s.positions.to(q.device)
        w = _row_weight(s.weight, b, n, q)
        weights.append(w)
        if s.scale == 1.0:
            continue
        scale = torch.full((b, n), float(s.scale), device=q.device) if w is None else 1.0 + w * (s.scale - 1.0)
        scale = scale[:, None, :, None]  # (B, 1, N, 1)
        lp = logits[..., pos]  # (B, h, N, P)
        adjusted[..., pos] = torch.maximum(lp, scale * lp)
    lse_adj = adjusted.logsumexp(dim=-1)  # (B, h, N)
    ratio = (lse - lse_adj).exp()  # Z / Z'

    out = rearrange(ratio, "b h n -> b h n 1") * rearrange(base.float(), "b n (h d) -> b h n d", h=heads)
    for s, w in zip(subjects, weights):
        pos = s.positions.to(q.device)
        v_star = nested_values(q, s.key.to(q.device), s.value.to(q.device), heads).float()  # (B, N, D)
        p_plain = (logits[..., pos] - lse[..., None]).exp()  # (B, h, N, P)
        p_adj = (adjusted[..., pos] - lse_adj[..., None]).exp()
        for j in range(pos.numel()):
            v_tok = v[:, pos[j]].float()  # (B, D)
            v_new = regularize_norm(v_star, v_tok, s.alpha)  # (B, N, D)
            if w is not None:
                v_new = w[..., None] * v_new + (1.0 - w[..., None]) * v_tok[:, None, :]
            v_new = rearrange(v_new, "b n (h d) -> b h n d", h=heads)
            v_old = rearrange(v_tok, "b (h d) -> b h 1 d", h=heads)
            # One term per position; where it is exactly zero (w = 0) the output keeps the base bit for bit.
            out = out + (p_adj[..., j, None] * v_new - ratio[..., None] * p_plain[..., j, None] * v_old)
    return rearrange(out, "b h n d -> b n (h d)")
