"""Nested attention (Patashnik et al. 2025, arXiv 2501.01407), in its efficient form.

In a cross-attention layer with queries q (B, N, D), text keys K and values V (B, T, D), the value of
the subject token s* is replaced, per query, by a nested attention over the subject's encoder
tokens:

    v*_q   = softmax(q K~^T / sqrt(d)) V~                 (per head)
    v*_q  <- alpha * |V[s*]| * v*_q / |v*_q|             (norms over the whole width D)
    out_q  = softmax(logits_q) V_q,  V_q[s*] = v*_q,  logit[s*] <- max(logit, lambda * logit)

No (N x T x D) tensor is built, and no (N x T) one either. With P the softmax of the plain logits,
P' that of the lambda-adjusted ones, r = Z / Z' the ratio of their normalizers and s running over
every subject position,

    out = r * PV' + sum_s P'[s] * v*_s,     PV' = PV - sum_s P[s] V[s]

(the text attention without the subject tokens' own values). Both PV' and P[s] come from one call
of the host's attention on the subject rows with every head widened by a few columns: q and k get
zeros there (q.k is unchanged; k is scaled by sqrt((d + pad) / d), since the host divides by the
square root of the width it sees), v's subject rows are zeroed and get a 1 (or |V[s]|) in a column
of their own, so that column of the output is P[s] (or P[s] |V[s]|). lambda then needs only the
subject columns' logits l_s = q.k_s / sqrt(d): with delta_s = max((lambda - 1) l_s, 0),

    P'[s] = P[s] e^delta_s r,     r = 1 / (1 + sum_s P[s] (e^delta_s - 1)).

A region weight w in [0, 1] per query confines a subject: lambda becomes 1 + w (lambda - 1) and
the nested value becomes w v* + (1 - w) V[s]. Its weight-0 queries must stay exactly the host's
output, so with a weight the terms are added to the host's own PV instead:
out = r PV + sum_s (P'[s] v~_s - r P[s] V[s]); a given `base` (PV) takes the same form. Another
pack's output PV + X (`over`) gets over + (r - 1) PV + sum_s (...), PV from the widened call, so X
passes through at every lambda. Rows without a subject are the host's own attention of those rows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
Probe = Callable[[int, torch.Tensor], None]

_PAD = 8  # the widened heads grow in steps of 8 columns: fused GPU attention kernels want such head widths
_MAX_BOOST = 80.0  # cap of lambda's logit boost delta: e^80 is finite in float32


@dataclass(frozen=True)
class NestedSubject:
    """One subject's inputs at one cross-attention layer.

    key, value: the nested keys K~ and values V~, (M, D) shared by all rows, or (B, M, D) with one
        subject per batch row (training).
    positions: indices of the subject token s* in the text context (one per occurrence).
    lam: lambda, the inference-time boost of the subject's attention logit (1 = trained).
    alpha: the norm regularization factor; |v*| = alpha * |V[s*]|.
    region_weight: optional region weight per query in [0, 1], (N,) or (B, N); None means everywhere.
    A leading B always counts the whole batch; `nested_attention` picks the rows it works on.
    """

    key: torch.Tensor
    value: torch.Tensor
    positions: torch.Tensor
    lam: float = 1.0
    alpha: float = 2.0
    region_weight: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # A position is the subject's or it is not: the method has no meaning for a repeated one, and the
        # efficient form would count it twice. Checked where it costs nothing (positions in host memory,
        # as SubjectBinding gives them); positions on a device are checked by `nested_attention`.
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
    key, value, weight = s.key, s.value, s.region_weight
    per_row_weight = weight is not None and weight.dim() == 2 and weight.shape[0] > 1
    if key.dim() == 2 and not per_row_weight:
        return s  # nothing per row
    if key.dim() == 3:
        key, value = take(key), take(value)
    if per_row_weight:
        weight = take(weight)
    return replace(s, key=key, value=value, region_weight=weight)


def _row_weight(weight: torch.Tensor | None, batch: int, n: int, like: torch.Tensor) -> torch.Tensor | None:
    if weight is None:
        return None
    weight = weight.to(device=like.device, dtype=torch.float32)
    if weight.shape[-1] != n:
        raise ValueError(f"region weight has {weight.shape[-1]} queries, the layer has {n}")
    return weight.reshape(-1, n).expand(batch, n)  # (B, N)


def _pick_rows(rows: torch.Tensor | None, batch: int, device: torch.device):
    """The rows as (start, stop) when they are one contiguous range, else a long index tensor; None if no row.

    Rows given on the CPU are read there, so a GPU is never asked for them (no device sync); a bool
    mask on the GPU costs the one sync nonzero() needs, an index tensor there costs none.
    """
    if rows is None:
        return (0, batch)
    if rows.device.type != "cpu":
        index = rows.nonzero().flatten() if rows.dtype == torch.bool else rows.flatten()
        return index if index.numel() else None
    flags = rows.flatten().tolist()
    picked = [i for i, f in enumerate(flags) if f] if rows.dtype == torch.bool else flags
    if not picked:
        return None
    if picked == list(range(picked[0], picked[0] + len(picked))):
        return (picked[0], picked[0] + len(picked))
    return torch.tensor(picked).to(device, non_blocking=True)


def _host_positions(s: NestedSubject) -> list[int]:
    """A subject's positions as Python ints: free from host memory (from a device, one sync)."""
    return [int(p) for p in s.positions.tolist()]


