"""See where the subject goes, through the real server and frontend: capturing changes nothing sampled,
and the maps come back (and are shown in the frontend's Save Image nodes)."""

from __future__ import annotations

import pytest
from harness import ARTIFACTS_DIR, PACK_NAME
from test_workflows_e2e import TINY_IMAGE_SIZE, bypass_capture, pixels, tiny_prompt

from devtools.workflows import see_where_the_subject_goes, workflow_name

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

NAME = workflow_name(see_where_the_subject_goes)


def test_capture_samples_the_same_image_and_the_maps_come_back(comfy, frontend):
    workflow = frontend.fetch_template(PACK_NAME, NAME)
    frontend.load_workflow(workflow, NAME)
    prompt = tiny_prompt(frontend.graph_to_prompt())
    kinds = {i: n["class_type"] for i, n in prompt.items()}
    saves = {
        kinds[n["inputs"]["images"][0]]: i
        for i, n in prompt.items()
        if n["class_type"] == "SaveImage" and kinds[n["inputs"]["images"][0]] != "NestedAttentionMaps"
    }
    maps_saves = {
        n["inputs"]["images"][1]: i
        for i, n in prompt.items()
        if n["class_type"] == "SaveImage" and kinds[n["inputs"]["images"][0]] == "NestedAttentionMaps"
    }
    image, queries = saves["VAEDecode"], saves["NestedAttentionQueryMaps"]
    # Queued under the page's client id, so that the frontend shows the outputs in the graph's nodes.
    client = frontend.evaluate("() => window.app.api.clientId")
    with frontend.frozen():
        captured = comfy.run_prompt(prompt, client_id=client)
        plain = comfy.run_prompt(bypass_capture(prompt))
    assert (pixels(captured[image][0]) == pixels(plain[image][0])).all(), (
        "capturing changed the sampled image"
    )

    placement, sources = (pixels(captured[maps_saves[k]][0]) for k in (0, 1))
    assert placement.shape == (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)
    assert not (placement == pixels(captured[image][0])).all()  # the map is drawn over the image
    assert sources.shape[0] > 3 * 256  # three points, a row each
    assert pixels(captured[queries][0]).shape[0] > 160
    for key, save in {
        "image": image,
        "placement": maps_saves[0],
        "sources": maps_saves[1],
        "queries": queries,
    }.items():
        (ARTIFACTS_DIR / f"{NAME}.{key}.png").write_bytes(captured[save][0])
    frontend.settle()  # the previews loaded
    frontend.screenshot(ARTIFACTS_DIR / f"{NAME}.after-run.png")
