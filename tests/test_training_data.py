"""Training data is never corrupted silently: each case is a file built here as real photo folders hold it.

EXIF rotation, RGBA cut-outs (white, not black), 16-bit PNGs, Latin-1 captions, tiny images, .tif/.gif,
unreadable files, masks from manifests / folders / tar shards, and the one scan before the models load.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tiny_models  # noqa: F401  (ComfyUI set-up first)
import torch
from PIL import Image
from trainer_runs import train

from nested_attention.images import composite_on_white
from training import data as data_lib
from training import images as images_lib
from training import scan as scan_lib
from training import shards as shards_lib

RULE = data_lib.CaptionRule("pet", ("dog", "cat", "pet"), "a photo of a {token}")
RED, BLUE = (255, 0, 0), (0, 0, 255)


def halves(width: int = 40, height: int = 20) -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(Image.new("RGB", (width // 2, height), RED), (0, 0))
    return image


def pixel(image: Image.Image, x: int, y: int) -> tuple:
    return image.convert("RGB").getpixel((x, y))


def test_exif_rotation_is_applied(tmp_path):
    # A phone holds the sensor's landscape pixels and says "turn 90 degrees clockwise" (orientation 6).
    exif = Image.Exif()
    exif[0x0112] = 6
    halves().save(tmp_path / "phone.jpg", quality=95, exif=exif)
    image = data_lib.open_image(str(tmp_path / "phone.jpg"))
    assert image.size == (20, 40)  # upright: portrait
    top, bottom = np.array(pixel(image, 10, 5)), np.array(pixel(image, 10, 34))
    assert np.abs(top - RED).max() < 40 and np.abs(bottom - BLUE).max() < 40  # the left edge went to the top


def test_rgba_cutout_lands_on_white_not_black(tmp_path):
    cutout = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # transparent black around the subject
    cutout.paste(Image.new("RGBA", (16, 16), (200, 100, 50, 255)), (8, 8))
    half = Image.new(
        "RGBA", (4, 4), (0, 0, 0, 128)
    )  # a half-transparent black edge: grey, as a compositor gives
    cutout.paste(half, (0, 28))
    cutout.save(tmp_path / "cutout.png")
    image = data_lib.open_image(str(tmp_path / "cutout.png"))
    assert image.mode == "RGB"
    assert pixel(image, 0, 0) == (255, 255, 255)
    assert pixel(image, 16, 16) == (200, 100, 50)
    assert pixel(image, 1, 30) == (127, 127, 127)  # 255 * (1 - 128/255)
    # Palette images with a transparent colour (GIF-style) too.
    cutout.convert("RGB").convert("P").save(tmp_path / "p.png", transparency=0)
    assert data_lib.open_image(str(tmp_path / "p.png")).getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_png_keeps_its_range(tmp_path):
    ramp = (np.arange(64, dtype=np.uint32)[None, :].repeat(8, 0) * 1040).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    image = np.asarray(data_lib.open_image(str(tmp_path / "deep.png")))
    expected = np.round(ramp.astype(np.float64) / 65535 * 255)
    np.testing.assert_allclose(image[..., 0], expected, atol=1)
    assert (
        image[..., 0] == image[..., 2]
    ).all() and image.mean() < 200  # grey, not the all-white of clipping


def test_tif_and_gif_are_read(tmp_path):
    halves().save(tmp_path / "a.tif")
    halves().save(tmp_path / "b.gif")
    records = data_lib.read_folder(tmp_path)
    assert [Path(r.input).name for r in records] == ["a.tif", "b.gif"]
    for record in records:
        image = data_lib.open_image(record.input)
        assert pixel(image, 2, 2) == RED and pixel(image, 37, 2) == BLUE


def test_latin1_caption_is_read_and_reported_with_file_and_line(tmp_path):
    halves().save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("un chien au caf\xe9".encode("latin-1"))
    report = data_lib.DataReport()
    (record,) = data_lib.read_folder(tmp_path, report)
    assert record.caption == "un chien au café"
    assert report.text_problems == ["a.txt line 1 is not UTF-8 (byte 0xe9); read as Latin-1/Windows-1252"]
    # A manifest written by an old tool: the bad line is found, the rest read.
    (tmp_path / "m.jsonl").write_bytes(
        b'{"input": "a.png", "caption": "a dog"}\n'
        + '{"input": "a.png", "caption": "a d\xf6g"}\n'.encode("latin-1")
    )
    report = data_lib.DataReport()
    records = data_lib.read_manifest(tmp_path / "m.jsonl", report)
    assert [r.caption for r in records] == ["a dog", "a dög"]
    assert "m.jsonl line 2 is not UTF-8" in report.text_problems[0]


def make_messy_folder(root: Path) -> Path:
    root.mkdir()
    halves(64, 64).save(root / "good.png")
    (root / "good.txt").write_text("a dog on the grass")
    halves(64, 64).save(root / "plain.jpg")  # no caption: the template
    halves(64, 64).save(root / "other.png")
    (root / "other.txt").write_text("a sunny meadow")  # no subject word
    halves(20, 20).save(root / "tiny.png")
    (root / "tiny.txt").write_bytes("a cat at the caf\xe9".encode("latin-1"))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "notes.pdf").write_bytes(b"%PDF-1.4")
    (root / "raw.heic").write_bytes(b"....")
    return root


def test_scan_names_every_problem_once_and_drops_unreadable_images(tmp_path, caplog):
    folder = make_messy_folder(tmp_path / "data")
    with caplog.at_level(logging.INFO, logger="training"):
        result = scan_lib.scan_data(str(folder), RULE, min_size=32, progress=True)
    assert [r.key for r in result.records] == ["good.png", "other.png", "plain.jpg", "tiny.png"]
    assert (
        result.readable == 4 and len(result.unreadable) == 1 and result.unreadable[0].startswith("broken.jpg")
    )
    assert result.report.ignored == ["notes.pdf", "raw.heic"]
    assert result.small == ["tiny.png (20x20)"]
    assert result.template == 1 and result.no_subject == ["other.png"]
    summary = [r.getMessage() for r in caplog.records if "training data" in r.getMessage()]
    assert len(summary) == 1  # one summary
    text = summary[0]
    for expected in (
        "4 readable, 1 unreadable",
        "broken.jpg",
        "notes.pdf",
        "raw.heic",
        "tiny.png (20x20)",
        "tiny.txt line 1 is not UTF-8",
        "1 have no caption (the template 'a photo of a pet' is used)",
        "1 have no subject word (the template is put in front; --subject_words sets the words), "
        "e.g. other.png",
    ):
        assert expected in text


def test_the_trainer_scans_before_any_model_loads(tmp_path, monkeypatch, caplog):
    from training import models as models_lib

    folder = make_messy_folder(tmp_path / "data")
    order = []
    monkeypatch.setattr(
        scan_lib, "scan_data", lambda *a, __f=scan_lib.scan_data, **k: order.append("scan") or __f(*a, **k)
    )

    def no_models(**_):
        order.append("models")
        raise RuntimeError("stop here: the models would load now")

    monkeypatch.setattr(models_lib, "load_frozen", no_models)
    with caplog.at_level(logging.INFO, logger="training"), pytest.raises(RuntimeError, match="stop here"):
        train(tmp_path / "o", "--train_data", str(folder), "--min_image_size", "32")
    assert order == ["scan", "models"]
    assert "broken.jpg" in caplog.text and "tiny.png (20x20)" in caplog.text


def test_unreadable_only_data_is_refused_before_the_models(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"nope")
    with pytest.raises(SystemExit, match="no readable training images"):
        train(tmp_path / "o", "--train_data", str(folder))


# ------------------------------------------------------------------------------------------------
# Pets on white: alpha, manifest masks, folder masks, shard masks, one compositing for trainer and node


def mask_image(size: int = 32) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(Image.new("L", (size // 2, size // 2), 255), (size // 4, size // 4))
    return mask


def expected_on_white(photo: Image.Image, mask: Image.Image) -> np.ndarray:
    """Plain numpy: photo where the mask is 1, white where it is 0."""
    m = np.asarray(mask, dtype=np.float64)[..., None] / 255
    return np.round(np.asarray(photo, dtype=np.float64) * m + 255 * (1 - m))


def test_masks_from_manifest_folder_and_shards_put_the_pet_on_white(tmp_path):
    photo = halves(32, 32)
    (tmp_path / "masks").mkdir()
    photo.save(tmp_path / "0001.png")
    mask_image().save(tmp_path / "masks" / "0001.png")
    expected = expected_on_white(photo, mask_image())
    (tmp_path / "manifest.jsonl").write_text(
        json.dumps({"input": "0001.png", "mask": "masks/0001.png"}) + "\n"
    )
    (record,) = data_lib.read_manifest(tmp_path / "manifest.jsonl")
    np.testing.assert_array_equal(np.asarray(data_lib.open_image(record.input, record.mask)), expected)

    folder = tmp_path / "folder"
    folder.mkdir()
    photo.save(folder / "rex.jpg", quality=100)
    mask_image().save(folder / "rex.mask.png")
    (record,) = data_lib.read_folder(folder)  # the mask is not a training image of its own
    assert record.mask.endswith("rex.mask.png")
    sample = data_lib.load_sample(record, data_lib.SampleConfig(32, 32, True, False, RULE, 0), 0)
    assert torch.equal(sample["pixels"][0, 0], torch.ones(3))  # corner: white
    assert torch.equal(sample["clip_pixels"][0, 0], torch.ones(3))

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, image in (("k1.png", photo), ("k1.mask.png", mask_image())):
            data = io.BytesIO()
            image.save(data, format="PNG")
            info = tarfile.TarInfo(name)
            info.size = len(data.getvalue())
            tar.addfile(info, io.BytesIO(data.getvalue()))
    (tmp_path / "s.tar").write_bytes(buffer.getvalue())
    (record,) = list(shards_lib.iter_tar_records(str(tmp_path / "s.tar")))
    np.testing.assert_array_equal(np.asarray(data_lib.open_image(record.input, record.mask)), expected)


def test_trainer_and_node_share_one_compositing(tmp_path):
    import pack_helpers  # noqa: F401  (the node pack's loader)
    from pack import load_pack

    subject = load_pack().nodes.subject
    assert subject.composite_on_white is composite_on_white
    # The trainer's alpha path gives what the node's MASK path gives for the same pixels (8-bit rounding).
    rgba = halves(32, 32).convert("RGBA")
    rgba.putalpha(mask_image())
    rgba.save(tmp_path / "cut.png")
    trained = images_lib.to_tensor(data_lib.open_image(str(tmp_path / "cut.png")))
    node = composite_on_white(
        images_lib.to_tensor(halves(32, 32))[None], images_lib.to_tensor(mask_image())[None, ..., 0]
    )
    torch.testing.assert_close(trained, node[0], atol=1 / 255, rtol=0)


def test_dry_run_previews_every_corruption_case_fixed(tmp_path):
    """The issue's check: upright, white-backed, correctly converted images for each case, no model loaded."""
    data = tmp_path / "data"
    data.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    halves(128, 64).save(data / "a_phone.jpg", quality=95, exif=exif)
    cut = Image.new("RGBA", (128, 128), (0, 0, 0, 0))
    cut.paste(Image.new("RGBA", (64, 64), (200, 100, 50, 255)), (32, 32))
    cut.save(data / "b_cutout.png")
    Image.fromarray(np.full((128, 128), 30000, np.uint16)).save(data / "c_deep.png")
    halves(128, 128).save(data / "d_photo.tif")
    (data / "d_photo.txt").write_bytes("a dog at the caf\xe9".encode("latin-1"))
    summary = train(tmp_path / "o", "--train_data", str(data), "--dry_run", "--subject_words", "cat,dog")
    assert summary["dry_run"] and len(summary["preview"]) == 4
    saved = json.loads((tmp_path / "o" / "args.json").read_text())
    assert saved["resolution"] == 64 and saved["dry_run"] is True
    assert not list((tmp_path / "o").glob("checkpoint-*"))
    panels = [np.asarray(Image.open(p).convert("RGB")) for p in summary["preview"]]
    from training.preview import preview_boxes
    from training.tiny import TINY_CLIP_VISION_CONFIG

    clip_box, target_box = preview_boxes(TINY_CLIP_VISION_CONFIG["image_size"], 64)
    size = target_box[2] - target_box[0]  # the 64 px target shown 4x: 256
    assert size == 256 and target_box[3] - target_box[1] == 256

    def target(i, x, y):
        return panels[i][target_box[1] + y, target_box[0] + x]

    # a_phone: turned upright, the red (left) half is now on top of the centre-cropped target.
    assert np.abs(target(0, 128, 10).astype(int) - RED).max() < 40
    assert np.abs(target(0, 128, size - 10).astype(int) - BLUE).max() < 40
    # b_cutout: white around the subject, in the encoder input and the target.
    assert tuple(panels[1][clip_box[1] + 5, clip_box[0] + 5]) == (255, 255, 255)
    assert tuple(target(1, 5, 5)) == (255, 255, 255)
    assert tuple(target(1, 128, 128)) == (200, 100, 50)
    # c_deep: 30000 / 65535 of full scale, grey, not white.
    assert abs(int(target(2, 128, 128)[0]) - round(30000 / 65535 * 255)) <= 1
    # d_photo.tif with its Latin-1 caption, the dog become the token.
    captions = (tmp_path / "o" / "data-preview" / "captions.tsv").read_text(encoding="utf-8")
    assert "\td_photo.tif\ta pet at the café" in captions