@functools.lru_cache(maxsize=64)
def _widening(
    t: int, positions: tuple[int, ...], zero_rows: bool, one_hot: bool, scale: float, d: int, pad: int,
    dtype: torch.dtype, device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Constants of the widened heads, made once per layout and device (on the host, copied without a sync).

    Returns (scales, zeros): `scales` (1, 2T, 1, d + pad) multiplies the padded [k; v] heads in place:
    k's rows by `scale` (the host divides by sqrt(d + pad), the layer by sqrt(d)) and their extra
    columns by 0; v's rows by 1 and their extra columns by 0, except that the row of subject position
    j keeps column d + j (filled with 1 by the padding, when `one_hot`) and loses its d values (when
    `zero_rows`). `zeros` (1, 1, 1, pad) is what q is padded with.
    """
    m = torch.zeros(2 * t, d + pad)
    m[:t, :d] = scale
    m[t:, :d] = 1.0
    for j, p in enumerate(positions):
        if zero_rows:
            m[t + p, :d] = 0.0
        if one_hot:
            m[t + p, d + j] = 1.0
    m = m.to(dtype).to(device, non_blocking=True)
    return m[None, :, None, :], m[:1, d:][None, :, None, :]  # k's first row, extra columns: zeros


def _widen_kv(k: torch.Tensor, v: torch.Tensor, heads: int, pad: int, fill: float) -> torch.Tensor:
    """[k; v] in heads with `pad` extra columns holding `fill`: (B, 2T, h, d + pad), in one buffer."""
    b, t, width = k.shape
    d = width // heads
    both = (k.reshape(b, t, heads, d), v.reshape(b, t, heads, d))
    if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):  # out= records no gradient
        return F.pad(torch.cat(both, dim=1), (0, pad), value=fill)
    kv = k.new_empty((b, 2 * t, heads, d + pad))
    torch.cat(both, dim=1, out=kv[..., :d])
    kv[..., d:].fill_(fill)
    return kv


def _rows_at(x: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """x[:, positions] (B, P, ...) from Python ints: a view for one position, one copy for several."""
    if len(positions) == 1:
        return x[:, positions[0] : positions[0] + 1]
    return torch.stack([x[:, p] for p in positions], dim=1)


def nested_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    subjects: Sequence[NestedSubject],
    *,
    heads: int,
    rows: torch.Tensor | None = None,
    attention: Attention = sdpa_attention,
    base: torch.Tensor | None = None,
    over: torch.Tensor | None = None,
    probe: Probe | None = None,
) -> torch.Tensor:
    """Cross-attention with the subjects' nested values, (B, N, D) x (B, T, D) -> (B, N, D).

    subjects: each with distinct positions, no position shared by two subjects (a ValueError; see
        `check_positions`). Positions in host memory are read for free; on a device they cost a sync.
    rows: indices (or a bool mask) of the batch rows that receive nested values (the conditional
        rows under classifier-free guidance); None means every row. Other rows get the host's
        attention of those rows (or `base`'s, `over`'s) unchanged. Rows on the CPU avoid a device sync.
    attention: the host's plain attention, attention(q, k, v, heads) -> (B, N, D), q, k, v of one
        width. Every attention computed here goes through it (the subject rows' text attention, with
        widened heads, and each nested attention), so whatever the host wraps around its attention
        (ComfyUI's attention override) applies to all of them. It must return a new tensor.
    base: the output of the plain attention PV when the caller has it already; used instead of
        calling `attention` for it, as PV (lambda's normalizer ratio r scales it). Never written to.
    over: another pack's output of the layer, PV plus a term X of its own that has its own softmax
        (`NestedAttentionPatch` wrapping IPAdapter_plus, InstantID, PuLID): the subject rows get
        over + (nested(PV) - PV), so X passes through unchanged at every lambda, at no extra
        attention (PV comes from the widened call). Never written to. Not with `base`.
    probe: optional probe(index, probs), called once per subject (index into `subjects`) with probs
        (B_rows, h, N) float32: the subject word's attention probability after lambda and the region
        weight (P'), summed over the subject's positions, for the rows worked on. Only reads; None
        costs nothing.
    """
    if base is not None and over is not None:
        raise ValueError("nested_attention takes base= (the plain attention PV) or over= (another pack's "
                         "PV + X), not both; pass the other pack's output as over= alone.")
    given = base if base is not None else over
    if not subjects:
        return given if given is not None else attention(q, k, v, heads)
    positions = [_host_positions(s) for s in subjects]
    check_positions([p for pos in positions for p in pos])  # within a subject, and two subjects on one position
    batch = q.shape[0]
    picked = _pick_rows(rows, batch, q.device)
    if picked is None:
        return given if given is not None else attention(q, k, v, heads)
    a, z = picked if isinstance(picked, tuple) else (None, None)
    take = _taker(picked)
    layout = _Layout(positions, heads, over is not None)
    chosen = [_select_rows(s, take) for s in subjects]
    buffers = not torch.is_grad_enabled()  # without autograd, results are written into their place (out=)
    if (given is None and all(s.region_weight is None for s in subjects) and isinstance(picked, tuple)
            and (a == 0 or z == batch)):
        # The subject rows' text attention comes from the widened call; the other rows (one range at
        # most, e.g. the unconditional half) from the host's call on those rows alone.
        out = q.new_empty(q.shape) if buffers else None  # contiguous
        sub = _nested_rows(take(q), take(k), take(v), None, chosen, layout, attention, probe,
                           out=None if out is None else out[a:z])
        if z - a == batch:
            return sub
        rest = slice(z, batch) if a == 0 else slice(0, a)
        plain = attention(q[rest], k[rest], v[rest], heads)
        if out is None:
            return torch.cat([sub, plain] if a == 0 else [plain, sub])
        out[rest] = plain
        return out
    # A region weight (whose weight-0 queries stay the host's own output), a given base, or scattered
    # rows: the terms are added to the plain output of every row.
    full = given if given is not None else attention(q, k, v, heads)
    if given is None and buffers and isinstance(picked, tuple) and full.is_contiguous():
        _nested_rows(take(q), take(k), take(v), take(full), chosen, layout, attention, probe, out=take(full))
        return full
    sub = _nested_rows(take(q), take(k), take(v), take(full), chosen, layout, attention, probe)
    if isinstance(picked, tuple):
        return sub if (a, z) == (0, batch) else torch.cat([full[:a], sub, full[z:]])
    return full.index_copy(0, picked, sub)


def _taker(picked: tuple[int, int] | torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The picked rows of a (B, ...) tensor: a view for a range, a copy for an index tensor."""
    if isinstance(picked, tuple):
        a, z = picked
        return lambda t: t[a:z]
    return lambda t: t.index_select(0, picked.to(t.device))


class _Layout:
    """The subject positions of one call: all of them in order (`flat`), each subject's `span` in it."""

    def __init__(self, positions: Sequence[Sequence[int]], heads: int, keeps_term: bool) -> None:
        self.heads, self.keeps_term = heads, keeps_term  # keeps_term: the base holds a term of its own
        self.flat = [p for pos in positions for p in pos]
        self.spans, start = [], 0
        for pos in positions:
            self.spans.append(slice(start, start + len(pos)))
            start += len(pos)


def _nested_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, base: torch.Tensor | None,
    subjects: Sequence[NestedSubject], layout: _Layout, attention: Attention,
    probe: Probe | None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The picked rows (B, N, D): nested(PV) when base is None, else r base + terms (base = PV), or
    base + (nested(PV) - PV) when the base keeps a term of its own.

    `out` (no autograd), when given, receives the result; it may be `base` itself. Coefficients per
    query and head (B, N, h, .) are float32. The (N, D)-sized work: q widened, the widened text
    attention, per subject one nested attention, one norm and one multiply-add (with a base or a
    region weight, one more per position). Nothing is read back to the host.
    """
    b, n, width = q.shape
    heads, flat = layout.heads, layout.flat
    d = width // heads
    weights = [_row_weight(s.region_weight, b, n, q) for s in subjects]  # (B, N) or None
    boosted = any(s.lam != 1.0 for s in subjects)
    own = base is None  # the text part is the widened call's PV', the subject tokens' values zeroed
    by_norm = own and not boosted and probe is None  # the extra columns then carry P[s] |V[s]|, else P[s]
    pv, extra = _widened_text(q, k, v, layout, own, by_norm, attention)

    ratio = p_plain = p_adj = tok = None
    if not by_norm:
        p_plain = p_adj = extra.float()
        if boosted:
            delta = _boosts(q, k, flat, subjects, layout.spans, weights, heads)
            grow = p_plain * torch.expm1(delta)  # P[s] (e^delta - 1)
            ratio = (grow.sum(dim=-1, keepdim=True) if len(flat) > 1 else grow).add(1.0).reciprocal_()  # (B, N, h, 1)
            p_adj = (p_plain + grow).mul_(ratio)  # P'[s]
        tok = torch.linalg.vector_norm(_rows_at(v, flat), dim=-1, dtype=torch.float32)  # (B, P): |V[s]|

    # What the nested terms are added to; `fresh` once it is a tensor of ours (`out`, when given) to add into.
    target = None if out is None else out.view(b, n, heads, d)
    if ratio is None:
        result, fresh = (pv if own else base.reshape(b, n, heads, d)), False
    elif own:  # r PV'
        result, fresh = (pv * ratio if target is None else torch.mul(pv, ratio, out=target)), True
    elif layout.keeps_term:  # base + (r - 1) PV
        plus = (base.reshape(b, n, heads, d), ratio - 1.0, pv)
        result, fresh = (torch.addcmul(*plus) if target is None else torch.addcmul(*plus, out=target)), True
    else:  # r base
        scaled = (base.reshape(b, n, heads, d), ratio)
        result, fresh = (torch.mul(*scaled) if target is None else torch.mul(*scaled, out=target)), True
    for i, (s, span, w) in enumerate(zip(subjects, layout.spans, weights)):
        if probe is not None:
            probe(i, p_adj[..., span].sum(dim=-1).permute(0, 2, 1))
        v_star = _nested_values(q, s, heads, attention)  # (B, N, h, d)
        star = torch.linalg.vector_norm(v_star, dim=(-2, -1), dtype=torch.float32).clamp_min(1e-6)  # (B, N)
        several = span.stop - span.start > 1
        if by_norm:
            mass = extra[..., span].sum(dim=-1, keepdim=True) if several else extra[..., span]
        else:
            mass = p_adj[..., span] * tok[:, None, None, span]
            mass = mass.sum(dim=-1, keepdim=True) if several else mass
            if w is not None:
                mass = mass * w[:, :, None, None]
        gain = mass / star[:, :, None, None]  # (B, N, h, 1): P'[s] w |V[s]| / |v*|, summed over s's positions
        if fresh:
            result.addcmul_(gain, v_star, value=s.alpha)
        else:
            result = torch.addcmul(result, gain, v_star, value=s.alpha, out=target)
        fresh = True
        if not own:
            # The subject tokens' own values, c_j V[s_j] with c_j = P'[s_j] (1 - w) - r P[s_j].
            for j in range(span.start, span.stop):
                c = p_plain[..., j : j + 1] if ratio is None else p_plain[..., j : j + 1] * ratio
                c = -c if w is None else p_adj[..., j : j + 1] * (1.0 - w[:, :, None, None]) - c
                result.addcmul_(c, v[:, flat[j], None].reshape(b, 1, heads, d))
    return out if out is not None else result.reshape(b, n, width).to(q.dtype)


def _widened_text(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: _Layout, own: bool, by_norm: bool,
    attention: Attention,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The subject rows' text attention through the host, heads widened: (pv, extra), views (B, N, h, .).

    pv: PV' (the subject tokens' values zeroed) when `own`, else PV; extra (B, N, h, P): P[s] |V[s]| when
    `by_norm`, else P[s], one column per subject position.
    """
    b, n, width = q.shape
    t, heads, flat = k.shape[1], layout.heads, layout.flat
    d = width // heads
    pad = _PAD * -(-len(flat) // _PAD)
    e = d + pad
    scales, zeros = _widening(t, tuple(flat), own, not by_norm, math.sqrt(e / d), d, pad, q.dtype, q.device)
    q_wide = torch.cat([q.reshape(b, n, heads, d), zeros.expand(b, n, heads, pad)], dim=-1)
    kv_wide = _widen_kv(k, v, heads, pad, fill=0.0 if by_norm else 1.0).mul_(scales)
    if by_norm:
        for j, p in enumerate(flat):
            row = v[:, p, None, :].expand(b, heads, width)  # V[s_j] once per head: its norm goes to every head
            if torch.is_grad_enabled() and v.requires_grad:
                kv_wide[:, t + p, :, d + j] = torch.linalg.vector_norm(row, dim=-1)
            else:
                torch.linalg.vector_norm(row, dim=-1, out=kv_wide[:, t + p, :, d + j])
    wide = attention(q_wide.reshape(b, n, heads * e), kv_wide[:, :t].reshape(b, t, heads * e),
                     kv_wide[:, t:].reshape(b, t, heads * e), heads).reshape(b, n, heads, e)
    return wide[..., :d], wide[..., d : d + len(flat)]


def _nested_values(q: torch.Tensor, s: NestedSubject, heads: int, attention: Attention) -> torch.Tensor:
    """The subject's raw nested values through the host's attention, (B, N, h, d)."""
    b, n, width = q.shape
    key, value = s.key.to(q.device, q.dtype), s.value.to(q.device, q.dtype)
    if key.dim() == 2:  # shared by every row: expand is a view, not a copy
        key, value = key.expand(b, -1, -1), value.expand(b, -1, -1)
    return attention(q, key, value, heads).reshape(b, n, heads, width // heads)


def _boosts(
    q: torch.Tensor, k: torch.Tensor, flat: Sequence[int], subjects: Sequence[NestedSubject],
    spans: Sequence[slice], weights: Sequence[torch.Tensor | None], heads: int,
) -> torch.Tensor:
    """delta = w max((lambda - 1) l, 0) of the subject columns, capped: float32 (B, N, h, P).

    l = q.k_s / sqrt(d) per head comes from one matmul of q (B, N, h d) with the subject columns of k
    laid out block-diagonally over the heads (B, h d, h P), in float32.
    """
    b, n, width = q.shape
    d = width // heads
    blocks = q.new_zeros((b, heads, d, heads, len(flat)), dtype=torch.float32)
    diagonal = blocks.diagonal(dim1=1, dim2=3)  # (B, d, P, h), a view
    k_heads = k.reshape(b, -1, heads, d)
    for j, p in enumerate(flat):
        diagonal[:, :, j] = k_heads[:, p].transpose(1, 2)
    logits = torch.bmm(q.float(), blocks.view(b, heads * d, heads * len(flat))).view(b, n, heads, len(flat))
    parts = []
    for s, span, w in zip(subjects, spans, weights):
        part = (logits[..., span] * ((s.lam - 1.0) * d**-0.5)).clamp_(0.0, _MAX_BOOST)
        parts.append(part if w is None else part * w[:, :, None, None])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
