"""The efficient nested attention against the plain reference, and the method's invariants."""

import pytest
import torch

from nested_attention import NestedSubject, nested_attention, nested_values, regularize_norm, sdpa_attention
from nested_attention.reference import reference_nested_attention

# float32 efficient form vs. float64 reference on unit-scale inputs.
TOL = {"atol": 2e-5, "rtol": 1e-4}


def make(b=2, n=6, t=9, heads=2, dh=4, m=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = heads * dh
    q, k, v = (torch.randn(b, s, d, generator=g) for s in (n, t, t))
    key, value = torch.randn(m, d, generator=g), torch.randn(m, d, generator=g)
    return q, k, v, key, value


@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("lam", [1.0, 2.5])
@pytest.mark.parametrize("m", [1, 7])
def test_efficient_form_equals_reference(heads, lam, m):
    q, k, v, key, value = make(heads=heads, dh=8 // heads, m=m)
    subject = NestedSubject(key, value, torch.tensor([3]), lam=lam, alpha=2.0)
    out = nested_attention(q, k, v, [subject], heads=heads)
    ref = reference_nested_attention(q, k, v, [subject], heads=heads)
    torch.testing.assert_close(out.double(), ref, **TOL)


@pytest.mark.parametrize("lam", [1.0, 2.5])
def test_two_subjects_with_repeated_positions_equal_reference(lam):
    q, k, v, key, value = make(t=12, m=4)
    _, _, _, key2, value2 = make(t=12, m=6, seed=1)
    a = NestedSubject(key, value, torch.tensor([1, 7]), lam=lam, alpha=2.0)
    b = NestedSubject(key2, value2, torch.tensor([4]), lam=1.5, alpha=1.0)
    out = nested_attention(q, k, v, [a, b], heads=2)
    ref = reference_nested_attention(q, k, v, [a, b], heads=2)
    torch.testing.assert_close(out.double(), ref, **TOL)


def test_subject_order_does_not_change_the_result():
    q, k, v, key, value = make(t=12)
    a = NestedSubject(key, value, torch.tensor([2]), lam=2.0)
    b = NestedSubject(value, key, torch.tensor([5]), lam=3.0)
    torch.testing.assert_close(nested_attention(q, k, v, [a, b], heads=2), nested_attention(q, k, v, [b, a], heads=2))


def test_nested_value_equal_to_token_value_with_lambda_one_is_plain_attention():
    q, k, v, _, _ = make(b=1)
    s = 3
    # Every nested value equals V[s*]: v* = V[s*], and with alpha = 1 the norm rule keeps it.
    value = v[0, s].expand(5, -1).clone()
    key = torch.randn(5, v.shape[-1])
    subject = NestedSubject(key, value, torch.tensor([s]), lam=1.0, alpha=1.0)
    out = nested_attention(q, k, v, [subject], heads=2)
    torch.testing.assert_close(out, sdpa_attention(q, k, v, 2), atol=1e-6, rtol=1e-5)


def test_unconditional_rows_are_bit_identical_to_plain_attention():
    q, k, v, key, value = make(b=4)
    subject = NestedSubject(key, value, torch.tensor([2]), lam=2.0)
    out = nested_attention(q, k, v, [subject], heads=2, rows=torch.tensor([1, 3]))
    plain = sdpa_attention(q, k, v, 2)
    assert torch.equal(out[[0, 2]], plain[[0, 2]])
    assert not torch.allclose(out[[1, 3]], plain[[1, 3]])
    ref = reference_nested_attention(q, k, v, [subject], heads=2, rows=[1, 3])
    torch.testing.assert_close(out.double(), ref, **TOL)


def test_lambda_never_lowers_the_subject_attention():
    q, k, v, _, _ = make(n=50, t=9)
    s, d = 4, q.shape[-1]
    # V is zero but for V[s*] = all ones, and every nested value is that same vector, so V_q[s*] = V[s*] and
    # the output's mass is exactly the attention on s*, summed over heads.
    v_onehot = torch.zeros_like(v)
    v_onehot[:, s] = 1.0
    value = torch.ones(3, d)
    prev = None
    for lam in (1.0, 1.5, 3.0):
        subject = NestedSubject(torch.randn(3, d), value, torch.tensor([s]), lam=lam, alpha=1.0)
        mass = nested_attention(q, k, v_onehot, [subject], heads=2).sum(-1)
        if prev is not None:
            assert (mass >= prev - 1e-6).all() and (mass > prev + 1e-4).any()
        prev = mass


def test_nested_value_norm_is_alpha_times_token_norm():
    q, k, v, key, value = make(b=1, n=4, t=5, heads=2, dh=4)
    s = 2
    # Route all attention to s*: huge logit on s*, then the output is exactly v* (row's V_q[s*]).
    k = k.clone()
    k[:, s] = q.mean(1) * 1e3
    q = q.mean(1, keepdim=True).expand(1, 4, -1).contiguous() + 1e-3 * torch.randn(1, 4, 8)
    for alpha in (1.0, 2.0, 3.5):
        subject = NestedSubject(key, value, torch.tensor([s]), alpha=alpha)
        out = nested_attention(q, k, v, [subject], heads=2)
        torch.testing.assert_close(out[0].norm(dim=-1), alpha * v[0, s].norm().expand(4), rtol=1e-4, atol=1e-4)
        v_star = regularize_norm(nested_values(q, key, value, 2), v[:, s], alpha)
        torch.testing.assert_close(v_star.norm(dim=-1), alpha * v[:, s].norm(dim=-1).expand(1, 4))


def test_region_weight_zero_changes_nothing_and_one_equals_no_weight():
    q, k, v, key, value = make(b=1, n=6)
    weight = torch.tensor([0, 0, 1, 1, 0, 1.0])
    s = NestedSubject(key, value, torch.tensor([3]), lam=2.0, region_weight=weight)
    full = NestedSubject(key, value, torch.tensor([3]), lam=2.0)
    out = nested_attention(q, k, v, [s], heads=2)
    plain = sdpa_attention(q, k, v, 2)
    inside = weight.bool()
    assert torch.equal(out[0, ~inside], plain[0, ~inside])
    torch.testing.assert_close(out[0, inside], nested_attention(q, k, v, [full], heads=2)[0, inside])
    soft = NestedSubject(key, value, torch.tensor([3]), lam=2.0, region_weight=torch.linspace(0, 1, 6))
    torch.testing.assert_close(nested_attention(q, k, v, [soft], heads=2).double(),
                               reference_nested_attention(q, k, v, [soft], heads=2), **TOL)


def test_per_row_subject_tokens_equal_reference():
    q, k, v, _, _ = make(b=3, m=4)
    g = torch.Generator().manual_seed(5)
    key, value = torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    subject = NestedSubject(key, value, torch.tensor([2]), lam=1.0)
    out = nested_attention(q, k, v, [subject], heads=2, rows=torch.tensor([True, False, True]))
    ref = reference_nested_attention(q, k, v, [subject], heads=2, rows=[0, 2])
    torch.testing.assert_close(out.double(), ref, **TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_stay_close_to_float32(dtype):
    q, k, v, key, value = make()
    subject = NestedSubject(key, value, torch.tensor([3]), lam=2.0)
    ref = nested_attention(q, k, v, [subject], heads=2)
    half = nested_attention(q.to(dtype), k.to(dtype), v.to(dtype), [subject], heads=2)
    assert half.dtype == dtype
    torch.testing.assert_close(half.float(), ref, atol=5e-2, rtol=5e-2)


def test_gradients_flow_to_nested_keys_and_values_not_to_text():
    q, k, v, key, value = make()
    key.requires_grad_(True)
    value.requires_grad_(True)
    subject = NestedSubject(key, value, torch.tensor([3]), lam=1.0)
    nested_attention(q, k, v, [subject], heads=2).square().sum().backward()
    assert key.grad is not None and key.grad.abs().sum() > 0
    assert value.grad is not None and value.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# Repeated positions: refused (a position is the subject's or not; the sum form would count it twice)


def test_a_subject_whose_positions_repeat_an_index_is_refused_naming_them():
    *_, key, value = make(t=9)
    with pytest.raises(ValueError, match=r"subject positions \[3, 5, 3\] repeat \[3\]"):
        NestedSubject(key, value, torch.tensor([3, 5, 3]))


def test_two_subjects_on_one_position_are_refused():
    q, k, v, key, value = make(t=9)
    a = NestedSubject(key, value, torch.tensor([2, 4]))
    b = NestedSubject(value, key, torch.tensor([4]))
    with pytest.raises(ValueError, match=r"repeat \[4\]"):
        nested_attention(q, k, v, [a, b], heads=2)


def test_refusing_repeats_is_what_the_reference_means(monkeypatch):
    """The paper's V_q has one value per text position, so [3, 3] can only mean [3] (the reference's
    reading); the efficient form, with the check switched off, answers something else: so it refuses."""
    import nested_attention.attention as attention_module

    q, k, v, key, value = make(t=9)
    once = NestedSubject(key, value, torch.tensor([3]), lam=2.0)
    ref_once = reference_nested_attention(q, k, v, [once], heads=2)
    torch.testing.assert_close(nested_attention(q, k, v, [once], heads=2).double(), ref_once, **TOL)
    monkeypatch.setattr(attention_module, "check_positions", lambda positions: None)
    twice = NestedSubject(key, value, torch.tensor([3, 3]), lam=2.0)
    torch.testing.assert_close(reference_nested_attention(q, k, v, [twice], heads=2), ref_once)
    assert not torch.allclose(nested_attention(q, k, v, [twice], heads=2).double(), ref_once, **TOL)


def test_subject_binding_refuses_repeated_or_out_of_prompt_positions():
    from nested_attention.patch import SubjectBinding

    with pytest.raises(ValueError, match=r"repeat \[5\]"):
        SubjectBinding(encoder=None, tokens=torch.zeros(1, 2, 4), positions=(5, 5), prompt_tokens=77)
    with pytest.raises(ValueError, match=r"\[77\] lie outside the prompt's 77 tokens"):
        SubjectBinding(encoder=None, tokens=torch.zeros(1, 2, 4), positions=(3, 77), prompt_tokens=77)


# ------------------------------------------------------------------------------------------------
# The widened-heads form: every path against the reference, forward and backward


def _subjects(kind, d, g, b=2, n=6):
    """Subjects of several shapes: one or two, one or several positions, weights, per-row tokens."""
    def kv(m, rows=None):
        shape = (m, d) if rows is None else (rows, m, d)
        return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)

    if kind == "two subjects at lambda 1, repeated word":  # P[s] |V[s]| straight from the widened call
        return [NestedSubject(*kv(4), torch.tensor([2, 9]), alpha=2.0), NestedSubject(*kv(6), torch.tensor([5]))]
    if kind == "two subjects, repeated word":
        return [NestedSubject(*kv(4), torch.tensor([1, 7]), lam=2.5, alpha=2.0),
                NestedSubject(*kv(6), torch.tensor([4]), lam=1.0, alpha=1.0)]
    if kind == "region weight and lambda":
        return [NestedSubject(*kv(5), torch.tensor([3]), lam=3.0, region_weight=torch.rand(n, generator=g))]
    if kind == "per-row tokens and weights (training)":
        return [NestedSubject(*kv(4, rows=b), torch.tensor([2, 9]), lam=1.0,
                              region_weight=torch.tensor([[1.0] * n, [0.0] * n])[:b])]
    if kind == "lambda below one":
        return [NestedSubject(*kv(3), torch.tensor([5]), lam=0.5)]
    raise AssertionError(kind)


KINDS = ["two subjects at lambda 1, repeated word", "two subjects, repeated word", "region weight and lambda", "per-row tokens and weights (training)",
         "lambda below one"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [None, [True, False], [False, True]])
def test_every_path_equals_reference_on_the_rows_it_works_on(kind, rows):
    q, k, v, _, _ = make(b=2, t=12)
    subjects = _subjects(kind, q.shape[-1], torch.Generator().manual_seed(3))
    mask = None if rows is None else torch.tensor(rows)
    out = nested_attention(q, k, v, subjects, heads=2, rows=mask)
    picked = [0, 1] if rows is None else [i for i, r in enumerate(rows) if r]
    torch.testing.assert_close(out.double(), reference_nested_attention(q, k, v, subjects, heads=2, rows=picked),
                               **TOL)
    for i in set(range(2)) - set(picked):  # the other rows: the host's attention of those rows, bit for bit
        assert torch.equal(out[i], sdpa_attention(q, k, v, 2)[i])


@pytest.mark.parametrize("kind", ["one subject", *KINDS])
def test_gradients_equal_those_of_the_reference(kind):
    """The trainer backpropagates through the layer: d out / d (q, K~, V~) against float64 autograd."""
    q, k, v, key, value = make(b=2, t=12)
    g = torch.Generator().manual_seed(4)
    subjects = ([NestedSubject(key, value, torch.tensor([3]), lam=1.0)] if kind == "one subject"
                else _subjects(kind, q.shape[-1], g))
    grad_out = torch.randn(q.shape, generator=g)

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype, copy=True).requires_grad_() for t in (q, *[x for s in subjects
                                                                               for x in (s.key, s.value)])]
        it = iter(leaves[1:])
        ours = [NestedSubject(next(it), next(it), s.positions, s.lam, s.alpha, s.region_weight) for s in subjects]
        fn(leaves[0], k.to(dtype), v.to(dtype), ours).mul(grad_out.to(dtype)).sum().backward()
        return [t.grad for t in leaves]

    got = grads(lambda q_, k_, v_, s_: nested_attention(q_, k_, v_, s_, heads=2), torch.float32)
    want = grads(lambda q_, k_, v_, s_: reference_nested_attention(q_, k_, v_, s_, heads=2), torch.float64)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