def test_subject_words_plurals_and_breeds_become_the_token():
    from training.presets import PRESETS

    rule = data_lib.CaptionRule("pet", ("puppy", "dog", "corgi"), "a photo of a {token}")
    # Plurals are recognised but not rewritten (training.captions: the encoder binds one subject; "two pet"
    # would teach the token a wrong meaning): the template goes in front and the scan counts them.
    assert rule.apply("two Puppies in the grass") == "a photo of a pet, two Puppies in the grass"
    assert rule.apply("my corgis at home") == "a photo of a pet, my corgis at home"
    assert rule.classify("my corgis at home") == "plural"
    assert rule.apply("my Corgi at home") == "my pet at home"
    assert rule.apply("a hotdogs stand") == "a photo of a pet, a hotdogs stand"  # whole words only
    people = data_lib.CaptionRule("person", PRESETS["faces"].subject_words, "a photo of a {token}")
    assert people.apply("two women laughing") == "a photo of a person, two women laughing"
    assert people.classify("two women laughing") == "plural"
    assert people.apply("a young actress smiling") == "a young person smiling"
    pets = data_lib.CaptionRule("pet", PRESETS["pets"].subject_words, "a photo of a {token}")
    assert pets.apply("a golden retriever on a sofa") == "a golden pet on a sofa"
    assert pets.classify("a sunny meadow") == "no_subject" and pets.classify("") == "template"
    assert pets.classify("a beagle") == "subject"


