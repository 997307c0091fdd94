"""The two-people workflow's regions, through the real server: each Apply node's MASK, made by core mask nodes
(Solid Mask, Mask Composite, Invert Mask) as the frontend queues them, is one half of the image, and the two
halves are disjoint and cover it. (The whole workflow runs, with and without its Apply nodes, in
test_workflows_e2e.py; the math of the regions is tested in tests/test_two_people.py.)"""

from __future__ import annotations

import re

import numpy as np
import pytest
from harness import ARTIFACTS_DIR, PACK_NAME
from test_workflows_e2e import APPLY, is_link, pixels, upstream

from devtools.workflows import two_people_left_and_right, workflow_name

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

NAME = workflow_name(two_people_left_and_right)


def test_each_person_gets_one_half_of_the_image_from_core_mask_nodes(comfy, frontend):
    workflow = frontend.fetch_template(PACK_NAME, NAME)
    assert not frontend.problems(frontend.load_workflow(workflow, NAME))
    prompt = frontend.graph_to_prompt()
    applies = {n["inputs"]["token"]: i for i, n in prompt.items() if n["class_type"] == APPLY}
    assert set(applies) == {"man", "woman"}
    # One prompt for both, holding both words; the woman's node takes the man's MODEL (chained).
    texts = {prompt[i]["inputs"]["text"][0] for i in applies.values()}
    assert len(texts) == 1
    text = prompt[texts.pop()]["inputs"]["value"]
    assert re.search(r"\bman\b", text) and re.search(r"\bwoman\b", text), text
    assert prompt[applies["woman"]]["inputs"]["model"] == [applies["man"], 0]

    # Run only the mask nodes of each Apply node, each mask shown as an image.
    run, saves = {}, {}
    for n, (word, apply_id) in enumerate(sorted(applies.items())):
        link = prompt[apply_id]["inputs"]["mask"]
        assert is_link(link), f"the {word} Apply node has no MASK input"
        for node_id in upstream(prompt, apply_id) & ({link[0]} | upstream(prompt, link[0])):
            run[node_id] = prompt[node_id]
        run[f"{900 + n}"] = {"class_type": "MaskToImage", "inputs": {"mask": link}}
        run[f"{910 + n}"] = {
            "class_type": "SaveImage",
            "inputs": {"images": [f"{900 + n}", 0], "filename_prefix": f"regions/{word}"},
        }
        saves[word] = f"{910 + n}"
    assert {prompt[i]["class_type"] for i in run if i in prompt} == {
        "SolidMask",
        "MaskComposite",
        "InvertMask",
    }
    with frontend.frozen():
        images = comfy.run_prompt(run)
    regions = {}
    for word, save in saves.items():
        (png,) = images[save]
        (ARTIFACTS_DIR / f"{NAME}.region-{word}.png").write_bytes(png)
        regions[word] = pixels(png)[..., 0] / 255.0  # (H, W): the mask, 1 = the subject's region
    man, woman = regions["man"], regions["woman"]
    height, width = man.shape
    assert man.shape == woman.shape and width == height  # the image's shape (the latent is square)
    assert np.all(man[:, : width // 2] == 1) and np.all(man[:, width // 2 :] == 0)  # left half
    assert np.all(woman + man == 1)  # the right half: disjoint, and together they cover the image
