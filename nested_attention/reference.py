"""A plain, slow reference of nested attention that builds V_q per query, as the paper writes it.

Used only to check the efficient form in `attention.py`; never call it from the product.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .attention import NestedSubject


def reference_nested_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    subjects: Sequence[NestedSubject],
    *,
    heads: int,
    rows: Sequence[int] | None = None,
) -> torch.Tensor:
    """Loop over rows and queries; for each, build V_q (T, D) and the lambda-adjusted logits."""
    q, k, v = q.double(), k.double(), v.double()
    b, n, width = q.shape
    dh = width // heads
    rows = set(range(b)) if rows is None else {int(r) for r in rows}
    out = torch.zeros_like(q)
    for bi in range(b):
        for qi in range(n):
            values = v[bi].clone()  # (T, D): V_q starts as V
            lams = torch.ones(v.shape[1], dtype=q.dtype)  # lambda per text position
            if bi in rows:
                for s in subjects:
                    weight = None if s.region_weight is None else s.region_weight.reshape(-1, n)
                    w = 1.0 if weight is None else float(weight[bi if weight.shape[0] > 1 else 0, qi])
                    key = (s.key if s.key.dim() == 2 else s.key[bi]).double()
                    val = (s.value if s.value.dim() == 2 else s.value[bi]).double()
                    v_star = torch.empty(width, dtype=q.dtype)
                    for h in range(heads):
                        sl = slice(h * dh, (h + 1) * dh)
                        att = torch.softmax(key[:, sl] @ q[bi, qi, sl] / dh**0.5, dim=0)  # (M,)
                        v_star[sl] = att @ val[:, sl]
                    for p in s.positions.tolist():
                        nested = s.alpha * v[bi, p].norm() * v_star / v_star.norm()
                        values[p] = w * nested + (1 - w) * v[bi, p]
                        lams[p] = 1.0 + w * (s.lam - 1.0)
            for h in range(heads):
                sl = slice(h * dh, (h + 1) * dh)
                logits = k[bi, :, sl] @ q[bi, qi, sl] / dh**0.5  # (T,)
                logits = torch.maximum(logits, lams * logits)
                out[bi, qi, sl] = torch.softmax(logits, dim=0) @ values[:, sl]
    return out


def reference_subject_probability(
    q: torch.Tensor,
    k: torch.Tensor,
    subjects: Sequence[NestedSubject],
    *,
    heads: int,
    rows: Sequence[int],
) -> list[torch.Tensor]:
    """Per subject, its word's attention probability after lambda (and the region weight that scales lambda),
    summed over its positions: (len(rows), heads, N) float64, by a loop over rows, queries and heads."""
    q, k = q.double(), k.double()
    _, n, width = q.shape
    dh = width // heads
    found = [torch.zeros(len(rows), heads, n, dtype=torch.float64) for _ in subjects]
    for i, bi in enumerate(rows):
        for qi in range(n):
            lams = torch.ones(k.shape[1], dtype=torch.float64)  # lambda per text position
            for s in subjects:
                weight = None if s.region_weight is None else s.region_weight.reshape(-1, n)
                w = 1.0 if weight is None else float(weight[bi if weight.shape[0] > 1 else 0, qi])
                for p in s.positions.tolist():
                    lams[p] = 1.0 + w * (s.lam - 1.0)
            for h in range(heads):
                sl = slice(h * dh, (h + 1) * dh)
                logits = k[bi, :, sl] @ q[bi, qi, sl] / dh**0.5  # (T,)
                probs = torch.softmax(torch.maximum(logits, lams * logits), dim=0)
                for found_s, s in zip(found, subjects):
                    found_s[i, h, qi] = probs[s.positions].sum()
    return found
