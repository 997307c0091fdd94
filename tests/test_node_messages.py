"""What a user reads when a node refuses something: the node's display name first (ComfyUI's dialog title is
the class id), the CLIP vision model named even when it was connected, a file called what it is, and files
written with the mode any other file gets."""

from __future__ import annotations

import os
import stat

import folder_paths
import pytest
import torch
from pack_helpers import TINY_CLIP_VISION_SPEC, apply, photos, run_node
from safetensors.torch import save_file

from nested_attention_comfy.clip_vision import NestedEncoderLoadError
from nested_attention_comfy.words import SubjectWordError

JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + bytes(100)


def test_errors_raised_by_a_node_start_with_its_display_name(pack, models_folder, tiny_clip_vision, tiny_unet,
                                                             tiny_clip, pet, load_handle, tmp_path, monkeypatch):
    (models_folder.encoders / "photo.safetensors").write_bytes(JPEG)
    with pytest.raises(ValueError) as error:
        run_node(pack, "NestedAttentionLoadEncoder", encoder_name="photo.safetensors", clip_vision=tiny_clip_vision)
    assert str(error.value).startswith(f"{pack.display['NestedAttentionLoadEncoder']}: photo.safetensors is a JPEG")

    with pytest.raises(SubjectWordError) as error:
        apply(pack, tiny_unet, tiny_clip, pet, "a photo of a dog")
    assert str(error.value).startswith(f"{pack.display['NestedAttentionApply']}: the subject word 'pet' is not in")

    with pytest.raises(pack.subject.SubjectError) as error:
        run_node(pack, "NestedAttentionEncodeSubject", encoder=load_handle(), image=None, crop="center")
    assert str(error.value).startswith(f"{pack.display['NestedAttentionEncodeSubject']}: no image (shape None)")

    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path))
    (tmp_path / "nested_attention_subjects").mkdir()
    (tmp_path / "nested_attention_subjects" / "photo.safetensors").write_bytes(JPEG)
    with pytest.raises(pack.subject.SubjectError) as error:
        run_node(pack, "NestedAttentionLoadSubject", encoder=load_handle(),
                 subject_file="nested_attention_subjects/photo.safetensors")
    assert str(error.value).startswith(f"{pack.display['NestedAttentionLoadSubject']}: photo.safetensors is a JPEG")


def test_only_the_packs_own_errors_get_the_name_and_never_twice(pack):
    @pack.wires.names_the_node("Load Nested Encoder")
    def fails(error):
        raise error

    with pytest.raises(NestedEncoderLoadError, match="^Load Nested Encoder: x$"):
        fails(NestedEncoderLoadError("Load Nested Encoder: x"))  # already named: unchanged
    with pytest.raises(ValueError, match="^not ours$"):
        fails(ValueError("not ours"))  # Python's, ComfyUI's, torch's errors pass as they are


def test_a_connected_clip_vision_of_another_architecture_is_described_without_an_empty_name(
    pack, save_tiny_encoder
):
    import tiny_models

    name = save_tiny_encoder()
    wider = tiny_models.tiny_clip_vision(seed=0, hidden=96, heads=4)
    with pytest.raises(NestedEncoderLoadError) as error:
        run_node(pack, "NestedAttentionLoadEncoder", encoder_name=name, clip_vision=wider)
    message = str(error.value)
    assert "but the one connected to the clip_vision input is (width 96, 17 tokens, 2 layers, 32px)" in message
    assert f"trained with the CLIP vision model {TINY_CLIP_VISION_SPEC['name']} (width 64," in message
    assert "is  (" not in message


def test_a_saved_subject_file_that_is_not_one_is_refused_for_what_it_is(pack, load_handle, tmp_path):
    handle = load_handle()
    subject, _ = run_node(pack, "NestedAttentionEncodeSubject", encoder=handle, image=photos(0), crop="center")
    saved = tmp_path / "subject.safetensors"
    pack.subject.save_subject(str(saved), subject)
    tokens = subject.tokens.clone()
    cases = {
        "nan": ({"tokens": tokens.clone().index_fill_(2, torch.tensor([5]), float("nan"))},
                r"its 'tokens' hold 8 NaN or infinite value\(s\); they would give black images"),
        "ints": ({"tokens": tokens.long()}, r"its 'tokens' are I64, expected float32"),
        "extra": ({"tokens": tokens, "extra": torch.zeros(2)}, r"holds the tensors \['extra', 'tokens'\]; a saved"),
        "empty": ({"tokens": tokens[:, :0]}, r"tokens of shape \(1, 0, 2048\), expected \(1, n\*8, 2048\)"),
    }
    metadata = dict(__import__("safetensors").safe_open(str(saved), "pt").metadata())
    for name, (tensors, says) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        with pytest.raises(pack.subject.SubjectError, match=says):
            pack.subject.load_subject(str(path), handle)
    (tmp_path / "page.safetensors").write_bytes(b"<!doctype html><title>404</title>")
    with pytest.raises(pack.subject.SubjectError, match=r"^page.safetensors is a web page \(HTML\)"):
        pack.subject.load_subject(str(tmp_path / "page.safetensors"), handle)


def test_saved_subjects_and_exported_encoders_get_the_mode_of_any_new_file(pack, load_handle, save_tiny_encoder,
                                                                            models_folder, tmp_path):
    umask = os.umask(0o022)
    try:
        name = save_tiny_encoder("mode.safetensors")
        subject, _ = run_node(pack, "NestedAttentionEncodeSubject", encoder=load_handle(), image=photos(0),
                              crop="center")
        pack.subject.save_subject(str(tmp_path / "subject.safetensors"), subject)
    finally:
        os.umask(umask)
    assert stat.S_IMODE((models_folder.encoders / name).stat().st_mode) == 0o644  # safetensors alone: 0600
    assert stat.S_IMODE((tmp_path / "subject.safetensors").stat().st_mode) == 0o644
