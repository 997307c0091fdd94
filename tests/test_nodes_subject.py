"""Encode Subject Image(s): tokens per photo concatenated, masks onto white, errors; saved subjects."""

from __future__ import annotations

import os

import comfy.utils
import folder_paths
import pytest
import torch
from pack_helpers import encode_subject, fingerprint, photos, run_node, validate_inputs

from nested_attention import concat_subject_tokens
from nested_attention.images import MaskError


def reference_tokens(handle, images):
    """What the paper prescribes: encode each photo with CLIP + Q-Former, then concatenate the tokens."""
    hidden = torch.cat(
        [handle.clip_vision.encode_image(images[i : i + 1])["last_hidden_state"] for i in range(len(images))]
    )
    with torch.no_grad():
        return concat_subject_tokens(handle.encoder.encode(hidden.float()))


def test_one_photo_gives_m_tokens_on_cpu_float32(pack, load_handle):
    handle = load_handle()
    subject = encode_subject(pack, handle, seed=0)
    assert subject.tokens.shape == (1, 8, 2048)
    assert subject.tokens.dtype == torch.float32 and subject.tokens.device.type == "cpu"
    assert subject.encoder is handle and subject.images == 1
    torch.testing.assert_close(subject.tokens, reference_tokens(handle, photos(0)))


def test_several_photos_concatenate_their_tokens_in_order(pack, load_handle):
    handle = load_handle()
    both = encode_subject(pack, handle, seed=3, n=2)
    images = photos(3, 2)
    assert both.tokens.shape == (1, 16, 2048) and both.images == 2
    torch.testing.assert_close(both.tokens, reference_tokens(handle, images))
    # Two different people in one batch: the same operation, tokens of each side by side (identities mix).
    first = encode_subject(pack, handle, seed=0)
    torch.testing.assert_close(both.tokens[:, :8], reference_tokens(handle, images[:1]))
    assert not torch.allclose(both.tokens[:, :8], first.tokens)


def test_mask_keeps_the_subject_and_whitens_the_rest(pack, load_handle):
    handle = load_handle()
    image = photos(1)
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 8:24] = 1.0
    composite = pack.subject.composite_on_white(image, mask)
    assert torch.equal(composite[:, 8:24, 8:24], image[:, 8:24, 8:24])
    assert torch.equal(composite[:, :8], torch.ones_like(composite[:, :8]))
    masked, seen = run_node(pack, "NestedAttentionEncodeSubject", encoder=handle, image=image, crop="center", mask=mask)
    assert torch.equal(seen, composite)  # the IMAGE output is what the encoder read
    torch.testing.assert_close(masked.tokens, reference_tokens(handle, composite))


def test_mask_of_another_size_is_resized_and_one_mask_serves_all_photos(pack):
    images = photos(2, 3)
    composite = pack.subject.composite_on_white(images, torch.ones(64, 64))
    torch.testing.assert_close(composite, images)


def test_mask_count_must_match_the_photos(pack):
    with pytest.raises(MaskError, match="one per image"):
        pack.subject.composite_on_white(photos(0, 3), torch.ones(2, 32, 32))


def test_empty_image_batch_is_an_error(pack, load_handle):
    handle = load_handle()
    with pytest.raises(pack.subject.SubjectError, match="no image"):
        run_node(pack, "NestedAttentionEncodeSubject", encoder=handle, image=torch.zeros(0, 32, 32, 3), crop="center", mask=None)


def test_encoding_reports_progress_to_comfy(pack, load_handle, monkeypatch):
    # What the user sees: a bar over 4 steps (3 photos + the Q-Former) that ends full. How often ComfyUI
    # passes updates on to its hook is its own business (0.33 throttles them; 0.3.75 passes each one).
    handle = load_handle()
    calls = []
    monkeypatch.setattr(
        comfy.utils,
        "PROGRESS_BAR_HOOK",
        lambda value, total, preview, node_id=None: calls.append((value, total)),
    )
    encode_subject(pack, handle, seed=0, n=3)
    assert calls and calls[-1] == (4, 4)
    assert all(total == 4 for _, total in calls)
    values = [value for value, _ in calls]
    assert values == sorted(values) and 1 <= values[0]


