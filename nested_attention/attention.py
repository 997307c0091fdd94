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
# probe(index, probs): see `nested_attention`.
Probe = Callable[[int, torch.Tensor], None]


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

    def __post_init__(self) -> None:
        # A position is the subject's or it is not: the method has no meaning for a repeated one, and the
        # efficient form would count it twice. Checked where it costs nothing (positions in host memory);
        # positions on a device come from SubjectBinding, whose tuple is checked the same way.
        if self.positions.device.type == "cpu":
            check_positions(self.positions.tolist())


def check_positions(positions: Sequence[int]) -> None:
    """Refuse a subject whose token positions repeat an index (ValueError naming them)."""
    seen, repeated = set(), []
    for p in positions:
        if p in seen and p not in repeated:
            repeated.append(p)
        seen.add(p)
    if repeated:
        raise ValueError(
            f"subject positions {list(positions)} repeat {repeated}: each text position is the subject's "
            "once or not at all. Give each position once (a word that occurs twice has two positions)."
        )


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


def _select_rows(s: NestedSubject, take: Callable[[torch.Tensor], torch.Tensor]) -> NestedSubject:
    """The subject restricted to the picked batch rows (tensors without a batch dim are shared)."""
    key, value, weight = s.key, s.value, s.weight
    if key.dim() == 3:
        key, value = take(key), take(value)
    if weight is not None and weight.dim() == 2 and weight.shape[0] > 1:
        weight = take(weight)
    return replace(s, key=key, value=value, weight=weight)


def _row_weight(weight: Optional[torch.Tensor], batch: int, n: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    if weight is None:
        return None
    weight = weight.to(device=like.device, dtype=torch.float32)
    if weight.shape[-1] != n:
        raise ValueError(f"region weight has {weight.shape[-1]} queries, the layer has {n}")
    return weight.reshape(-1, n).expand(batch, n)  # (B, N)


def _pick_rows(rows: Optional[torch.Tensor], batch: int, device: torch.device):
    """The rows as (start, stop) when they are one contiguous range, else a long index tensor; None if no row.

    Rows given on the CPU are read there, so a GPU is never asked for them (no device sync); a bool
    mask on the GPU costs the one sync nonzero() needs, an index tensor there costs none.
    """
    if rows is None:
        return (0, batch)
    index = rows.nonzero().flatten() if rows.dtype == torch.bool else rows.flatten()
    if rows.device.type != "cpu":
        return index if index.numel() else None
    picked = index.tolist()
    if not picked:
        return None
    if picked == list(range(picked[0], picked[0] + len(picked))):
        return (picked[0], picked[0] + len(picked))
    return index.to(device, non_blocking=True)


def nested_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    subjects: Sequence[NestedSubject],
    *,
    heads: int,
    rows: Optional[torch.Tensor] = None,
    attention: Attention = sdpa_attention,
    base: torch.Tensor | None = None,
    probe: Probe | None = None,
) -> torch.Tensor:
    """Cross-attention with the subjects' nested values, (B, N, D) x (B, T, D) -> (B, N, D).

    subjects: each with distinct positions, no position shared by two subjects (refused with a
    ValueError where the positions are in host memory; see `check_positions`).
    rows: indices (or a bool mask) of the batch rows that receive nested values (the conditional
    rows under classifier-free guidance); None means every row. Other rows get `attention`'s output
    unchanged. Rows on the CPU avoid a device sync. attention(q, k, v, heads) is the host's plain
    attention; base rows come from it. It must return a new tensor: without autograd recording
    (sampling), the subject rows are updated in it in place.
    base: the output of the plain attention when the caller has it already (another pack's attn2 patch
    computed it: `NestedAttentionPatch`); used instead of calling `attention`, and written like it.
    probe: optional probe(index, probs), called once per subject (index into `subjects`) with probs
    (B_rows, h, N) float32: the subject word's attention probability after lambda and the region weight
    (P'), summed over the subject's positions, for the rows worked on. Only reads; None costs nothing.
    """
    if base is None:
        base = attention(q, k, v, heads)
    if not subjects:
        return base
    if len(subjects) > 1 and all(s.positions.device.type == "cpu" for s in subjects):
        check_positions([p for s in subjects for p in s.positions.tolist()])  # two subjects on one position
    picked = _pick_rows(rows, q.shape[0], q.device)
    if picked is None:
        return base
    inplace = not torch.is_grad_enabled() and base.is_contiguous()  # a reshape of it must be a view
    if isinstance(picked, tuple):
        a, z = picked

        def take(t: torch.Tensor) -> torch.Tensor:
            return t[a:z]  # a view
    else:
        def take(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, picked.to(t.device))

    chosen = [_select_rows(s, take) for s in subjects]
    if isinstance(picked, tuple) and (inplace or (a, z) == (0, q.shape[0])):
        # The rows' slice of base is updated in place (or is all of it, out of place).
        out = _nested_rows(take(q), take(k), take(v), take(base), chosen, heads, inplace, probe)
        return base if inplace and (a, z) != (0, q.shape[0]) else out
    sub = _nested_rows(take(q), take(k), take(v), take(base), chosen, heads, False, probe)
    if isinstance(picked, tuple):
        return torch.cat([base[:a], sub, base[z:]])
    return base.index_copy(0, picked, sub)


