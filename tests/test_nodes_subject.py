"""Encode Subject Image(s): tokens per photo concatenated, masks onto white, errors; saved subjects."""

from __future__ import annotations

import dataclasses
import os

import comfy.utils
import folder_paths
import numpy as np
import pytest
import torch
from pack_helpers import (
    PET_PHOTO,
    cat_cutout_alpha,
    encode_subject,
    fingerprint,
    photos,
    run_comfy_node,
    run_node,
    validate_inputs,
)
from PIL import Image

from nested_attention import concat_subject_tokens
from nested_attention.images import MaskError
from nested_attention.weights import weights_fingerprint
from nested_attention_comfy.clip_vision import NestedEncoderLoadError, photo_tokens


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


def test_the_trainer_encodes_a_photo_exactly_as_the_node_does(pack, load_handle):
    """training.samples and the evaluation call nested_attention_comfy.clip_vision.photo_tokens; the node runs its two steps
    photo by photo. Both give the paper's tokens, and the same tokens to the bit."""
    handle = load_handle()
    images = photos(3, 2)
    subject = encode_subject(pack, handle, seed=3, n=2)
    trainer = torch.cat([photo_tokens(handle.clip_vision, handle.config.clip_vision, handle.encoder,
                                                images[i : i + 1]) for i in range(2)])  # (2, M, C)
    assert trainer.dtype == torch.float32 and trainer.device.type == "cpu"
    assert torch.equal(concat_subject_tokens(trainer), subject.tokens)
    torch.testing.assert_close(concat_subject_tokens(trainer), reference_tokens(handle, images))

    wider = dataclasses.replace(handle.config.clip_vision, hidden_size=96)  # a tower the encoder was not made for
    with pytest.raises(NestedEncoderLoadError, match=r"gave tokens of shape \(17, 64\); encoder"):
        photo_tokens(handle.clip_vision, wider, handle.encoder, images[:1])

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


def test_a_subject_saved_with_the_older_fingerprint_loads_with_its_encoder_only(pack, load_handle, tmp_path):
    """Subject files written before the fingerprints became one carry a 16-digit hash of the encoder's config and
    three of its weights (written out here as those files were made); they keep loading."""
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import save_file

    handle = load_handle(seed=5)
    assert handle.fingerprint == weights_fingerprint(handle.encoder)  # the one definition
    path = tmp_path / "s.safetensors"
    pack.subject.save_subject(str(path), encode_subject(pack, handle, seed=0))
    with safe_open(str(path), "pt") as f:
        metadata, tokens = f.metadata(), f.get_tensor("tokens")
    assert metadata["encoder_fingerprint"] == handle.fingerprint
    e = handle.encoder
    older = hashlib.sha256(e.config.to_json().encode())
    for tensor in (e.qformer.latents, e.qformer.proj_out.weight, e.projections[-1].to_v.weight[:8]):
        older.update(tensor.detach().float().numpy().tobytes())
    save_file({"tokens": tokens}, str(path), metadata={**metadata, "encoder_fingerprint": older.hexdigest()[:16]})
    assert torch.equal(pack.subject.load_subject(str(path), handle).tokens, tokens)
    with pytest.raises(pack.subject.SubjectError, match="not with the connected"):
        pack.subject.load_subject(str(path), load_handle(seed=6))


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
    batch = torch.cat([astronaut_batch(), photos(7, size=512)])  # noise: no face
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


def test_photos_go_through_clip_vision_in_one_call(pack, load_handle, monkeypatch):
    """Each CLIP call reads (on a CPU: casts) the tower's weights once, so the photos share one call."""
    handle = load_handle()
    sizes = []
    original = handle.clip_vision.encode_image

    def counting(image, crop=True):
        sizes.append(image.shape[0])
        return original(image, crop=crop)

    monkeypatch.setattr(handle.clip_vision, "encode_image", counting)
    subject = encode_subject(pack, handle, seed=3, n=3)
    assert sizes == [3]
    torch.testing.assert_close(subject.tokens, reference_tokens(handle, photos(3, 3)))
    sizes.clear()
    monkeypatch.setattr(pack.subject, "CLIP_PIXELS", 2 * 32 * 32)  # a bound of two 32 x 32 photos per call
    assert encode_subject(pack, handle, seed=3, n=3).tokens.shape == subject.tokens.shape and sizes == [2, 1]


# ------------------------------------------------------------------------------------------------
# Which side of the mask is the subject (Load Image's MASK is 1 - alpha; segmentation masks are 1 on the object)

