"""What nested attention did in a run (nested_attention.capture): the probe, the maps, the query maps.

The probe contract of `nested_attention(..., probe=)` against the float64 reference; the token weights and the
Q-Former's attention against independent computations; and, with ComfyUI's real sampler on the tiny models,
that capturing changes nothing that is sampled and that the maps are the running means of what the probe saw.
"""

from __future__ import annotations

import pytest
import torch
from pack_helpers import apply, run_node, tiny_encoder

import nested_attention.patch as core_patch
from nested_attention import NestedSubject, nested_attention, nested_values
from nested_attention.capture import (
    combined_map,
    decide_regions,
    nested_token_weights,
    pool_cells,
    query_maps,
    strongest_points,
    token_grid,
)
from nested_attention.reference import reference_nested_attention, reference_subject_probability
from nested_attention_comfy.model import NestedApplyError, attn2_replacements

PROMPT = "a photo of a person and a pet"


def make(b=4, n=6, t=9, heads=2, dh=4, m=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = heads * dh
    q, k, v = (torch.randn(b, s, d, generator=g) for s in (n, t, t))
    key, value = torch.randn(m, d, generator=g), torch.randn(m, d, generator=g)
    return q, k, v, key, value


def probed(q, k, v, subjects, heads, rows=None):
    """nested_attention with a probe that records its calls: (output, {index: probs})."""
    seen = {}

    def probe(index, probs):
        assert index not in seen, "the probe is called once per subject"
        seen[index] = probs.clone()

    return nested_attention(q, k, v, subjects, heads=heads, rows=rows, probe=probe), seen


# ------------------------------------------------------------------------------------------------
# The probe


@pytest.mark.parametrize("lams", [(1.0, 1.0), (2.5, 1.0), (3.0, 1.5)])
@pytest.mark.parametrize("weighted", [False, True])
def test_probe_gives_each_subjects_probability_after_lambda_and_region_weight(lams, weighted):
    q, k, v, key, value = make(t=12)
    _, _, _, key2, value2 = make(t=12, m=3, seed=1)
    weight = torch.rand(q.shape[1], generator=torch.Generator().manual_seed(3)) if weighted else None
    a = NestedSubject(key, value, torch.tensor([1, 7]), lam=lams[0], region_weight=weight)
    b = NestedSubject(key2, value2, torch.tensor([4]), lam=lams[1])
    rows = torch.tensor([False, True, False, True])
    out, seen = probed(q, k, v, [a, b], 2, rows)
    expected = reference_subject_probability(q, k, [a, b], heads=2, rows=[1, 3])
    assert sorted(seen) == [0, 1]
    for index in (0, 1):
        assert seen[index].dtype == torch.float32 and seen[index].shape == (2, 2, q.shape[1])  # (rows, h, N)
        torch.testing.assert_close(seen[index].double(), expected[index], atol=2e-6, rtol=1e-5)
    # The probe only reads: the output is bit for bit the one without it.
    assert torch.equal(out, nested_attention(q, k, v, [a, b], heads=2, rows=rows))
    torch.testing.assert_close(
        out.double(), reference_nested_attention(q, k, v, [a, b], heads=2, rows=[1, 3]), atol=2e-5, rtol=1e-4
    )


def test_probabilities_of_subjects_covering_every_text_position_sum_to_one():
    q, k, v, key, value = make(b=2, t=6)
    subjects = [
        NestedSubject(key, value, torch.tensor(p), lam=s)
        for p, s in (([0, 3], 2.0), ([1], 1.0), ([2, 4, 5], 4.0))
    ]
    _, seen = probed(q, k, v, subjects, 2)
    total = sum(seen.values())
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-6, rtol=0)
    assert all((p >= 0).all() for p in seen.values())


def test_probe_is_not_called_without_rows_to_work_on():
    q, k, v, key, value = make()
    _, seen = probed(
        q, k, v, [NestedSubject(key, value, torch.tensor([2]))], 2, rows=torch.zeros(4, dtype=bool)
    )
    assert seen == {}


# ------------------------------------------------------------------------------------------------
# Token weights and the Q-Former's attention


