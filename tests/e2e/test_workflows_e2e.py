"""The shipped workflows, end to end: a real ComfyUI server, its real frontend, the real nodes.

One ComfyUI server (a subprocess, `--cpu`, a throw-away `--base-directory`) runs with this pack and the
test-only pack tests/e2e/tiny_pack installed; one headless Chromium (Debian's) opens its frontend. For
every workflows/*.json the test
  - fetches it from the URL the template browser uses and loads it in the frontend: no missing node type,
    no widget value refused or changed, no alert; a screenshot goes to tests/artifacts/e2e/<name>.png;
  - takes the API prompt from the frontend (app.graphToPrompt), swaps the SDXL and CLIP vision loaders for
    the tiny ones (same outputs, same slot order), shrinks the latent and the step count, and runs it
    over HTTP; every Save Image must return an image;
  - runs the same prompt with every Apply node bypassed (its model passed through, its conditioning
    replaced by CLIP Text Encode of the same text): the images downstream of an Apply node must differ,
    all others must be identical.
The encoder files are real (tiny, written by conftest.py for the tiny UNet's layer table: the pack's own
format, and IP-Adapter Plus's layout for the IP-Adapter workflow), so the real Load Nested Encoder node loads
and validates them.
"""

from __future__ import annotations

import copy
import json
import urllib.parse
from io import BytesIO

import numpy as np
import pytest
from harness import ARTIFACTS_DIR, PACK_NAME, WORKFLOWS_DIR, Frontend
from PIL import Image

from devtools.workflows import TEMPLATE_PREFIX, WORKFLOWS

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

WORKFLOW_NAMES = sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))

# Heavy loaders and their tiny stand-ins from tests/e2e/tiny_pack (same outputs in the same order).
TINY_LOADERS = {
    "CheckpointLoaderSimple": "NestedAttentionTestTinyCheckpoint",
    "CLIPVisionLoader": "NestedAttentionTestTinyCLIPVision",
    "UNETLoader": "NestedAttentionTestTinyInpaintUNet",  # the SDXL inpainting UNet's workflow
}
# Nodes that run as shipped, cheap on a CPU once the loaders are tiny. Anything else in a workflow fails the
# test until it is put in one of these two tables.
RUNS_AS_SHIPPED = {
    "NestedAttentionLoadEncoder", "NestedAttentionEncodeSubject", "NestedAttentionApply", "LoadImage",
    "ImageBatch", "PrimitiveStringMultiline", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode",
    "SaveImage", "NestedAttentionCapture", "NestedAttentionMaps", "NestedAttentionQueryMaps",
    # inpainting and two people
    "InpaintModelConditioning", "ImageScaleBy", "SolidMask", "MaskComposite", "InvertMask",
}
APPLY = "NestedAttentionApply"
CAPTURE = "NestedAttentionCapture"
TINY_IMAGE_SIZE = 128  # pixels: a 16 x 16 latent for the tiny UNet
TINY_STEPS = 2
TINY_PHOTO_SCALE = 0.2  # the inpainting photo (640 x 427) to 128 x 85 pixels
TINY_INPAINT_SHAPE = (80, 128, 3)  # ... which InpaintModelConditioning crops to whole latent cells (8 px)


# ------------------------------------------------------------------------------------------------
# API prompt surgery


def tiny_prompt(prompt: dict) -> dict:
    """The frontend's API prompt with the heavy loaders swapped for tiny ones and a small, short sampling."""
    prompt = copy.deepcopy(prompt)
    for node_id, node in prompt.items():
        kind = node["class_type"]
        if kind in TINY_LOADERS:
            node["class_type"], node["inputs"] = TINY_LOADERS[kind], {}
        elif kind not in RUNS_AS_SHIPPED:
            raise AssertionError(f"node {node_id} is a {kind}, which this test does not know how to run on a "
                                 "CPU: add it to TINY_LOADERS (with a tiny stand-in) or to RUNS_AS_SHIPPED")
        if kind == "EmptyLatentImage":
            node["inputs"].update(width=TINY_IMAGE_SIZE, height=TINY_IMAGE_SIZE)
        elif kind == "KSampler":
            node["inputs"]["steps"] = TINY_STEPS
        elif kind == "ImageScaleBy":
            node["inputs"]["scale_by"] = TINY_PHOTO_SCALE
    return prompt


