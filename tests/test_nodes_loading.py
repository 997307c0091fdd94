"""The pack as ComfyUI loads it; Load Nested Encoder: folders, validation, the CLIP vision model it needs."""

from __future__ import annotations

import logging
import os
import sys

import comfy.clip_vision
import comfy.model_patcher
import folder_paths
import pytest
import torch
from comfy_api.latest import io
from pack import REPO, load_pack, unload_pack
from pack_helpers import (
    TINY_CLIP_VISION_SPEC,
    combo_choices,
    input_specs,
    run_async,
    run_node,
    validate_inputs,
)

from nested_attention import NestedWeightsError

NODE_IDS = ["NestedAttentionLoadEncoder", "NestedAttentionEncodeSubject", "NestedAttentionApply"]


def test_pack_exports_the_three_nodes_with_their_display_names(pack):
    assert {pack.display[i] for i in NODE_IDS} == {
        "Load Nested Encoder",
        "Encode Subject Image(s)",
        "Apply Nested Attention (token, λ)",
    }
    for node_id, cls in pack.mappings.items():
        assert node_id.startswith("NestedAttention")
        assert cls.CATEGORY == "nested_attention" and cls.DESCRIPTION
        for name, (_, options) in input_specs(cls).items():
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert tuple(pack.mappings["NestedAttentionLoadEncoder"].RETURN_TYPES) == ("NESTED_ENCODER",)
    assert tuple(pack.mappings["NestedAttentionEncodeSubject"].RETURN_TYPES) == ("NESTED_SUBJECT", "IMAGE")
    assert tuple(pack.mappings["NestedAttentionApply"].RETURN_TYPES) == ("MODEL", "CONDITIONING")


def test_comfyui_registers_the_nodes_through_comfy_entrypoint(pack, monkeypatch):
    """ComfyUI's own load_custom_node, as the server runs it at start-up for custom_nodes/<pack>."""
    import nodes  # ComfyUI's

    registries = ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "EXTENSION_WEB_DIRS", "LOADED_MODULE_DIRS")
    for registry in registries:
        monkeypatch.setattr(nodes, registry, dict(getattr(nodes, registry)))
    # A pack with NODE_CLASS_MAPPINGS is registered from them, and its comfy_entrypoint is never called.
    assert not hasattr(pack.module, "NODE_CLASS_MAPPINGS")
    module_name = str(REPO).replace(".", "_x_")  # load_custom_node's name for a pack folder
    try:
        assert run_async(nodes.load_custom_node(str(REPO))) is True
    finally:
        unload_pack(module_name)
    for node_id, ours in pack.mappings.items():
        registered = nodes.NODE_CLASS_MAPPINGS[node_id]
        assert issubclass(registered, io.ComfyNode) and registered.__name__ == ours.__name__
        assert registered.__module__.startswith(f"{module_name}.nodes.")
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == pack.display[node_id]
    assert len(pack.mappings) == len(pack.module.nodes.NODES) >= 5
    assert nodes.EXTENSION_WEB_DIRS[REPO.name] == str(REPO / "web")  # web/save_subject.js


def test_pack_leaves_comfy_nodes_module_first_and_makes_the_core_importable(pack):
    comfy_root = os.path.dirname(folder_paths.__file__)
    assert sys.path.index(str(REPO)) > sys.path.index(comfy_root)
    import nodes  # ComfyUI's own module, never ours

    assert os.path.dirname(os.path.abspath(nodes.__file__)) == comfy_root
    assert pack.apply.__name__ == "nested_attention_pack.nodes.apply"


def test_init_registers_the_models_folder_without_clobbering_extra_model_paths(monkeypatch, tmp_path):
    extra = str(tmp_path / "from_yaml")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "nested_attention", ([extra], set()))
    try:
        load_pack("nested_attention_pack_fresh")
        paths, extensions = folder_paths.folder_names_and_paths["nested_attention"]
        assert paths[0] == extra
        assert os.path.join(folder_paths.models_dir, "nested_attention") in paths
        assert ".safetensors" in extensions
    finally:
        unload_pack("nested_attention_pack_fresh")