@pytest.mark.parametrize("heads", [1, 2])
def test_token_weights_are_the_weights_the_nested_values_mix(heads):
    q, _, _, key, value = make(heads=heads, dh=8 // heads, m=7)
    weights = nested_token_weights(q, key, heads)  # (B, N, M), averaged over heads
    torch.testing.assert_close(
        nested_token_weights(q, key, heads, chunk_bytes=1), weights
    )  # a query at a time
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(q.shape[:2]), atol=1e-6, rtol=0)
    # Per head, by hand: softmax(q K~^T / sqrt(d)); mixing V~ with it gives nested_values.
    dh = q.shape[-1] // heads
    per_head = []
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        per_head.append(torch.softmax(q[..., sl].double() @ key[:, sl].double().T / dh**0.5, dim=-1))
    torch.testing.assert_close(weights.double(), torch.stack(per_head).mean(dim=0), atol=1e-6, rtol=1e-5)
    mixed = torch.cat([w @ value[:, h * dh : (h + 1) * dh].double() for h, w in enumerate(per_head)], dim=-1)
    torch.testing.assert_close(mixed.float(), nested_values(q, key, value, heads), atol=1e-5, rtol=1e-4)


def test_qformer_attention_comes_from_the_encoding_forward(tiny_unet):
    encoder = tiny_encoder(tiny_unet, num_queries=6)
    clip_tokens = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = encoder.encode(clip_tokens)
        tokens, attention = encoder.encode(clip_tokens, return_attention=True)
        # Block 0 by hand: the latents (queries) over [image tokens, latents].
        block = encoder.qformer.blocks[0][0]
        media = block.norm_media(encoder.qformer.proj_in(clip_tokens))
        latents = block.norm_latents(encoder.qformer.latents.expand(2, -1, -1))
        q = block.to_q(latents)
        k = block.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)[0]
        heads, dh = block.heads, q.shape[-1] // block.heads
        by_hand = torch.stack(
            [
                torch.softmax(
                    q[..., h * dh : (h + 1) * dh] @ k[..., h * dh : (h + 1) * dh].transpose(1, 2) / dh**0.5,
                    -1,
                )
                for h in range(heads)
            ],
            dim=1,
        )  # (B, heads, M, L + M)
    torch.testing.assert_close(tokens, plain, atol=1e-5, rtol=1e-4)
    assert len(attention) == len(encoder.qformer.blocks)
    torch.testing.assert_close(attention[0], by_hand, atol=1e-6, rtol=1e-5)

    maps = query_maps(attention, image_tokens=17)  # (B, M, 4, 4): the 16 patches, CLS left out
    assert maps.shape == (2, 6, 4, 4) and (maps >= 0).all()
    expected = torch.stack(attention).mean(dim=(0, 2))[..., 1:17].reshape(2, 6, 4, 4)
    torch.testing.assert_close(maps, expected)
    assert (maps.flatten(2).sum(-1) < 1).all()  # the rest went to the class token and the latents


# ------------------------------------------------------------------------------------------------
# Map helpers with known answers


def test_regions_are_disjoint_and_each_holds_its_own_peak_whatever_the_scale():
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")

    def bump(y, x, width):
        return torch.exp(-((ys - y) ** 2 + (xs - x) ** 2) / width)[None]

    man = 0.5 * bump(3, 1, 40)  # strong and broad: 0.26 at the woman's peak
    woman = 0.02 * bump(4, 6, 6) + 0.001  # weak everywhere (0.021 at its peak): compared to its own peak
    regions = decide_regions([man, woman])
    assert regions[0].dtype == torch.bool
    assert not (regions[0] & regions[1]).any() and (regions[0] | regions[1]).all()
    assert regions[0][0, 3, 1] and regions[1][0, 4, 6]
    # Equal maps: every place goes to the first subject (a deterministic tie rule).
    same = decide_regions([man, man.clone()])
    assert same[0].all() and not same[1].any()


def test_strongest_points_are_three_separate_places_strongest_first():
    heat = torch.zeros(16, 16)
    heat[2, 3], heat[2, 4], heat[12, 12], heat[8, 1] = (
        1.0,
        0.95,
        0.7,
        0.5,
    )  # (2, 4) is the same place as (2, 3)
    assert strongest_points(heat, 3) == [(3.5 / 16, 2.5 / 16), (12.5 / 16, 12.5 / 16), (1.5 / 16, 8.5 / 16)]


def test_token_weights_are_pooled_to_cell_means():
    values = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)  # (R, 4x4 grid, C)
    pooled = pool_cells(values, (4, 4), (2, 2))
    by_hand = values.reshape(2, 4, 4, 3)[:, :2, :2].mean(dim=(1, 2))  # the top-left cell
    torch.testing.assert_close(pooled[:, 0], by_hand)
    assert pooled.shape == (2, 4, 3)
    coarse = pool_cells(values[:, :4], (2, 2), (4, 4))  # a coarser layer repeats its values on the finer grid
    torch.testing.assert_close(coarse.reshape(2, 4, 4, 3)[:, 0, 1], values[:, 0])