# ------------------------------------------------------------------------------------------------
# Paper-scale run shapes


def test_presets_reach_the_papers_global_batches_through_accumulation(monkeypatch):
    from training import run as trainer

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    faces = trainer.parse_args(["--domain", "faces"])
    assert faces.train_batch_size * faces.gradient_accumulation_steps == 32  # 512 px phase, one process
    assert faces.checkpoints_total_limit == 3
    assert (
        trainer.parse_args(["--domain", "faces", "--resolution", "1024"]).gradient_accumulation_steps * 4
        == 16
    )
    monkeypatch.setenv("WORLD_SIZE", "8")  # accelerate launch on 8 GPUs
    pets = trainer.parse_args(["--domain", "pets"])
    assert pets.train_batch_size * 8 * pets.gradient_accumulation_steps == 128
    assert (
        trainer.parse_args(
            ["--domain", "pets", "--gradient_accumulation_steps", "3"]
        ).gradient_accumulation_steps
        == 3
    )
    assert trainer.parse_args(["--domain", "tiny"]).gradient_accumulation_steps == 1
    # one default for every preset (training/test_training_data_prep.py: 0 keeps all)
    assert trainer.parse_args(["--domain", "tiny"]).checkpoints_total_limit == 3


def test_epochs_become_steps_after_the_scan(tmp_path, capsys):
    from training import run as trainer

    data = tmp_path / "data"
    data.mkdir()
    for i in range(10):
        halves(64, 64).save(data / f"{i}.png")
    (data / "bad.png").write_bytes(b"no")
    batch = ["--train_batch_size", "2", "--gradient_accumulation_steps", "2"]
    train(tmp_path / "o", "--train_data", str(data), "--dry_run", "--num_train_epochs", "3", *batch)
    assert json.loads((tmp_path / "o" / "args.json").read_text())["max_train_steps"] == 8  # ceil(3 * 10 / 4)
    with pytest.raises(SystemExit):
        trainer.parse_args(["--domain", "tiny", "--num_train_epochs", "2", "--max_train_steps", "5"])
    assert "not both" in capsys.readouterr().err