def _nested_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, base: torch.Tensor,
    subjects: Sequence[NestedSubject], heads: int, inplace: bool, probe: Probe | None = None,
) -> torch.Tensor:
    """base (B, N, D) plus every subject's terms; written into `base` when `inplace`.

    Per subject, with coefficients per head and query (B, h, N) computed in float32:
        out += a * v*  +  sum_j c_j * V[s_j]
        a   = sum_j P'[s_j] * w * alpha |V[s_j]| / |v*|      (the norm rule, folded into a scalar)
        c_j = P'[s_j] * (1 - w) - r * P[s_j]
    so the (N, D)-sized work is one SDPA, one norm and two multiply-adds per subject. On a GPU the
    rest is a handful of small kernels, and nothing here reads a value back to the host.
    """
    b, n, width = q.shape
    dim_head = width // heads
    out_dtype = base.dtype

    # Plain logits (B, h, N, T) in float32; the 1/sqrt(d) rides on the small K.
    qh = q.reshape(b, n, heads, dim_head).transpose(1, 2)  # (B, h, N, d), a view
    kh = k.reshape(b, -1, heads, dim_head).transpose(1, 2).float() * dim_head**-0.5  # (B, h, T, d)
    logits = torch.matmul(qh.float(), kh.transpose(-1, -2))  # (B, h, N, T)

    positions = [s.positions.to(q.device) for s in subjects]
    weights = [_row_weight(s.weight, b, n, q) for s in subjects]  # (B, N) or None
    ratio = None
    if all(s.scale == 1.0 for s in subjects):
        probs = logits.softmax(dim=-1)
        p_plain = p_adj = [probs[..., pos] for pos in positions]  # (B, h, N, P)
    else:
        # lambda raises the subject logits: P' is the softmax of the adjusted logits, r = Z / Z'.
        lse = logits.logsumexp(dim=-1, keepdim=True)  # (B, h, N, 1)
        adjusted = logits.clone()
        for s, pos, w in zip(subjects, positions, weights):
            if s.scale == 1.0:
                continue
            scale = s.scale if w is None else (1.0 + w * (s.scale - 1.0))[:, None, :, None]  # (B, 1, N, 1)
            lp = logits[..., pos]  # (B, h, N, P)
            adjusted[..., pos] = torch.maximum(lp, scale * lp)
        lse_adj = adjusted.logsumexp(dim=-1, keepdim=True)
        ratio = (lse - lse_adj).exp()  # (B, h, N, 1)
        p_plain = [(logits[..., pos] - lse).exp() for pos in positions]
        p_adj = [(adjusted[..., pos] - lse_adj).exp() for pos in positions]

    # out (B, N, h, d) in base's layout; the coefficients (B, h, N, .) are viewed as (B, N, h, .).
    out = base.reshape(b, n, heads, dim_head)
    owned = inplace  # whether `out` may be written to
    if ratio is not None:
        r = ratio.permute(0, 2, 1, 3)  # (B, N, h, 1)
        out = out.mul_(r) if owned else out * r
        owned = True

    if probe is not None:
        for index, pa in enumerate(p_adj):
            probe(index, pa.sum(dim=-1))  # (B, h, N)
    for s, pos, w, pp, pa in zip(subjects, positions, weights, p_plain, p_adj):
        key, value = s.key.to(q.device, q.dtype), s.value.to(q.device, q.dtype)
        if key.dim() == 2:  # shared by every row: expand is a view, not a copy
            key, value = key.expand(b, -1, -1), value.expand(b, -1, -1)
        kt = key.reshape(b, -1, heads, dim_head).transpose(1, 2)  # (B, h, M, d)
        vt = value.reshape(b, -1, heads, dim_head).transpose(1, 2)
        v_star = F.scaled_dot_product_attention(qh, kt, vt)  # (B, h, N, d), the nested values
        v_tok = v.index_select(1, pos)  # (B, P, D); v[:, pos[j]] would read pos[j] back to the host
        tok_norm = torch.linalg.vector_norm(v_tok, dim=-1, dtype=torch.float32)  # (B, P)
        star_norm = torch.linalg.vector_norm(v_star, dim=(1, 3), dtype=torch.float32)  # (B, N), all heads
        # alpha |V[s_j]| / |v*| without alpha, which rides on the multiply-add below.
        gain = tok_norm[:, None, None, :] / star_norm.clamp_min(1e-6)[:, None, :, None]  # (B, 1, N, P)
        wq = None if w is None else w[:, None, :, None]  # (B, 1, N, 1)
        a = pa * gain if wq is None else pa * gain * wq
        if pos.numel() > 1:
            a = a.sum(dim=-1, keepdim=True)  # (B, h, N, 1)
        # c_j with its sign flipped, so that the common case (no lambda, no weight) is just P[s_j].
        if wq is None:
            neg_c = pp if ratio is None else ratio * pp
        else:
            neg_c = (pp if ratio is None else ratio * pp) - pa * (1.0 - wq)  # (B, h, N, P)

        v_star = v_star.transpose(1, 2)  # (B, N, h, d), a view
        a = a.permute(0, 2, 1, 3)  # (B, N, h, 1)
        if owned:
            out = out.addcmul_(a, v_star, value=s.alpha)
        else:
            out = torch.addcmul(out, a, v_star, value=s.alpha)
        owned = True
        v_heads = v_tok.reshape(b, -1, heads, dim_head)  # (B, P, h, d)
        if pos.numel() == 1:
            out = out.addcmul_(neg_c.permute(0, 2, 1, 3), v_heads[:, None, 0], value=-1.0)  # (B,N,h,1)*(B,1,h,d)
        else:
            out = out.sub_(torch.matmul(neg_c, v_heads.transpose(1, 2).float()).transpose(1, 2))  # (B, N, h, d)
    return out.reshape(b, n, width).to(out_dtype)