def test_encoder_list_comes_from_the_registered_folder(pack, save_tiny_encoder, models_folder):
    name = save_tiny_encoder("listed.safetensors")
    choices = combo_choices(input_specs(pack.mappings["NestedAttentionLoadEncoder"])["encoder_name"])
    assert name in choices


def test_load_encoder_wraps_it_for_comfy_memory_management(pack, load_handle, tiny_clip_vision):
    handle = load_handle()
    assert isinstance(handle.patcher, comfy.model_patcher.ModelPatcher)
    assert handle.patcher.model is handle.encoder
    assert handle.clip_vision is tiny_clip_vision
    assert handle.config.token == "pet" and not handle.encoder.training


def test_missing_encoder_file_error_lists_the_folders_searched(pack, models_folder, tiny_clip_vision):
    with pytest.raises(pack.loader.NestedEncoderLoadError) as error:
        run_node(pack, "NestedAttentionLoadEncoder", encoder_name="nope.safetensors", clip_vision=tiny_clip_vision)
    assert "nope.safetensors" in str(error.value) and str(models_folder.encoders) in str(error.value)


def test_missing_encoder_file_is_answered_at_validation_with_the_folder_and_sources(
    pack, save_tiny_encoder, models_folder
):
    # ComfyUI runs the node's validation instead of its own list check for encoder_name, before any node runs.
    loader = pack.mappings["NestedAttentionLoadEncoder"]
    name = save_tiny_encoder("present.safetensors")
    assert validate_inputs(loader, encoder_name=name) is True
    message = validate_inputs(loader, encoder_name="faces-encoder.safetensors")
    assert "Value not in list" not in message
    lines = message.split("encoder_name - ", 1)[1].splitlines()  # the node's own message
    # A short first line (what is missing), then the folders searched, where each kind goes, where to get each.
    assert lines[0] == "Load Nested Encoder: encoder file 'faces-encoder.safetensors' not found."
    assert lines[1:4] == [
        "Folders searched:",
        f"  models/nested_attention: {models_folder.encoders} (found there: present.safetensors)",
        f"  models/ipadapter: {models_folder.ipadapter} (found there: no .safetensors file)",
    ]
    assert lines[4:7] == [
        "Which file goes where:",
        ("  the pack's encoders (from its trainer or nested_attention.convert) and the authors' encoder -> "
         "models/nested_attention"),
        "  IP-Adapter Plus SDXL files (ip-adapter-plus*_sdxl_vit-h.safetensors) -> models/ipadapter",
    ]
    assert lines[7] == "Where to get one:"
    sources = lines[8:11]
    assert sources[0].startswith("  - IP-Adapter Plus SDXL (Apache-2.0), into models/ipadapter: https://")
    assert "ip-adapter-plus-face_sdxl_vit-h.safetensors" in sources[0]
    assert "into models/nested_attention: https://huggingface.co/orpatashnik/NestedAttentionEncoder" in sources[1]
    assert "into models/nested_attention: python -m training.run" in sources[2]
    assert lines[11].startswith("Then press R")
    # An IP-Adapter file is never sent to models/nested_attention (the old message did).
    assert not [line for line in lines if "ip-adapter" in line.lower() and "models/nested_attention" in line]