def test_every_attention_goes_through_the_host_callable(monkeypatch):
    """The widened text attention and each nested attention are the host's calls (so an attention override
    reaches them); the rows without a subject are the host's call on those rows."""
    import nested_attention.attention as attention_module

    q, k, v, key, value = make(b=2, t=12, heads=2, dh=4, m=5)
    subjects = [NestedSubject(key, value, torch.tensor([3]), lam=2.0),
                NestedSubject(value[:3], key[:3], torch.tensor([7]))]
    calls = []

    def host(q_, k_, v_, heads):  # written out, so that torch's SDPA can be forbidden below
        calls.append((tuple(q_.shape), tuple(k_.shape), tuple(v_.shape)))
        qh, kh, vh = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q_, k_, v_))
        probs = (qh @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5).softmax(dim=-1)
        return (probs @ vh).transpose(1, 2).reshape(q_.shape)

    def forbidden(*args, **kwargs):
        raise AssertionError("an attention bypassed the host")

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", forbidden)
    out = nested_attention(q, k, v, subjects, heads=2, rows=torch.tensor([True, False]), attention=host)
    widened = 2 * (4 + 8)  # two heads of 4 columns, each widened to 4 + 8
    assert calls == [((1, 6, widened), (1, 12, widened), (1, 12, widened)),  # the subject row's text attention
                     ((1, 6, 8), (1, 5, 8), (1, 5, 8)), ((1, 6, 8), (1, 3, 8), (1, 3, 8)),  # nested, per subject
                     ((1, 6, 8), (1, 12, 8), (1, 12, 8))]  # the other row
    monkeypatch.undo()
    ref = reference_nested_attention(q, k, v, subjects, heads=2, rows=[0])
    torch.testing.assert_close(out[:1].double(), ref[:1], **TOL)


