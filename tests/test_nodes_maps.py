"""Nested Attention Maps and the source map on a constructed case with a known answer; the node's errors."""

from __future__ import annotations

import pytest
import torch
from pack_helpers import GRID, LAYER, TEXT, apply, call_patch, constructed_binding, direction, run_node

from nested_attention.capture import Capture, CaptureResult, SamplingRun, Window, token_grid
from nested_attention.patch import NestedAttentionPatch


def quadrant(y: int, x: int) -> int:
    return 2 * (y >= GRID // 2) + (x >= GRID // 2)


def test_source_map_names_the_token_each_region_reads_and_its_place_in_the_photo(pack, person):
    """Queries in quadrant i of the image point along nested key i: there the nested attention reads token i,
    and where it comes from in the photo is the Q-Former's map of query i."""
    binding = constructed_binding(person, positions=(2,), name="person")
    q = torch.stack([direction(quadrant(y, x)) for y in range(GRID) for x in range(GRID)])[None]  # (1, 16, 8)
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(1, TEXT, 8, generator=g), torch.randn(1, TEXT, 8, generator=g)
    run = SamplingRun(batch=1, latent=(16, 16))
    capture = Capture(Window(), token_grid(run.latent), run.batch)  # (4, 4): the layer's own grid
    run.captures.append(capture)
    out = call_patch(NestedAttentionPatch(LAYER, 0, [binding]), q, k, v, run)
    assert torch.equal(
        out, call_patch(NestedAttentionPatch(LAYER, 0, [binding]), q, k, v, None)
    )  # nothing changed
    result = capture.result(run.latent)
    (s,) = result.subjects
    assert s.source is person and s.num_tokens == person.encoder.config.num_tokens == 4

    query = pack.maps.subject_query_maps(person)  # (1, 4, 4, 4): the photo's 16 patches, per query
    for i, point in enumerate([(0.2, 0.2), (0.8, 0.3), (0.1, 0.9), (0.7, 0.6)]):
        best, heats = pack.maps.read_at(s, 0, point, 2, query)
        assert best[0][0] == i and best[0][1] > 0.999, best  # region i reads token i
        torch.testing.assert_close(heats[0], query[0, i], atol=1e-3 * float(query.max()), rtol=1e-3)
    # Drawn: the placement over a 64 x 64 image, the source map with a row per point.
    image = torch.rand(1, 64, 64, 3)
    placement = pack.maps.placement_images(result, image)
    sources = pack.maps.source_images(result, image, [(0.2, 0.2), (0.8, 0.3)], top=3)
    assert placement.shape == image.shape and sources.shape[0] == 1 and sources.shape[-1] == 3
    assert not torch.equal(placement, image)


def test_maps_node_draws_each_subject_and_refuses_what_it_cannot_draw(
    pack, tiny_unet, tiny_clip, pet, person, encode, sample
):
    text = "a photo of a person and a pet"
    model, _ = apply(pack, tiny_unet, tiny_clip, pet, text, token="pet")
    model, cond = apply(pack, model, tiny_clip, person, text, token="person")
    captured, sink = run_node(pack, "NestedAttentionCapture", model=model, start_percent=0.0, end_percent=1.0)
    image = torch.rand(1, 64, 64, 3)
    with pytest.raises(pack.maps.NestedMapsError, match="nothing was captured"):
        run_node(
            pack, "NestedAttentionMaps", capture=sink, image=image, points="", top_tokens=3, normalize="peak"
        )
    sample(captured, cond, encode(tiny_clip, ""), 0, steps=2)
    placement, sources = run_node(
        pack,
        "NestedAttentionMaps",
        capture=sink,
        image=image,
        points="0.5,0.5; 0.1,0.9",
        top_tokens=3,
        normalize="probability",
    )
    assert placement.shape == (1, 64, 64, 3) and 0 <= float(placement.min()) and float(placement.max()) <= 1
    assert sources.shape[0] == 1 and sources.shape[1] > 4 * 256  # two subjects, two points each
    with pytest.raises(pack.maps.NestedMapsError, match="2 images.*sampled 1"):
        run_node(
            pack,
            "NestedAttentionMaps",
            capture=sink,
            image=torch.rand(2, 64, 64, 3),
            points="",
            top_tokens=3,
            normalize="peak",
        )
    for bad, message in (("0.5", "is not 'x,y'"), ("1.5,0.2", "outside the image")):
        with pytest.raises(pack.maps.NestedMapsError, match=message):
            run_node(
                pack,
                "NestedAttentionMaps",
                capture=sink,
                image=image,
                points=bad,
                top_tokens=3,
                normalize="peak",
            )


def test_a_capture_range_without_an_active_subject_is_explained(pack):
    empty = pack.maps.CaptureSink()
    empty.publish(CaptureResult(subjects=[], batch=1, latent=(8, 8), steps=0))
    with pytest.raises(pack.maps.NestedMapsError, match="no step in the capture's start/end percent range"):
        run_node(
            pack,
            "NestedAttentionMaps",
            capture=empty,
            image=torch.rand(1, 64, 64, 3),
            points="",
            top_tokens=3,
            normalize="peak",
        )


def test_encoded_subject_keeps_what_its_maps_need_small(pack, pet):
    assert pet.photos.shape == (1, 32, 32, 3) and pet.clip_tokens.shape == (1, 17, 64) and pet.crop
    big = torch.rand(2, 1024, 800, 3)
    kept = pack.subject.display_copy(big)
    assert kept.shape == (2, 512, 400, 3) and kept.dtype == torch.float32
    torch.testing.assert_close(kept.mean(), big.mean(), atol=2e-3, rtol=0)


def test_region_outline_is_drawn_inside_each_region(pack):
    image = torch.zeros(40, 40, 3)
    left = torch.zeros(4, 4, dtype=torch.bool)
    left[:, :2] = True
    drawn = pack.maps.outline(pack.maps.outline(image, left, (255, 0, 0)), ~left, (0, 0, 255))
    assert drawn[20, 19, 0] == 1 and drawn[20, 20, 2] == 1  # the two sides of the border, in their colours
    assert drawn[20, 10].sum() == 0 and drawn[20, 30].sum() == 0  # inside, away from the border: untouched