def load_image(folder, name, monkeypatch):
    """ComfyUI's own Load Image node (the host's nodes.LoadImage) on `folder/name`: (IMAGE, MASK)."""
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(folder))
    image, mask = run_comfy_node("LoadImage", image=name)
    return image.float(), mask.float()


def on_white(rgb: np.ndarray, alpha: np.ndarray) -> torch.Tensor:
    """The reference: RGB (H, W, 3) uint8 composited over white by alpha (H, W) uint8, as (1, H, W, 3) float."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    return torch.from_numpy(rgb.astype(np.float64) / 255.0 * a + (1.0 - a)).float()[None]


def test_a_cutout_through_load_image_and_a_segmentation_mask_both_give_the_subject_on_white(
    pack, load_handle, tmp_path, monkeypatch
):
    rgb = np.asarray(Image.open(PET_PHOTO).convert("RGB"))
    alpha = cat_cutout_alpha(rgb.shape[1], rgb.shape[0])
    Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(tmp_path / "cat_cutout.png")
    image, mask = load_image(tmp_path, "cat_cutout.png", monkeypatch)
    # What Load Image gives (ComfyUI's convention): MASK = 1 - alpha, 1 on the transparent background.
    torch.testing.assert_close(mask[0], torch.from_numpy(1.0 - alpha / 255.0).float(), atol=1e-6, rtol=0)
    segmentation = torch.from_numpy(alpha / 255.0).float()[None]  # 1 on the object, as segmentation nodes give
    expected = on_white(rgb, alpha)
    handle = load_handle()

    def encoded(mask, **options):
        subject, seen = run_node(pack, "NestedAttentionEncodeSubject", encoder=handle, image=image, crop="center",
                                 mask=mask, **options)
        return subject, seen

    # The node's defaults (mask_marks auto): both give the cat on white, and that is what the encoder read.
    for given in (mask, segmentation):
        subject, seen = encoded(given)
        torch.testing.assert_close(seen, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(subject.tokens, reference_tokens(handle, seen))
    # The explicit choices say the same, and are taken literally: the wrong one keeps the background instead.
    torch.testing.assert_close(encoded(mask, mask_marks="background")[1], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(encoded(segmentation, mask_marks="subject")[1], expected, atol=1e-5, rtol=0)
    inverted = on_white(rgb, 255 - alpha)
    torch.testing.assert_close(encoded(mask, mask_marks="subject")[1], inverted, atol=1e-5, rtol=0)
    # The rule is stated where users read it.
    tooltip = pack.mappings["NestedAttentionEncodeSubject"].INPUT_TYPES()["optional"]["mask_marks"][1]["tooltip"]
    assert "border" in tooltip and "1 - alpha" in tooltip and "encoded_images" in tooltip


def test_load_images_mask_of_a_photo_without_transparency_leaves_the_photo_alone(pack, load_handle, tmp_path,
                                                                                 monkeypatch):
    (tmp_path / "cat.jpg").write_bytes(PET_PHOTO.read_bytes())
    image, mask = load_image(tmp_path, "cat.jpg", monkeypatch)
    assert mask.shape == (1, 64, 64) and float(mask.abs().max()) == 0.0  # Load Image's "no alpha" mask
    _, seen = run_node(pack, "NestedAttentionEncodeSubject", encoder=load_handle(), image=image, crop="center",
                       mask=mask)
    assert torch.equal(seen, image)


def test_auto_reads_each_mask_by_its_border_and_a_subject_may_touch_one_edge():
    from nested_attention.images import border_mean, mask_side, subject_mask

    h, w = 30, 40
    bottom = torch.zeros(h, w)
    bottom[18:, 10:30] = 1.0  # a person's shoulders: the subject touches the bottom edge
    # Border ring: 2*40 + 2*28 = 136 pixels, of which the bottom row's 20 are 1.
    assert border_mean(bottom) == pytest.approx(20 / 136)
    assert mask_side(bottom) == "subject" and mask_side(1 - bottom) == "background"
    assert mask_side(torch.full((h, w), 0.3)) is None
    half = torch.zeros(h, w)
    half[:, : w // 2] = 1.0  # a tie on the border (0.5): read as 1 = subject
    assert border_mean(half) == pytest.approx(0.5) and mask_side(half) == "subject"
    # A batch is read mask by mask; a mask that marks nothing keeps its photo whole.
    batch = torch.stack([bottom, 1 - bottom, torch.zeros(h, w)])
    keep, sides = subject_mask(batch)
    assert sides == ["subject", "background", None]
    assert torch.equal(keep, torch.stack([bottom, bottom, torch.ones(h, w)]))
    assert subject_mask(torch.zeros(1, h, w)) == (None, [None])
    assert torch.equal(subject_mask(bottom, "background")[0], 1 - bottom)
    with pytest.raises(MaskError, match="mask_marks is 'inverse'"):
        subject_mask(bottom, "inverse")


def test_the_trainers_masks_keep_their_meaning_whatever_the_border(tmp_path):
    """The trainer's alpha channels and mask files mean 1 = subject always: no side is guessed there."""
    from training.data.images import load_rgb

    photo = Image.new("RGB", (16, 16), (200, 40, 40))
    photo.save(tmp_path / "p.png")
    frame = np.zeros((16, 16), np.uint8)
    frame[:, :2] = frame[:, -2:] = frame[:2] = frame[-2:] = 255  # white on the whole border
    Image.fromarray(frame, mode="L").save(tmp_path / "p.mask.png")
    out = np.asarray(load_rgb(str(tmp_path / "p.png"), str(tmp_path / "p.mask.png")))
    assert (out[0, 0] == (200, 40, 40)).all() and (out[8, 8] == (255, 255, 255)).all()


