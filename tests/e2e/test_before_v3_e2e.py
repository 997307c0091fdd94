"""Workflows saved with the nodes as they were before the V3 schema (commit 7d6341d) load and run unchanged.

tests/e2e/before_v3/ holds what users have on disk:
  - workflows/: the six shipped workflows exactly as they were at 7d6341d (byte for byte; the shipped ones
    in workflows/ may change, these never do);
  - object_info.json: what the server's /object_info said about the pack's five nodes at 7d6341d (ComfyUI
    0.3.75; 0.33.0 said the same), less `python_module` (the pack's folder name).
A saved workflow refers to a node by its id, to inputs and outputs by name and slot, and stores its widget
values by position: all of that must stay as it was, on every host. Inputs may be added after the last
optional one (a widget with a default that keeps the old behaviour, or an optional link): a saved workflow
has no value for them, and the frontend fills in the default (contract_breaks says what is allowed).
"""

from __future__ import annotations

import json

import pytest
from harness import ARTIFACTS_DIR, E2E_DIR, Frontend
from test_workflows_e2e import APPLY, TINY_IMAGE_SIZE, pixels, tiny_prompt

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

BEFORE_V3 = E2E_DIR / "before_v3"
SAVED_WORKFLOWS = sorted(p.stem for p in (BEFORE_V3 / "workflows").glob("*.json"))
# What a node definition says that saved workflows and the frontend rely on (names, order, types, widget
# defaults and ranges), and what users read (display names, categories, descriptions, tooltips).
CONTRACT = ("name", "display_name", "category", "description", "output_node", "input", "input_order",
            "output", "output_is_list", "output_name", "output_tooltips")
# Choices read from a folder when /object_info is asked: the saved subjects depend on what ran before.
FOLDER_LISTS = {"subject_file"}


def as_saved(node: dict) -> dict:
    """A node definition from /object_info in the form of before_v3/object_info.json.

    The V3 schema serves the same definition in another spelling, mapped back here and nothing else:
    a combo is ("COMBO", {"options": [...]}) rather than ([...], {}), with "multiselect": false; a string
    input says "multiline": false; an output node declares the hidden PROMPT and EXTRA_PNGINFO inputs it
    is given (ComfyUI passes them to every output node); outputs without a tooltip are listed as null.
    """
    node = json.loads(json.dumps({key: node[key] for key in CONTRACT if key in node}))
    for section in ("input", "input_order"):
        node[section].pop("hidden", None)
    for inputs in node["input"].values():
        for name, spec in inputs.items():
            kind, options = spec[0], dict(spec[1]) if len(spec) > 1 else {}
            if kind == "COMBO":
                kind = options.pop("options")
                assert options.pop("multiselect", False) is False, f"{name}: a multiselect combo"
            if options.get("multiline") is False:
                del options["multiline"]
            if name in FOLDER_LISTS:
                kind = "<files>"
            inputs[name] = [kind, options]
    if not any(node.get("output_tooltips", [])):
        node.pop("output_tooltips", None)
    return node


# What users read and no saved workflow holds: its wording may change.
HELP_TEXTS = ("description", "output_tooltips")
# Input kinds drawn as widgets: a saved workflow stores their values by position.
WIDGET_KINDS = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def without_help(spec: list) -> list:
    """An input's [kind, options] without its tooltip."""
    return [spec[0], {key: value for key, value in spec[1].items() if key != "tooltip"}]