def test_saved_subject_loads_back_identically(pack, load_handle, tmp_path, monkeypatch):
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path / "output"))
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path / "input"))
    handle = load_handle(seed=5)
    subject = encode_subject(pack, handle, seed=0, n=2)
    result = run_node(pack, "NestedAttentionSaveSubject", subject=subject, filename_prefix="nested_attention_subjects/cat")
    saved = result["ui"]["subjects"][0]
    assert os.path.isfile(tmp_path / "output" / saved["subfolder"] / saved["filename"])
    listed = pack.subject.subject_files()
    assert listed == [f"nested_attention_subjects/{saved['filename']} [output]"]
    (loaded,) = run_node(pack, "NestedAttentionLoadSubject", encoder=handle, subject_file=listed[0])
    assert torch.equal(loaded.tokens, subject.tokens) and loaded.images == 2 and loaded.encoder is handle


def test_load_nested_subject_runs_again_when_its_file_changes(pack, load_handle, tmp_path, monkeypatch):
    # ComfyUI reuses a node's last output while what its IS_CHANGED / fingerprint_inputs gives is unchanged.
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path / "output"))
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path / "input"))
    handle = load_handle(seed=5)
    result = run_node(pack, "NestedAttentionSaveSubject", subject=encode_subject(pack, handle, n=1),
                      filename_prefix="nested_attention_subjects/cat")
    saved = result["ui"]["subjects"][0]
    path = tmp_path / "output" / saved["subfolder"] / saved["filename"]
    (listed,) = pack.subject.subject_files()
    node = pack.mappings["NestedAttentionLoadSubject"]
    first = fingerprint(node, encoder=["0", 0], subject_file=listed)
    assert fingerprint(node, encoder=["0", 0], subject_file=listed) == first  # a value, not NaN: reused
    pack.subject.save_subject(str(path), encode_subject(pack, handle, seed=1, n=2))  # saved over, larger
    assert fingerprint(node, encoder=["0", 0], subject_file=listed) != first
    second = fingerprint(node, encoder=["0", 0], subject_file=listed)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same size, touched
    assert fingerprint(node, encoder=["0", 0], subject_file=listed) != second


def test_a_subject_file_that_is_not_saved_is_refused_before_anything_runs(
    pack, load_handle, tmp_path, monkeypatch
):
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path / "output"))
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path / "input"))
    node = pack.mappings["NestedAttentionLoadSubject"]
    gone = "nested_attention_subjects/cat_00001_.safetensors [output]"
    message = validate_inputs(node, subject_file=gone)
    assert f"subject_file - saved subject {gone!r} is not in input/nested_attention_subjects" in message
    assert "found: no saved subject" in message and "Save it with Save Nested Subject" in message
    run_node(pack, "NestedAttentionSaveSubject", subject=encode_subject(pack, load_handle(seed=5)),
             filename_prefix="nested_attention_subjects/cat")
    assert validate_inputs(node, subject_file=gone) is True
    assert f"(found: {gone})" in validate_inputs(node, subject_file="elsewhere.safetensors")


@pytest.mark.parametrize("inputs", [{"crop": "middle"}, {"align": "yes"}])
def test_a_crop_or_align_that_is_not_a_choice_is_refused_before_anything_runs(pack, inputs):
    # ComfyUI 0.3.75 checks no V3 combo against its choices; the node does, on every host.
    node = pack.mappings["NestedAttentionEncodeSubject"]
    assert validate_inputs(node, crop="none", align="off", face_index=0) is True
    (name, value), = inputs.items()
    choices = {"crop": "'center', 'none'", "align": "'auto', 'off'"}[name]
    message = validate_inputs(node, **{"crop": "center", **inputs})
    assert f"{name} is {value!r}; expected one of {choices}." in message, message