def is_link(value) -> bool:
    """An input that is a link [source node id, output slot] rather than a value."""
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int))


def bypass_capture(prompt: dict) -> dict:
    """The same prompt with every Capture Nested Attention node bypassed (its MODEL passed through) and what
    reads its capture removed (Nested Attention Maps and the nodes after it)."""
    prompt = copy.deepcopy(prompt)
    replaced = {}
    for node_id in [i for i, n in prompt.items() if n["class_type"] == CAPTURE]:
        replaced[(node_id, 0)] = prompt.pop(node_id)["inputs"]["model"]
    removed = {node_id for node_id, _ in replaced}
    while True:  # drop every node that reads a removed node's output other than the passed-through model
        gone = {i for i, n in prompt.items() for v in n["inputs"].values()
                if is_link(v) and v[0] in removed and tuple(v) not in replaced}
        if not gone:
            break
        removed |= gone
        for i in gone:
            prompt.pop(i)
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if is_link(value) and tuple(value) in replaced:
                node["inputs"][name] = replaced[tuple(value)]
    return prompt


def bypass_apply(prompt: dict) -> dict:
    """The same prompt with every Apply node bypassed (and the capture nodes, which need one: bypass_capture).

    Its MODEL output becomes its model input (passed through, as the frontend's bypass does), and its
    CONDITIONING output becomes a CLIP Text Encode of the same text with the same CLIP.
    """
    prompt = bypass_capture(prompt)
    replaced = {}
    next_id = max(int(i) for i in prompt) + 1
    for node_id in [i for i, n in prompt.items() if n["class_type"] == APPLY]:
        inputs = prompt.pop(node_id)["inputs"]
        encode_id, next_id = str(next_id), next_id + 1
        prompt[encode_id] = {"class_type": "CLIPTextEncode",
                             "inputs": {"text": inputs["text"], "clip": inputs["clip"]}}
        replaced[(node_id, 0)] = inputs["model"]
        replaced[(node_id, 1)] = [encode_id, 0]
    for node in prompt.values():
        for name, value in node["inputs"].items():
            while is_link(value) and tuple(value) in replaced:  # chained Apply nodes: on to the base model
                value = replaced[tuple(value)]
            node["inputs"][name] = value
    assert all(n["class_type"] != APPLY for n in prompt.values())
    return prompt


def upstream(prompt: dict, node_id: str) -> set[str]:
    """Every node `node_id` depends on, through its links."""
    seen, stack = set(), [node_id]
    while stack:
        for value in prompt[stack.pop()]["inputs"].values():
            if is_link(value) and value[0] not in seen:
                seen.add(value[0])
                stack.append(value[0])
    return seen


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(BytesIO(png)).convert("RGB"), dtype=np.float64)


# ------------------------------------------------------------------------------------------------
# Tests


def test_the_shipped_workflows_are_the_ones_the_tool_builds():
    assert WORKFLOW_NAMES == sorted(WORKFLOWS)
    for name in WORKFLOW_NAMES:
        assert (WORKFLOWS_DIR / f"{name}.jpg").is_file(), f"{name} has no thumbnail for the template browser"