def contract_breaks(before: dict, now: dict) -> list[str]:
    """What in node definition `now` (as_saved form) breaks workflows saved with `before`; [] if nothing.

    Allowed: optional inputs appended after the last optional one, each widget among them with a default
    (the value the frontend gives a workflow saved without it), and new wording of the help texts (the
    description and tooltips: no workflow stores them). Everything else must be as it was: the required
    inputs, the optional inputs before the appended ones (names, order, kinds, options), the outputs, the
    node's name, display name and category.
    """
    breaks = [f"{key} changed: {before.get(key)!r} -> {now.get(key)!r}" for key in CONTRACT
              if key not in (*HELP_TEXTS, "input", "input_order") and before.get(key) != now.get(key)]
    for section in ("required", "optional"):
        old, new = before["input_order"].get(section, []), now["input_order"].get(section, [])
        if new[:len(old)] != old:
            breaks.append(f"{section} inputs removed, renamed or reordered: {old} -> {new}")
        elif section == "required" and new != old:
            breaks.append(f"required inputs added: {new[len(old):]} (only optional ones may be appended)")
        for name in (name for name in old if name in new):
            was, is_now = (without_help(node["input"][section][name]) for node in (before, now))
            if is_now != was:
                breaks.append(f"{section} input {name!r} changed: {was} -> {is_now}")
        for name in new[len(old):] if new[:len(old)] == old else []:
            kind, options = now["input"][section][name]
            if (isinstance(kind, list) or kind in WIDGET_KINDS) and "default" not in options:
                breaks.append(f"appended widget {name!r} has no default for workflows saved without it")
    return breaks


def appended_widget_defaults(before: dict, now: dict) -> dict[str, object]:
    """The widgets appended to `now`'s optional inputs after `before`'s, with their defaults."""
    old = before["input_order"].get("optional", [])
    new = now["input_order"].get("optional", [])[len(old):]
    specs = {name: now["input"]["optional"][name] for name in new}
    return {name: options["default"] for name, (kind, options) in specs.items() if "default" in options}


def test_object_info_says_what_it_said_before_v3(comfy):
    saved = json.loads((BEFORE_V3 / "object_info.json").read_text())
    info = comfy.get_json("/object_info")
    for node_id, before in saved.items():
        assert node_id in info, f"{node_id} is gone: workflows saved with it no longer load"
        assert not contract_breaks(as_saved(before), as_saved(info[node_id])), (
            node_id, contract_breaks(as_saved(before), as_saved(info[node_id])))


@pytest.mark.parametrize("name", SAVED_WORKFLOWS)
def test_workflow_saved_before_v3_loads_and_runs(name, comfy, frontend):
    workflow = json.loads((BEFORE_V3 / "workflows" / f"{name}.json").read_text())
    saved_info = json.loads((BEFORE_V3 / "object_info.json").read_text())
    info = comfy.get_json("/object_info")
    added = {node_id: appended_widget_defaults(as_saved(before), as_saved(info[node_id]))
             for node_id, before in saved_info.items()}
    assert added["NestedAttentionEncodeSubject"] and added[APPLY], added  # mask_marks, region
    report = frontend.load_workflow(workflow, name)
    frontend.screenshot(ARTIFACTS_DIR / f"before-v3.{name}.png")
    # The widgets added since come after the saved values, at their defaults: the frontend would now save
    # the old values followed by them, nothing else changed.
    def compact(values: list) -> str:
        return json.dumps(values, separators=(",", ":"), ensure_ascii=False)

    filled = {f"#{n['id']} {n['type']}: widget values {compact(n['widgets_values'])} became "
              f"{compact([*n['widgets_values'], *added[n['type']].values()])} on load"
              for n in workflow["nodes"] if added.get(n["type"])}
    report["widgetErrors"] = [error for error in report["widgetErrors"] if error not in filled]
    problems = Frontend.problems(report)
    assert not problems, f"{name} (saved before V3) does not load cleanly: {problems}"

    prompt = frontend.graph_to_prompt()
    for node in prompt.values():  # and run with them (the values that keep the old behaviour)
        for widget, default in added.get(node["class_type"], {}).items():
            assert node["inputs"].get(widget) == default, (name, node["class_type"], widget, node["inputs"])
    saves = [i for i, n in prompt.items() if n["class_type"] == "SaveImage"]
    assert saves and any(n["class_type"] == APPLY for n in prompt.values()), prompt
    with frontend.frozen():
        images = comfy.run_prompt(tiny_prompt(prompt))
    for save in saves:
        assert len(images.get(save, [])) == 1, f"{name}: Save Image #{save} returned no image"
        assert pixels(images[save][0]).shape == (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)
