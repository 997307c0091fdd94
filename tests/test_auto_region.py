"""`region: auto` (issue 23, item 2b): each subject's region from its own word's attention in the first steps.

A constructed case with a known answer at one layer, then two people on one prompt ("a man and a woman", one
face encoder, two photos, two Apply nodes) with ComfyUI's real sampler on the tiny models.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pack_helpers import (
    GRID,
    LAYER,
    TEXT,
    apply,
    call_patch,
    constructed_binding,
    direction,
    encode_subject,
    run_node,
)

import nested_attention.patch as core_patch
from nested_attention.capture import AutoRegions, SamplingRun, combined_map
from nested_attention.patch import NestedAttentionError, NestedAttentionPatch
from nested_attention_comfy.model import NestedApplyError

TWO_PEOPLE = "a photo of a man and a woman walking in a park"


@pytest.fixture
def recorded_subjects(monkeypatch):
    """What each patch call handed nested_attention:
    [(N, [(positions, weight or None)], {positions: probs the probe got})]."""
    calls = []
    original = core_patch.nested_attention

    def recording(q, k, v, subjects, *, probe=None, **kwargs):
        entry = (q.shape[1], [(tuple(s.positions.tolist()), s.region_weight) for s in subjects], {})
        calls.append(entry)
        if probe is None:
            return original(q, k, v, subjects, probe=None, **kwargs)

        def wrapped(index, probs):
            entry[2][entry[1][index][0]] = probs.clone()
            probe(index, probs)

        return original(q, k, v, subjects, probe=wrapped, **kwargs)

    monkeypatch.setattr(core_patch, "nested_attention", recording)
    return calls


def test_constructed_case_left_reads_man_right_reads_woman(recorded_subjects):
    """The text key of 'man' (position 2) points where the left half's queries point, the key of 'woman'
    (position 4) where the right half's do: the regions must be the two halves, disjoint."""
    man = constructed_binding("man", positions=(2,), name="man", auto_region=True)
    woman = constructed_binding("woman", positions=(4,), name="woman", auto_region=True)
    patch = NestedAttentionPatch(LAYER, 0, [man, woman])
    left, right = direction(0, 3.0), direction(1, 3.0)
    q = torch.stack([left if x < GRID // 2 else right for y in range(GRID) for x in range(GRID)])[None]
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(1, TEXT, 8, generator=g) * 0.1, torch.randn(1, TEXT, 8, generator=g)
    k[0, 2], k[0, 4] = direction(0, 3.0), direction(1, 3.0)
    run = SamplingRun(batch=1, latent=(GRID, GRID))
    run.auto = AutoRegions(until=0.5, batch=1)
    call_patch(patch, q, k, v, run, sigma=1.0)  # a first step: measured, everywhere
    call_patch(patch, q, k, v, run, sigma=0.3)  # a later step: the regions are set and used
    first, later = recorded_subjects
    assert [w for _, w in first[1]] == [None, None]
    halves = torch.arange(GRID * GRID) % GRID < GRID // 2
    assert torch.equal(run.auto.regions[man][0].flatten(), halves)
    assert torch.equal(run.auto.regions[woman][0].flatten(), ~halves)
    weights = dict(later[1])
    assert torch.equal(weights[(2,)], halves.float()) and torch.equal(weights[(4,)], (~halves).float())
    # Without the per-run state a subject with region auto cannot be found: a clear error, never a silent run.
    for without in (
        None,
        SamplingRun(batch=1, latent=(GRID, GRID)),
    ):  # no run, or a run set up for capture only
        with pytest.raises(NestedAttentionError, match="region auto.*per-run state"):
            call_patch(patch, q, k, v, without)


def two_people(pack, tiny_unet, tiny_clip, load_handle, region="auto"):
    handle = load_handle(seed=3, domain="faces", token="person", num_queries=4)  # one face encoder
    man, woman = encode_subject(pack, handle, seed=30), encode_subject(pack, handle, seed=31)  # two photos
    model, _ = apply(pack, tiny_unet, tiny_clip, man, TWO_PEOPLE, token="man", region=region)
    return apply(pack, model, tiny_clip, woman, TWO_PEOPLE, token="woman", region=region)


def test_two_people_get_disjoint_regions_each_on_its_own_words_peak(
    pack, tiny_unet, tiny_clip, load_handle, encode, sample, recorded_subjects
):
    model, cond = two_people(pack, tiny_unet, tiny_clip, load_handle)
    captured, sink = run_node(pack, "NestedAttentionCapture", model=model, start_percent=0.0, end_percent=1.0)
    negative = encode(tiny_clip, "")
    latent = sample(captured, cond, negative, 7, steps=5)
    subjects = sink.latest.subjects
    regions = [s.region for s in subjects]
    assert all(r is not None and r.dtype == torch.bool for r in regions)
    assert not (regions[0] & regions[1]).any() and (regions[0] | regions[1]).all()  # each place: one subject

    # The measured steps: auto subjects without a weight. Their word's placement there, by hand.
    measured = [c for c in recorded_subjects if c[2] and all(w is None for _, w in c[1])]
    later = [c for c in recorded_subjects if all(w is not None for _, w in c[1])]
    assert measured and later and len(measured) + len(later) == len([c for c in recorded_subjects if c[1]])
    positions = sorted(p for p, _ in measured[0][1])  # "man", then "woman": the sort order of the subjects
    for s, region, pos in zip(subjects, regions, positions):
        per_grid = {}
        for n, _, probs in measured:
            per_grid.setdefault(n, []).append(probs[pos].mean(dim=1))
        side = {n: int(n**0.5) for n in per_grid}
        heat = combined_map(
            {(side[n], side[n]): torch.cat(v).mean(dim=0, keepdim=True) for n, v in per_grid.items()}
        )
        peak = divmod(int(heat[0].flatten().argmax()), heat.shape[-1])
        assert region[0][peak], f"{s.name}: its own word's attention peak {peak} lies outside its region"
    # The steps after: each subject's weight is its region on the layer's grid, 0 or 1.
    for n, subject_weights, _ in later:
        side = int(n**0.5)
        for (pos, weight), region in zip(sorted(subject_weights), regions):
            expected = F.interpolate(region[None].float(), size=(side, side), mode="nearest").flatten()
            assert torch.equal(weight, expected)
        assert torch.equal(sum(w for _, w in subject_weights), torch.ones(n))  # disjoint, at every grid

    # Deterministic, per run: the same latents again, on the model and on a clone sharing its patches.
    assert torch.equal(sample(captured, cond, negative, 7, steps=5), latent)
    assert torch.equal(sample(model.clone(), cond, negative, 7, steps=5), latent)
    # And the regions act: without them the two identities sample otherwise.
    plain, plain_cond = two_people(pack, tiny_unet, tiny_clip, load_handle, region="mask")
    assert not torch.equal(sample(plain, plain_cond, negative, 7, steps=5), latent)


def test_region_auto_with_a_mask_is_refused(pack, tiny_unet, tiny_clip, pet):
    with pytest.raises(NestedApplyError, match="region is auto and a mask is connected"):
        apply(pack, tiny_unet, tiny_clip, pet, "a photo of a pet", mask=torch.ones(8, 8), region="auto")
    with pytest.raises(NestedApplyError, match="region is 'somewhere'"):
        apply(pack, tiny_unet, tiny_clip, pet, "a photo of a pet", region="somewhere")