def test_combined_map_averages_the_grids_on_the_finest():
    fine = torch.full((1, 16), 0.2)
    coarse = torch.full((1, 4), 0.6)
    combined = combined_map({(4, 4): fine, (2, 2): coarse})
    assert combined.shape == (1, 4, 4)
    torch.testing.assert_close(combined, torch.full((1, 4, 4), 0.4))


def test_token_grid_is_sdxls_coarsest_grid_at_most_32_a_side():
    assert token_grid((128, 128)) == (32, 32)  # 1024 x 1024
    assert token_grid((32, 32)) == (8, 8)
    assert token_grid((256, 128)) == (32, 16)


# ------------------------------------------------------------------------------------------------
# With ComfyUI's real sampler on the tiny models


def two_subjects(pack, tiny_unet, tiny_clip, pet, person, lambda_=2.0):
    model, _ = apply(pack, tiny_unet, tiny_clip, pet, PROMPT, token="pet", lambda_=lambda_)
    return apply(pack, model, tiny_clip, person, PROMPT, token="person")


@pytest.fixture
def recorded_probes(monkeypatch):
    """Every probe call of the patches during sampling: [(subject name, N, probs (R, h, N))]."""
    calls = []
    original = core_patch.nested_attention

    def recording(q, k, v, subjects, *, probe=None, **kwargs):
        if probe is None:
            return original(q, k, v, subjects, probe=probe, **kwargs)
        names = [s.positions for s in subjects]

        def wrapped(index, probs):
            calls.append((tuple(names[index].tolist()), q.shape[1], probs.clone()))
            probe(index, probs)

        return original(q, k, v, subjects, probe=wrapped, **kwargs)

    monkeypatch.setattr(core_patch, "nested_attention", recording)
    return calls


def test_capture_changes_nothing_that_is_sampled(pack, tiny_unet, tiny_clip, pet, person, encode, sample):
    model, cond = two_subjects(pack, tiny_unet, tiny_clip, pet, person)
    negative = encode(tiny_clip, "blurry")
    captured, sink = run_node(pack, "NestedAttentionCapture", model=model, start_percent=0.0, end_percent=1.0)
    plain = sample(model, cond, negative, 3, steps=3)
    with_capture = sample(captured, cond, negative, 3, steps=3)
    assert torch.equal(plain, with_capture)
    assert sink.runs == 1 and sink.latest.steps == 3
    # And the model without capture samples as it did before the capture node cloned it.
    assert torch.equal(sample(model, cond, negative, 3, steps=3), plain)


def test_placement_maps_are_the_running_means_of_what_the_probe_saw(
    pack, tiny_unet, tiny_clip, pet, person, encode, sample, recorded_probes
):
    model, cond = two_subjects(pack, tiny_unet, tiny_clip, pet, person)
    captured, sink = run_node(pack, "NestedAttentionCapture", model=model, start_percent=0.0, end_percent=1.0)
    sample(captured, cond, encode(tiny_clip, ""), 1, steps=2)
    result = sink.latest
    assert [s.name for s in result.subjects] == ["faces subject ('person')", "pets subject ('pet')"]
    assert result.batch == 1 and result.latent == (32, 32)
    by_subject = {}
    for positions, n, probs in recorded_probes:
        by_subject.setdefault(positions, {}).setdefault(n, []).append(probs.mean(dim=1))  # mean over heads
    assert len(by_subject) == 2  # chained subjects: each its own maps
    bound = next(iter(attn2_replacements(model).values())).subjects
    positions_of = {id(b.source): b.positions for b in bound}  # the Subject each binding was made from
    maps = {}
    for s in result.subjects:
        assert s.source is person or s.source is pet
        recorded = by_subject[positions_of[id(s.source)]]
        assert sorted(h * w for h, w in s.placement) == sorted(recorded)
        for (h, w), mean in s.placement.items():
            expected = torch.cat(recorded[h * w]).mean(dim=0, keepdim=True)  # over layers and steps
            torch.testing.assert_close(mean, expected, atol=1e-6, rtol=1e-5)
            assert ((mean >= 0) & (mean <= 1)).all()
        assert s.calls == sum(len(v) for v in recorded.values())
        # Token weights: one distribution over the subject's tokens per cell of the token grid.
        assert s.tokens.shape == (1, 8, 8, s.num_tokens)
        torch.testing.assert_close(s.tokens.sum(dim=-1), torch.ones(1, 8, 8), atol=1e-5, rtol=0)
        maps[s.source is person] = s.placement_map()
    assert not torch.allclose(maps[True], maps[False])