@pytest.mark.parametrize("lam", [1.0, 3.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_another_packs_output_over_passes_its_own_term_through_at_every_lambda(lam, weighted):
    """over = PV + X (another pack's patch): the subject rows get nested(PV) + X, the others `over` itself."""
    q, k, v, key, value = make(b=2, t=12)
    weight = torch.linspace(0, 1, q.shape[1]) if weighted else None
    subject = NestedSubject(key, value, torch.tensor([3]), lam=lam, region_weight=weight)
    extra = torch.randn(q.shape, generator=torch.Generator().manual_seed(9))
    over = sdpa_attention(q, k, v, 2) + extra
    kept = over.clone()
    out = nested_attention(q, k, v, [subject], heads=2, rows=torch.tensor([True, False]), over=over)
    assert torch.equal(over, kept)  # never written to
    assert torch.equal(out[1], over[1])
    ref = reference_nested_attention(q, k, v, [subject], heads=2, rows=[0])
    torch.testing.assert_close(out[0].double(), ref[0] + extra[0].double(), **TOL)


@pytest.mark.parametrize("lam", [1.0, 3.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_a_given_base_is_the_plain_attention_the_host_would_give(lam, weighted):
    """base = PV, computed by the caller: the same output as without it, and the host attention is not asked
    for PV; a base PV + X has X scaled by r above lambda 1 (which is why another pack's output is `over`)."""
    q, k, v, key, value = make(b=2, t=12)
    weight = torch.linspace(0, 1, q.shape[1]) if weighted else None
    subject = NestedSubject(key, value, torch.tensor([3]), lam=lam, region_weight=weight)
    base = sdpa_attention(q, k, v, 2)
    kept = base.clone()
    widths = []

    def host(q_, k_, v_, heads):
        widths.append(k_.shape[1])
        return sdpa_attention(q_, k_, v_, heads)

    out = nested_attention(q, k, v, [subject], heads=2, rows=torch.tensor([True, False]), base=base, attention=host)
    assert torch.equal(base, kept) and torch.equal(out[1], base[1])
    assert widths == [12, key.shape[0]]  # the subject row's widened text attention, its nested attention
    ref = reference_nested_attention(q, k, v, [subject], heads=2, rows=[0])
    torch.testing.assert_close(out[0].double(), ref[0], **TOL)
    extra = torch.randn(q.shape, generator=torch.Generator().manual_seed(9))
    shifted = nested_attention(q, k, v, [subject], heads=2, rows=torch.tensor([True, False]), base=base + extra)
    assert torch.allclose(shifted - out, extra, atol=1e-5) == (lam == 1.0)
    with pytest.raises(ValueError, match="base= .* or over="):
        nested_attention(q, k, v, [subject], heads=2, base=base, over=base)


@pytest.mark.parametrize("lam", [1.0, 2.5])
def test_probe_receives_each_subjects_attention_probability_after_lambda(lam):
    q, k, v, _, _ = make(b=2, t=12, heads=2, dh=4)
    g = torch.Generator().manual_seed(6)
    weight = torch.rand(q.shape[1], generator=g)
    subjects = [NestedSubject(torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g), torch.tensor([1, 7]),
                              lam=lam),
                NestedSubject(torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), torch.tensor([4]),
                              lam=2.0, region_weight=weight)]
    seen = {}
    out = nested_attention(q, k, v, subjects, heads=2, rows=torch.tensor([False, True]),
                           probe=lambda i, probs: seen.setdefault(i, probs.clone()))
    torch.testing.assert_close(out, nested_attention(q, k, v, subjects, heads=2, rows=torch.tensor([False, True])))
    # Independently: per head, the softmax of the lambda-adjusted logits of row 1, in float64.
    qh, kh = (t[1].double().reshape(t.shape[1], 2, 4).transpose(0, 1) for t in (q, k))  # (h, N|T, d)
    logits = qh @ kh.transpose(1, 2) / 2.0  # (h, N, T)
    boost = torch.ones(q.shape[1], k.shape[1], dtype=torch.float64)
    for s in subjects:
        row_lam = 1.0 + (torch.ones(q.shape[1]) if s.region_weight is None else s.region_weight).double() * (s.lam - 1.0)
        boost[:, s.positions] = row_lam[:, None]
    probs = torch.maximum(logits, boost * logits).softmax(dim=-1)  # (h, N, T)
    assert set(seen) == {0, 1}
    for i, s in enumerate(subjects):
        assert seen[i].shape == (1, 2, q.shape[1]) and seen[i].dtype == torch.float32
        torch.testing.assert_close(seen[i][0].double(), probs[:, :, s.positions].sum(-1), atol=1e-6, rtol=1e-5)


def test_a_boost_far_past_float32s_range_stays_finite_and_exact():
    """delta = (lambda - 1) l is capped where e^delta would overflow; the subject then takes all the attention."""
    q, k, v, key, value = make(b=1, t=9)
    q = q * 12.0
    k = k.clone()
    k[:, 3] = q[0].mean(0) * 4.0  # large positive logits on s*
    subject = NestedSubject(key, value, torch.tensor([3]), lam=8.0)
    out = nested_attention(q, k, v, [subject], heads=2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), reference_nested_attention(q, k, v, [subject], heads=2), **TOL)


def test_a_subject_whose_nested_values_vanish_adds_nothing_instead_of_nan():
    q, k, v, key, _ = make(b=1)
    subject = NestedSubject(key, torch.zeros_like(key), torch.tensor([3]))
    out = nested_attention(q, k, v, [subject], heads=2)
    assert torch.isfinite(out).all()
    # v* = 0: the subject's value is the zero vector, so its token contributes nothing.
    v_without = v.clone()
    v_without[:, 3] = 0.0
    torch.testing.assert_close(out, sdpa_attention(q, k, v_without, 2), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_paths_stay_close_to_the_reference(dtype, kind):
    q, k, v, _, _ = make(b=2, t=12)
    subjects = _subjects(kind, q.shape[-1], torch.Generator().manual_seed(3))
    half = [NestedSubject(s.key.to(dtype), s.value.to(dtype), s.positions, s.lam, s.alpha, s.region_weight)
            for s in subjects]
    out = nested_attention(q.to(dtype), k.to(dtype), v.to(dtype), half, heads=2)
    assert out.dtype == dtype
    ref = reference_nested_attention(q.to(dtype), k.to(dtype), v.to(dtype), half, heads=2)
    torch.testing.assert_close(out.double(), ref, atol=5e-2, rtol=5e-2)