def test_server_lists_the_pack_workflows_as_templates(comfy, frontend):
    templates = comfy.get_json("/workflow_templates")
    assert sorted(templates.get(PACK_NAME, [])) == WORKFLOW_NAMES, templates
    for name in WORKFLOW_NAMES:
        quoted = urllib.parse.quote(name)
        served = json.loads(comfy.get(f"/api/workflow_templates/{PACK_NAME}/{quoted}.json"))
        assert served == json.loads((WORKFLOWS_DIR / f"{name}.json").read_text())
        assert comfy.get(f"/api/workflow_templates/{PACK_NAME}/{quoted}.jpg")[:3] == b"\xff\xd8\xff"  # a JPEG

    # The frontend's template browser shows them under Extensions -> the pack, and opens one on a click.
    page = frontend.page
    frontend.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog = page.get_by_role("dialog")
    dialog.get_by_role("button", name=PACK_NAME).click()
    for name in WORKFLOW_NAMES:
        dialog.get_by_text(name, exact=True).first.wait_for()
    frontend.settle()  # the thumbnails loaded
    frontend.screenshot(ARTIFACTS_DIR / "template_browser.png")

    # Searching "nested" finds them all: the search reads only a custom node pack's file names (every
    # frontend tested), which all start with the pack's name.
    assert all(name.startswith(TEMPLATE_PREFIX) for name in WORKFLOW_NAMES), WORKFLOW_NAMES
    dialog.get_by_role("button", name="All Templates").first.click()
    search = dialog.get_by_role("textbox").first
    search.fill("qxzvk")  # no template has it: the search filters, and ours go
    dialog.get_by_text(WORKFLOW_NAMES[0], exact=True).first.wait_for(state="detached")
    search.fill("nested")
    for name in WORKFLOW_NAMES:
        dialog.get_by_text(name, exact=True).first.wait_for()
    frontend.settle()
    frontend.screenshot(ARTIFACTS_DIR / "template_browser_search.png")
    first = WORKFLOW_NAMES[0]
    dialog.get_by_text(first, exact=True).first.click()
    dialog.wait_for(state="hidden")
    expected = json.loads((WORKFLOWS_DIR / f"{first}.json").read_text())
    page.wait_for_function("(n) => window.app.graph.nodes.length === n", arg=len(expected["nodes"]))


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_shipped_workflow_loads_cleanly_and_runs(name, comfy, frontend):
    workflow = frontend.fetch_template(PACK_NAME, name)
    report = frontend.load_workflow(workflow, name)
    problems = Frontend.problems(report)
    assert not problems, f"{name} does not load cleanly in the frontend: {problems}"

    prompt = frontend.graph_to_prompt()
    applies = [i for i, n in prompt.items() if n["class_type"] == APPLY]
    saves = [i for i, n in prompt.items() if n["class_type"] == "SaveImage"]
    assert applies and saves, f"{name}: expected Apply Nested Attention and Save Image nodes in {prompt}"

    tiny = tiny_prompt(prompt)
    with frontend.frozen():
        with_subject = comfy.run_prompt(tiny)
        without = comfy.run_prompt(bypass_apply(tiny))

    for save in saves:
        assert len(with_subject.get(save, [])) == 1, f"{name}: Save Image #{save} returned no image"
        if save not in bypass_capture(tiny):  # saves a capture's maps: there is nothing to bypass it to
            continue
        assert len(without.get(save, [])) == 1, f"{name}: Save Image #{save} returned no image (bypassed)"
        a, b = pixels(with_subject[save][0]), pixels(without[save][0])
        inpainting = any(n["class_type"] == "InpaintModelConditioning" for n in tiny.values())
        sampled = any(tiny[u]["class_type"] == "KSampler" for u in upstream(tiny, save))
        expected = TINY_INPAINT_SHAPE if inpainting else (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)
        assert a.shape == b.shape and (not sampled or a.shape == expected)
        (ARTIFACTS_DIR / f"{name}.output-{save}.png").write_bytes(with_subject[save][0])
        (ARTIFACTS_DIR / f"{name}.output-{save}.bypassed.png").write_bytes(without[save][0])
        difference = np.abs(a - b).mean()
        if upstream(tiny, save) & set(applies):
            assert difference > 1.0, (f"{name}: Save Image #{save} barely changes with nested attention "
                                      f"(mean difference {difference:.3f})")
        else:
            assert difference == 0.0, (f"{name}: Save Image #{save} has no Apply node upstream, yet changed "
                                       f"(mean difference {difference})")