def test_resuming_with_another_batch_shape_is_named(tmp_path):
    from training.checkpoints import batch_mismatch

    def mismatch(state: dict):
        (tmp_path / "trainer_state-0.json").write_text(json.dumps(state))
        return batch_mismatch(tmp_path, world=1, batch_size=4, accumulation=8)

    state = {"world": 1, "train_batch_size": 4, "gradient_accumulation_steps": 8}
    assert mismatch(state) is None
    assert "processes 2 -> 1" in mismatch({**state, "world": 2})
    warning = mismatch({"world": 4, "train_batch_size": 2})
    assert "processes 4 -> 1" in warning and "batch size per device 2 -> 4" in warning


def test_a_real_resume_with_another_batch_size_warns(tmp_path, caplog):
    from training.tiny import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", count=4, size=64)
    common = ("--train_data", str(data), "--checkpointing_steps", "1")
    train(tmp_path / "o", *common, "--max_train_steps", "1", "--train_batch_size", "2")
    state = json.loads((tmp_path / "o" / "checkpoint-1" / "trainer_state-0.json").read_text())
    assert (state["train_batch_size"], state["gradient_accumulation_steps"]) == (2, 1)
    resume = ["--max_train_steps", "2", "--train_batch_size", "1", "--resume_from_checkpoint", "latest"]
    with caplog.at_level(logging.WARNING, logger="training"):
        train(tmp_path / "o", *common, *resume)
    assert "batch size per device 2 -> 1" in caplog.text
