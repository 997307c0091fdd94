"""The previous implementation of nested attention (up to commit 6e5f069), kept to be measured beside the new one.

`_nested_rows` recomputed the subject rows' (B, h, N, T) float32 text logits and their softmax next
to the host's attention to read P[s*] (and, for lambda != 1, the normalizer ratio) out of them, and
called torch's SDPA directly for the nested values (past any attention override). The code below is
that version unchanged but for its names and its probabilities split into a function of their own;
the benchmark installs it as the variant "... (previous)", and tests/test_benchmark.py checks it
against the same float64 reference as the current code.
Nothing outside the benchmark uses it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from nested_attention.attention import (
    Attention,
    NestedSubject,
    _pick_rows,
    _row_weight,
    _select_rows,
    check_positions,
    sdpa_attention,
)
from nested_attention.patch import NestedAttentionPatch, conditional_rows


def previous_nested_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    subjects: Sequence[NestedSubject],
    *,
    heads: int,
    rows: torch.Tensor | None = None,
    attention: Attention = sdpa_attention,
) -> torch.Tensor:
    """Cross-attention with the subjects' nested values, (B, N, D) x (B, T, D) -> (B, N, D).

    subjects: each with distinct positions, no position shared by two subjects (refused with a
    ValueError where the positions are in host memory; see `check_positions`).
    rows: indices (or a bool mask) of the batch rows that receive nested values (the conditional
    rows under classifier-free guidance); None means every row. Other rows get `attention`'s output
    unchanged. Rows on the CPU avoid a device sync. attention(q, k, v, heads) is the host's plain
    attention; base rows come from it. It must return a new tensor: without autograd recording
    (sampling), the subject rows are updated in it in place.
    """
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
        out = _previous_nested_rows(take(q), take(k), take(v), take(base), chosen, heads, inplace)
        return base if inplace and (a, z) != (0, q.shape[0]) else out
    sub = _previous_nested_rows(take(q), take(k), take(v), take(base), chosen, heads, inplace=False)
    if isinstance(picked, tuple):
        return torch.cat([base[:a], sub, base[z:]])
    return base.index_copy(0, picked, sub)


def _previous_nested_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, base: torch.Tensor,
    subjects: Sequence[NestedSubject], heads: int, inplace: bool,
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
    weights = [_row_weight(s.region_weight, b, n, q) for s in subjects]  # (B, N) or None
    p_plain, p_adj, ratio = _previous_probabilities(logits, subjects, positions, weights)

    # out (B, N, h, d) in base's layout; the coefficients (B, h, N, .) are viewed as (B, N, h, .).
    out = base.reshape(b, n, heads, dim_head)
    owned = inplace  # whether `out` may be written to
    if ratio is not None:
        r = ratio.permute(0, 2, 1, 3)  # (B, N, h, 1)
        out = out.mul_(r) if owned else out * r
        owned = True

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


def _previous_probabilities(logits: torch.Tensor, subjects, positions, weights) -> tuple:
    """P[s] and P'[s] per subject (B, h, N, P) from the (B, h, N, T) logits, and r = Z / Z' (None at lambda 1)."""
    ratio = None
    if all(s.lam == 1.0 for s in subjects):
        probs = logits.softmax(dim=-1)
        p_plain = p_adj = [probs[..., pos] for pos in positions]  # (B, h, N, P)
    else:
        # lambda raises the subject logits: P' is the softmax of the adjusted logits, r = Z / Z'.
        lse = logits.logsumexp(dim=-1, keepdim=True)  # (B, h, N, 1)
        adjusted = logits.clone()
        for s, pos, w in zip(subjects, positions, weights):
            if s.lam == 1.0:
                continue
            lam = s.lam if w is None else (1.0 + w * (s.lam - 1.0))[:, None, :, None]  # (B, 1, N, 1)
            lp = logits[..., pos]  # (B, h, N, P)
            adjusted[..., pos] = torch.maximum(lp, lam * lp)
        lse_adj = adjusted.logsumexp(dim=-1, keepdim=True)
        ratio = (lse - lse_adj).exp()  # (B, h, N, 1)
        p_plain = [(logits[..., pos] - lse).exp() for pos in positions]
        p_adj = [(adjusted[..., pos] - lse_adj).exp() for pos in positions]
    return p_plain, p_adj, ratio


class PreviousNestedPatch(NestedAttentionPatch):
    """A NestedAttentionPatch that computes with the previous implementation, its subjects' positions on the device."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        host = self.host_attention
        active = [s for s in self.subjects if s.active(extra_options.get("sigmas"))]
        if not active:
            return host(q, k, v, heads, extra_options)
        rows = conditional_rows(q.shape[0], extra_options.get("cond_or_uncond"))
        nested = []
        for s in active:
            subject = s.nested_subject(self.index, q, k.shape[1], extra_options)
            # As the previous SubjectBinding handed them: on the model's device, made once per device.
            positions = s.context_positions(k.shape[1], q.device)
            nested.append(NestedSubject(subject.key, subject.value, positions, subject.lam, subject.alpha,
                                        subject.region_weight))
        return previous_nested_attention(q, k, v, nested, heads=heads, rows=rows,
                                         attention=lambda q_, k_, v_, h_: host(q_, k_, v_, h_, extra_options))

    def __deepcopy__(self, memo: dict) -> PreviousNestedPatch:
        return self