# ------------------------------------------------------------------------------------------------
# Blank photos


def test_a_16_bit_png_through_load_image_is_refused_naming_the_cause_or_read_right(pack, load_handle, tmp_path,
                                                                                  monkeypatch):
    from skimage import data

    grey = data.camera().astype(np.uint16) * 257  # the full 16-bit range
    Image.fromarray(grey).save(tmp_path / "camera16.png")
    assert Image.open(tmp_path / "camera16.png").mode.startswith("I;16")
    image, _ = load_image(tmp_path, "camera16.png", monkeypatch)
    handle = load_handle()
    right = torch.from_numpy(np.round(grey / 257.0) / 255.0).float()
    if float(image.mean()) > 0.99:
        # ComfyUI 0.3.75's Load Image reads it as white (mean 254.999 of 255): refused, with the likely cause.
        with pytest.raises(pack.subject.SubjectError,
                           match=r"image 0 of the batch .* is blank .*16-bit PNG.*8-bit PNG or a JPEG"):
            run_node(pack, "NestedAttentionEncodeSubject", encoder=handle, image=image, crop="center")
    else:
        # ComfyUI 0.33's Load Image (through PyAV) reads it right: encoded as it is.
        torch.testing.assert_close(image[0, ..., 0], right, atol=1 / 255 + 1e-6, rtol=0)
        _, seen = run_node(pack, "NestedAttentionEncodeSubject", encoder=handle, image=image, crop="center")
        assert torch.equal(seen, image)


def test_blank_and_near_blank_photos_are_refused_and_a_subject_on_white_is_not(pack, load_handle):
    handle = load_handle()
    specks = torch.ones(1, 64, 64, 3)
    specks[0, :4, :8] = 0.0  # 32 of 4096 pixels (0.8 %) differ: still blank
    grey = torch.full((1, 32, 32, 3), 0.5)
    for blank, cause in ((specks, "16-bit PNG"), (grey, "node that made it")):
        batch = torch.cat([photos(0, size=blank.shape[1]), blank])
        with pytest.raises(pack.subject.SubjectError, match=rf"image 1 of the batch .* is blank.*{cause}"):
            run_node(pack, "NestedAttentionEncodeSubject", encoder=handle, image=batch, crop="center")
    # A subject on white that covers 2 % of the photo is a subject.
    small = torch.ones(1, 64, 64, 3)
    small[0, :8, :10] = photos(1, size=64)[0, :8, :10]
    _, seen = run_node(pack, "NestedAttentionEncodeSubject", encoder=handle, image=small, crop="center")
    assert torch.equal(seen, small)


def test_a_mask_that_leaves_nothing_is_refused_naming_the_mask(pack, load_handle):
    handle = load_handle()
    everything = torch.ones(1, 32, 32)  # with mask_marks "background": all background
    with pytest.raises(pack.subject.SubjectError, match=r"the mask leaves almost nothing of image 0.*'background'"):
        run_node(pack, "NestedAttentionEncodeSubject", encoder=handle, image=photos(0), crop="center",
                 mask=everything, mask_marks="background")
