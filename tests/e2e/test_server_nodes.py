"""The node definitions load in a real ComfyUI server: /object_info lists them with their inputs and tooltips.

The server is the one the e2e tests share (tests/e2e/conftest.py): `main.py --cpu` with a throw-away
`--base-directory` whose custom_nodes/ links to this repo, so the ComfyUI tree is never touched.
"""

from __future__ import annotations

import pytest
from harness import FACES_ENCODER, PACK_NAME, PETS_ENCODER
from pack_helpers import combo_choices

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXPECTED = {
    "NestedAttentionLoadEncoder": (
        "Load Nested Encoder",
        {"encoder_name"},
        {"clip_vision"},
        ["NESTED_ENCODER"],
    ),
    "NestedAttentionEncodeSubject": (
        "Encode Subject Image(s)",
        {"encoder", "image", "crop"},
        {"mask", "align", "face_index", "mask_marks"},
        ["NESTED_SUBJECT", "IMAGE"],
    ),
    "NestedAttentionApply": (
        "Apply Nested Attention (token, λ)",
        {"model", "clip", "subject", "text", "token", "λ", "start_percent", "end_percent"},
        {"mask", "region"},
        ["MODEL", "CONDITIONING"],
    ),
    "NestedAttentionCapture": (
        "Capture Nested Attention",
        {"model", "start_percent", "end_percent", "sources"},
        set(),
        ["MODEL", "NESTED_CAPTURE"],
    ),
    "NestedAttentionMaps": (
        "Nested Attention Maps",
        {"capture", "image", "points", "top_tokens", "normalize"},
        set(),
        ["IMAGE", "IMAGE"],
    ),
    "NestedAttentionQueryMaps": ("Subject Query Maps", {"subject", "count"}, set(), ["IMAGE"]),
}
NO_TOOLTIP_NEEDED = {"model"}


def test_object_info_lists_the_three_nodes_with_inputs_and_tooltips(comfy):
    log = comfy.log_path.read_text(errors="replace")
    ours = [line for line in log.splitlines() if PACK_NAME in line]
    assert ours and not any("IMPORT FAILED" in line for line in ours), log[-4000:]
    info = comfy.get_json("/object_info")
    for node_id, (display, required, optional, outputs) in EXPECTED.items():
        assert node_id in info, f"{node_id} missing; server log:\n{log[-4000:]}"
        node = info[node_id]
        assert node["display_name"] == display
        assert node["category"] == "nested_attention" and node["description"]
        assert set(node["input"]["required"]) == required
        assert set(node["input"].get("optional", {})) == optional
        assert node["output"] == outputs
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                if name not in NO_TOOLTIP_NEEDED:
                    assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    # The registered models folder is what the loader lists (so extra_model_paths.yaml entries work too).
    listed = combo_choices(info["NestedAttentionLoadEncoder"]["input"]["required"]["encoder_name"])
    assert {FACES_ENCODER, PETS_ENCODER} <= set(listed), listed
    # λ starts at 1: under max(logit, λ·logit) a smaller λ cannot weaken the subject.
    lam = info["NestedAttentionApply"]["input"]["required"]["λ"]
    assert lam[0] == "FLOAT" and lam[1]["default"] == 1.0 and lam[1]["min"] == 1.0, lam


def test_the_lambda_widget_reads_lambda_in_the_frontend(frontend):
    """The frontend labels a widget with its input's name (ComfyUI 0.3.75 reads no per-input display name),
    so the name itself is "λ"; checked on a node the frontend builds from /object_info."""
    labels = frontend.evaluate(
        "() => { const node = window.LiteGraph.createNode('NestedAttentionApply');"
        " return node.widgets.map((w) => w.label ?? w.name); }"
    )
    assert "λ" in labels and not [label for label in labels if "lambda" in label], labels


def test_server_starts_without_a_traceback(comfy):
    # A missing dependency (torchaudio, which dev.py installs with torch) shows up as a traceback at
    # start-up, in ComfyUI's own modules or in a custom node pack's import.
    log = comfy.startup_log
    assert "Import times for custom nodes" in log, log[-3000:]  # the packs were loaded before it answered
    assert "Traceback" not in log and "IMPORT FAILED" not in log, log[-6000:]