def test_init_creates_the_models_folder_and_only_warns_when_it_cannot(monkeypatch, tmp_path, caplog):
    models = tmp_path / "models"
    monkeypatch.setattr(folder_paths, "models_dir", str(models))
    monkeypatch.delitem(folder_paths.folder_names_and_paths, "nested_attention", raising=False)
    monkeypatch.delitem(folder_paths.folder_names_and_paths, "ipadapter", raising=False)
    try:
        load_pack("nested_attention_pack_fresh")
        assert (models / "nested_attention").is_dir()
        assert (models / "ipadapter").is_dir()  # where the errors and the workflows send IP-Adapter Plus files
    finally:
        unload_pack("nested_attention_pack_fresh")
    blocked = tmp_path / "read-only"
    blocked.write_text("a file where the models folder would be, so nothing can be created under it")
    monkeypatch.setattr(folder_paths, "models_dir", str(blocked))
    monkeypatch.delitem(folder_paths.folder_names_and_paths, "nested_attention", raising=False)
    monkeypatch.delitem(folder_paths.folder_names_and_paths, "ipadapter", raising=False)
    try:
        with caplog.at_level(logging.WARNING):
            load_pack("nested_attention_pack_fresh")
        assert "[nested-attention] cannot create" in caplog.text
        assert str(blocked / "nested_attention") in caplog.text and str(blocked / "ipadapter") in caplog.text
    finally:
        unload_pack("nested_attention_pack_fresh")


def test_damaged_encoder_file_gets_the_core_validation_error(pack, models_folder, tiny_clip_vision):
    (models_folder.encoders / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(NestedWeightsError, match="junk.safetensors"):
        run_node(pack, "NestedAttentionLoadEncoder", encoder_name="junk.safetensors", clip_vision=tiny_clip_vision)


def test_clip_vision_of_another_architecture_is_refused_at_load(pack, save_tiny_encoder):
    import tiny_models

    name = save_tiny_encoder()
    wider = tiny_models.tiny_clip_vision(seed=0, hidden=96, heads=4)
    with pytest.raises(pack.loader.NestedEncoderLoadError) as error:
        run_node(pack, "NestedAttentionLoadEncoder", encoder_name=name, clip_vision=wider)
    message = str(error.value)
    assert "width 64" in message and "width 96" in message and TINY_CLIP_VISION_SPEC["name"] in message


def test_clip_vision_of_same_architecture_but_other_name_only_warns(pack, tiny_clip_vision, caplog):
    from nested_attention import ClipVisionSpec

    with caplog.at_level(logging.WARNING):
        pack.loader.check_clip_vision(
            ClipVisionSpec(**TINY_CLIP_VISION_SPEC),
            tiny_clip_vision,
            "other_vit.safetensors",
            "enc.safetensors",
        )
    assert "other_vit.safetensors" in caplog.text and "same architecture" in caplog.text


def test_unconnected_clip_vision_is_loaded_by_the_name_the_encoder_file_gives(
    pack, save_tiny_encoder, models_folder, tiny_clip_vision, monkeypatch
):
    name = save_tiny_encoder()
    # ComfyUI's loader only knows full-size towers, so the file's content is stood in for.
    (models_folder.clip_vision / TINY_CLIP_VISION_SPEC["name"]).write_bytes(b"stand-in")
    loaded = []
    monkeypatch.setattr(comfy.clip_vision, "load", lambda path: loaded.append(path) or tiny_clip_vision)
    (handle,) = run_node(pack, "NestedAttentionLoadEncoder", encoder_name=name)
    assert loaded == [str(models_folder.clip_vision / TINY_CLIP_VISION_SPEC["name"])]
    assert handle.clip_vision is tiny_clip_vision


def test_missing_clip_vision_file_error_lists_the_folders_and_the_alternative(
    pack, save_tiny_encoder, models_folder
):
    name = save_tiny_encoder()
    with pytest.raises(pack.loader.NestedEncoderLoadError) as error:
        run_node(pack, "NestedAttentionLoadEncoder", encoder_name=name)
    message = str(error.value)
    assert TINY_CLIP_VISION_SPEC["name"] in message and str(models_folder.clip_vision) in message
    assert "Load CLIP Vision" in message


def test_fingerprint_tells_encoders_apart(pack, load_handle):
    a, a_again, b = load_handle(seed=1), load_handle(seed=1), load_handle(seed=2)
    assert a.fingerprint == a_again.fingerprint != b.fingerprint
    assert torch.equal(a.encoder.qformer.latents, a_again.encoder.qformer.latents)