def test_saved_subject_is_refused_by_another_encoder(pack, load_handle, tmp_path):
    subject = encode_subject(pack, load_handle(seed=5), seed=0)
    path = str(tmp_path / "s.safetensors")
    pack.subject.save_subject(path, subject)
    with pytest.raises(pack.subject.SubjectError, match="not with the connected"):
        pack.subject.load_subject(path, load_handle(seed=6))


# ------------------------------------------------------------------------------------------------
# Face alignment (the encoder's config asks for aligned faces)


def astronaut_batch(n: int = 1) -> torch.Tensor:
    """scikit-image's astronaut (NASA, public domain) as a ComfyUI IMAGE batch (n, 512, 512, 3)."""
    from skimage import data

    return (torch.from_numpy(data.astronaut()).float() / 255.0)[None].repeat(n, 1, 1, 1)


def test_face_encoder_aligns_the_photo_and_outputs_the_crop_it_encoded(pack, load_handle):
    from nested_attention import faces

    handle = load_handle(domain="faces", token="person", face_align="ffhq", face_size=64)
    photo = astronaut_batch()
    subject, seen = run_node(pack, "NestedAttentionEncodeSubject", encoder=handle, image=photo, crop="center")
    expected = faces.align_face(photo[0], size=64).image
    assert seen.shape == (1, 64, 64, 3)
    torch.testing.assert_close(seen[0], expected, atol=0, rtol=0)
    torch.testing.assert_close(subject.tokens, reference_tokens(handle, seen))
    # Turned off, the photo itself is encoded (CLIP's centre crop) and output.
    plain, seen_off = run_node(pack, "NestedAttentionEncodeSubject", encoder=handle, image=photo, crop="center", align="off")
    assert torch.equal(seen_off, photo)
    torch.testing.assert_close(plain.tokens, reference_tokens(handle, photo))


def test_encoders_without_face_alignment_leave_photos_alone(pack, load_handle):
    handle = load_handle()  # a pets encoder: face_align "none"
    photo = astronaut_batch()
    _, seen = run_node(pack, "NestedAttentionEncodeSubject", encoder=handle, image=photo, crop="center")
    assert torch.equal(seen, photo)


def test_no_face_names_the_image_and_the_way_out(pack, load_handle):
    handle = load_handle(domain="faces", token="person", face_align="ffhq", face_size=64)
    batch = torch.cat([astronaut_batch(), torch.full((1, 512, 512, 3), 0.5)])
    message = r"no face found in image 1 of the batch.*alignment off"
    with pytest.raises(pack.subject.SubjectError, match=message):
        run_node(pack, "NestedAttentionEncodeSubject", encoder=handle, image=batch, crop="center")
    with pytest.raises(pack.subject.SubjectError, match="face_index from 0 to 0"):
        run_node(pack, "NestedAttentionEncodeSubject", encoder=handle, image=batch[:1], crop="center", face_index=1)
    _, seen = run_node(pack, "NestedAttentionEncodeSubject", encoder=handle, image=batch, crop="center", align="off")
    assert seen.shape == (2, 512, 512, 3)


def test_face_alignment_settings_round_trip_through_the_weight_file(tmp_path, tiny_unet):
    from pack_helpers import tiny_encoder

    from nested_attention import EncoderConfig, read_config, save_encoder

    save_encoder(str(tmp_path / "f.safetensors"), tiny_encoder(tiny_unet, face_align="ffhq", face_size=256))
    config = read_config(str(tmp_path / "f.safetensors"))
    assert (config.face_align, config.face_size) == ("ffhq", 256)
    # Files written before the fields existed: face encoders read aligned faces, others do not.
    import json

    data = json.loads(config.to_json())
    del data["face_align"], data["face_size"]
    assert EncoderConfig.from_json(json.dumps({**data, "domain": "faces"})).face_align == "ffhq"
    assert EncoderConfig.from_json(json.dumps({**data, "domain": "pets"})).face_align == "none"