def test_capture_observes_only_its_range_and_starts_afresh_each_run(
    pack, tiny_unet, tiny_clip, pet, person, encode, sample
):
    model, cond = two_subjects(pack, tiny_unet, tiny_clip, pet, person)
    patches = dict(attn2_replacements(model))
    before = {key: dict(vars(p)) for key, p in patches.items()}
    captured, sink = run_node(pack, "NestedAttentionCapture", model=model, start_percent=0.5, end_percent=1.0)
    negative = encode(tiny_clip, "")
    sample(captured, cond, negative, 1, steps=4)
    first = sink.latest
    assert 0 < first.steps < 4  # the later steps only
    sample(captured.clone(), cond, negative, 1, steps=4)  # a clone shares the patches and the capture
    second = sink.latest
    assert sink.runs == 2 and second is not first
    assert [s.calls for s in second.subjects] == [
        s.calls for s in first.subjects
    ]  # not accumulated across runs
    for a, b in zip(first.subjects, second.subjects):
        torch.testing.assert_close(a.placement_map(), b.placement_map())
    # Nothing was kept on the (shared) patch objects.
    assert {key: dict(vars(p)) for key, p in patches.items()} == before


def test_placement_alone_keeps_no_token_weights_and_the_same_maps(
    pack, tiny_unet, tiny_clip, pet, person, encode, sample
):
    model, cond = two_subjects(pack, tiny_unet, tiny_clip, pet, person)
    negative = encode(tiny_clip, "")
    full, with_sources = run_node(
        pack, "NestedAttentionCapture", model=model, start_percent=0.0, end_percent=1.0
    )
    light, placement_only = run_node(
        pack, "NestedAttentionCapture", model=model, start_percent=0.0, end_percent=1.0, sources=False
    )
    assert torch.equal(sample(full, cond, negative, 2, steps=2), sample(light, cond, negative, 2, steps=2))
    for a, b in zip(with_sources.latest.subjects, placement_only.latest.subjects, strict=True):
        assert a.tokens is not None and b.tokens is None and a.calls == b.calls
        torch.testing.assert_close(a.placement_map(), b.placement_map())
    _, sources = run_node(
        pack,
        "NestedAttentionMaps",
        capture=placement_only,
        image=torch.rand(1, 64, 64, 3),
        points="",
        top_tokens=3,
        normalize="peak",
    )
    assert sources.shape[0] == 1  # a note in place of the rows


def test_capture_refuses_a_model_without_nested_attention(pack, tiny_unet):
    with pytest.raises(NestedApplyError, match="no nested attention.*after the last Apply"):
        run_node(pack, "NestedAttentionCapture", model=tiny_unet, start_percent=0.0, end_percent=1.0)


def test_capture_with_a_batch_keeps_one_map_per_image(pack, tiny_unet, tiny_clip, pet, encode):
    import comfy.sample

    model, cond = apply(pack, tiny_unet, tiny_clip, pet, "a photo of a pet")
    captured, sink = run_node(pack, "NestedAttentionCapture", model=model, start_percent=0.0, end_percent=1.0)
    latent = torch.zeros(2, 4, 32, 32)
    noise = comfy.sample.prepare_noise(latent, 5)
    comfy.sample.sample(
        captured,
        noise,
        2,
        5.0,
        "euler",
        "normal",
        cond,
        encode(tiny_clip, ""),
        latent,
        seed=5,
        disable_pbar=True,
    )
    (s,) = sink.latest.subjects
    assert sink.latest.batch == 2 and s.placement_map().shape[0] == 2 and s.tokens.shape[0] == 2
    assert not torch.allclose(s.placement_map()[0], s.placement_map()[1])  # two noises, two maps


def test_query_maps_node_needs_the_photos(pack, pet):
    (grid,) = run_node(pack, "NestedAttentionQueryMaps", subject=pet, count=4)
    assert grid.shape[0] == 1 and grid.dim() == 4 and grid.shape[-1] == 3
    loaded = pack.wires.Subject(tokens=pet.tokens, encoder=pet.encoder, name="saved", images=1)
    with pytest.raises(pack.maps.NestedMapsError, match="loaded from a file.*Encode Subject"):
        run_node(pack, "NestedAttentionQueryMaps", subject=loaded, count=4)
