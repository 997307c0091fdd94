"""The rule test_before_v3_e2e.py holds the pack's node definitions to (contract_breaks), on the frozen
definitions in tests/e2e/before_v3/object_info.json and changes made to them here: no server needed."""

from __future__ import annotations

import copy
import json

import pytest
from test_before_v3_e2e import BEFORE_V3, appended_widget_defaults, as_saved, contract_breaks

# With the browser tests (it needs no server): the rule travels with the e2e test that applies it.
pytestmark = [pytest.mark.e2e]

ENCODE = "NestedAttentionEncodeSubject"


@pytest.fixture
def encode() -> dict:
    return as_saved(json.loads((BEFORE_V3 / "object_info.json").read_text())[ENCODE])


def changed(node: dict, edit) -> dict:
    node = copy.deepcopy(node)
    edit(node)
    return node


def append_optional(name: str, spec: list):
    def edit(node):
        node["input"]["optional"][name] = spec
        node["input_order"]["optional"].append(name)
    return edit


def test_unchanged_and_appended_optional_inputs_are_allowed(encode):
    assert contract_breaks(encode, encode) == []
    marks = [["auto", "object", "background"], {"default": "auto", "tooltip": "What the mask marks."}]
    now = changed(encode, append_optional("mask_marks", marks))
    assert contract_breaks(encode, now) == []
    assert appended_widget_defaults(encode, now) == {"mask_marks": "auto"}
    link = changed(now, append_optional("extra_mask", ["MASK", {}]))  # an optional link: no widget
    assert contract_breaks(encode, link) == []
    assert appended_widget_defaults(encode, link) == {"mask_marks": "auto"}


def test_new_wording_of_the_help_texts_is_allowed(encode):
    def reword(node):
        node["description"] = "Encodes photos of one subject."
        node["input"]["optional"]["mask"][1]["tooltip"] = "White marks the subject."
        node["output_tooltips"] = ["The subject.", "What the encoder read."]
    assert contract_breaks(encode, changed(encode, reword)) == []


def _remove(node):
    del node["input"]["optional"]["align"]
    node["input_order"]["optional"].remove("align")


def _rename(node):
    node["input"]["optional"]["alignment"] = node["input"]["optional"].pop("align")
    node["input_order"]["optional"][1] = "alignment"


def _reorder(node):
    order = node["input_order"]["optional"]
    order[1], order[2] = order[2], order[1]


def _retype(node):
    node["input"]["optional"]["face_index"][0] = "FLOAT"


def _new_default(node):
    node["input"]["required"]["crop"][1]["default"] = "none"


def _append_required(node):
    node["input"]["required"]["size"] = ["INT", {"default": 224}]
    node["input_order"]["required"].append("size")


def _insert_optional_first(node):
    node["input"]["optional"]["strength"] = ["FLOAT", {"default": 1.0}]
    node["input_order"]["optional"].insert(0, "strength")


def _rename_output(node):
    node["output_name"] = ["subject", "images"]


def _rename_node(node):
    node["display_name"] = "Encode Subject"


@pytest.mark.parametrize("edit", [_remove, _rename, _reorder, _retype, _new_default, _append_required,
                                  _insert_optional_first, _rename_output, _rename_node,
                                  append_optional("mask_marks", [["auto", "object"], {}])])
def test_a_change_that_breaks_saved_workflows_is_named(encode, edit):
    breaks = contract_breaks(encode, changed(encode, edit))
    assert breaks, edit
    assert all(isinstance(b, str) and b for b in breaks)
