"""The trainer's data preparation flags on the tiny domain: captions and subject words, --dry_run's args.json
and data preview, labelled sample grids (also from tar shards), paper-scale batch sizes and epochs,
the checkpoint limit and the resume warning.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tiny_models  # noqa: F401  (ComfyUI set-up first)
from PIL import Image
from test_training import make_shards
from trainer_runs import run_trainer, tiny_argv, train

from training.data import dataset as data_lib
from training.data.captions import CaptionRule, caption_counts, plural_forms
from training.loop import checkpoints as checkpoints_lib
from training.loop import config as train_config
from training.loop import preview as preview_lib
from training.loop import trainer
from training.presets import PRESETS

TEMPLATE = "a photo of a {token}"


def no_models(monkeypatch):
    """Make loading the models fail the test: a dry run must stop before it."""

    def refuse(config):
        raise AssertionError("the dry run loaded the models")

    monkeypatch.setattr(trainer, "load_frozen_models", refuse)


def image_folder(folder: Path, captions: dict[str, str | None], size=(80, 64)) -> Path:
    """PNG files named by `captions`' keys, each its own colour, a sidecar .txt where a caption is given."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, caption) in enumerate(captions.items()):
        Image.new("RGB", size, (30 * i, 200 - 20 * i, 90)).save(folder / name)
        if caption is not None:
            (folder / name).with_suffix(".txt").write_text(caption)
    return folder


# ------------------------------------------------------------------------------------------------
# Captions and subject words


def test_pet_captions_replace_one_run_of_subject_words_and_leave_plurals_alone():
    rule = CaptionRule(token="pet", subject_words=PRESETS["pets"].subject_words + ("pet",), template=TEMPLATE)
    cases = {
        "A Golden Retriever puppy on the grass": ("subject", "A Golden pet on the grass"),
        "the DOG's ball": ("subject", "the pet's ball"),
        "a dog with two cats": ("subject", "a pet with two cats"),
        "a Shih Tzu on a sofa": ("subject", "a pet on a sofa"),
        "two dogs on a couch": ("plural", "a photo of a pet, two dogs on a couch"),
        "three puppies": ("plural", "a photo of a pet, three puppies"),
        "a hotdog stand": ("no_subject", "a photo of a pet, a hotdog stand"),
        "   ": ("template", "a photo of a pet"),
    }
    for caption, (kind, expected) in cases.items():
        assert (rule.classify(caption), rule.apply(caption)) == (kind, expected), caption
    assert rule.apply(None) == "a photo of a pet"
    # The record's own subject word wins over the list.
    assert rule.apply("my dog and Rex the corgi", subject="corgi") == "my dog and Rex the pet"


def test_face_captions_handle_role_words_and_irregular_plurals():
    rule = CaptionRule(token="person", subject_words=PRESETS["faces"].subject_words, template=TEMPLATE)
    assert rule.apply("two women and a man at a table") == "two women and a person at a table"
    assert rule.classify("a group of people") == "plural"
    assert rule.apply("a group of people") == "a photo of a person, a group of people"
    assert rule.apply("A smiling Lady in a hat") == "A smiling person in a hat"
    assert rule.classify("a mannequin") == "no_subject"  # whole words only
    assert [sorted(plural_forms(w)) for w in ("puppy", "guy", "man", "child", "box", "shih tzu")] == [
        ["puppies"], ["guys"], ["men"], ["children"], ["boxes"], ["shih tzus"],
    ]


def test_subject_words_flag_overrides_the_preset(capsys):
    assert train_config.parse_args(["--domain", "pets"]).subject_words == PRESETS["pets"].subject_words
    assert {"dog", "cat", "puppy", "kitten", "pet", "corgi"} <= set(PRESETS["pets"].subject_words)
    assert {"man", "woman", "person", "boy", "girl", "lady", "guy"} <= set(PRESETS["faces"].subject_words)
    config = train_config.parse_args(["--domain", "pets", "--subject_words", "axolotl", "newt"])
    assert config.subject_words == ("axolotl", "newt")
    with pytest.raises(SystemExit):
        train_config.parse_args(["--domain", "pets", "--subject_words", " "])
    assert "--subject_words needs at least one word" in capsys.readouterr().err


def test_caption_report_counts_each_kind_once_before_the_models_load(tmp_path, monkeypatch, caplog):
    folder = image_folder(
        tmp_path / "data",
        {
            "a.png": "a dog on the grass",
            "b.png": "a pet in the snow",
            "c.png": None,
            "d.png": "a quiet landscape",
            "e.png": "two dogs playing",
            "f.png": "a Dog asleep",
        },
    )
    no_models(monkeypatch)
    with caplog.at_level(logging.INFO, logger="training"):
        train(tmp_path / "out", "--train_data", str(folder), "--subject_words", "dog", "--dry_run")
    # one caption line, in the data scan's one summary (training.data.scan)
    reports = [line for r in caplog.records for line in r.getMessage().splitlines() if "captions of" in line]
    assert reports == [
        (
            "[nested-attention] captions of 6 records: 2 name the subject (rewritten to 'pet'); 1 already use "
            "'pet'; 1 have no caption (the template 'a photo of a pet' is used); 1 have no subject word (the "
            "template is put in front; --subject_words sets the words), e.g. d.png; 1 name the subject only in "
            "the plural (not rewritten; the template is put in front), e.g. e.png"
        )
    ]
    records = data_lib.read_folder(folder)
    rule = CaptionRule("pet", ("dog", "pet"), TEMPLATE)
    assert {k: v for k, v in caption_counts(rule, records).items() if v} == {
        "subject": ["a.png", "f.png"],
        "token": ["b.png"],
        "template": ["c.png"],
        "no_subject": ["d.png"],
        "plural": ["e.png"],
    }


# ------------------------------------------------------------------------------------------------
# --dry_run and labelled grids


def enlarge(pixels, factor: int) -> np.ndarray:
    """(H, W, 3) in [0, 1] -> uint8, each pixel a factor x factor block (nearest enlarging's reference)."""
    values = (pixels.numpy() * 255).round().astype(np.uint8)
    return np.kron(values, np.ones((factor, factor, 1), dtype=np.uint8))


def test_dry_run_writes_args_json_and_a_preview_of_processed_samples(tmp_path, monkeypatch):
    captions = {f"{i}.png": f"a pet number {i}" for i in range(6)}
    folder = image_folder(tmp_path / "data", captions, size=(96, 64))
    no_models(monkeypatch)
    out = tmp_path / "out"
    flags = ["--train_data", str(folder), "--dry_run", "--num_train_epochs", "2"]
    summary = train(out, *flags)
    assert summary["dry_run"] and len(summary["preview"]) == 4
    assert not list(out.glob("checkpoint-*")) and not (out / "tiny-encoder.safetensors").exists()
    # args.json: the frozen config, every setting resolved (the epochs made 6 steps: 2 x 6 records / batch 2).
    parsed = train_config.parse_args(tiny_argv(out, *flags))
    expected = json.loads(json.dumps(dataclasses.asdict(dataclasses.replace(parsed, max_train_steps=6))))
    assert json.loads((out / "args.json").read_text()) == expected
    # sample-0: the CLIP crop (32 px, shown x8) and the target crop (64 px, shown x4), as training makes them.
    record = data_lib.read_folder(folder)[0]
    rule = CaptionRule("pet", ("pet",), TEMPLATE)
    sample = data_lib.load_sample(record, data_lib.SampleConfig(64, 32, True, False, rule, 0), 0)
    shown = np.asarray(Image.open(out / "data-preview" / "sample-0.png").convert("RGB"))
    image, ((clip_box, target_box),) = preview_lib.preview_image(record, sample, 32, 64)
    np.testing.assert_array_equal(shown, np.asarray(image))
    crop = lambda box: shown[box[1] : box[3], box[0] : box[2]]
    np.testing.assert_array_equal(crop(clip_box), enlarge(sample["clip_pixels"], 8))
    np.testing.assert_array_equal(crop(target_box), enlarge(sample["pixels"], 4))
    # the target is 96 x 64: resized to 96 x 64 and cropped in the middle, not squashed
    assert sample["time_ids"].tolist() == [64, 96, 0, 16, 64, 64]


def test_dry_run_on_tar_shards_previews_the_start_of_the_stream(tmp_path, monkeypatch, caplog):
    shards = make_shards(tmp_path / "shards", shards=2, per_shard=3)  # s1-1 is not an image
    no_models(monkeypatch)
    with caplog.at_level(logging.INFO, logger="training"):
        summary = train(
            tmp_path / "out", "--train_data", str(Path(shards[0]).parent), "--subject_words", "dog",
            "--dry_run",
        )
    assert [Path(p).name for p in summary["preview"]] == [f"sample-{i}.png" for i in range(4)]
    # the scan reads the whole stream once; s1-1 is unreadable, so 5 captions are counted
    report = "captions of 5 samples of the shards: 5 name the subject (rewritten to 'pet')"
    assert report in caplog.text
    records = preview_lib.first_records("shards", shards, [], 4)
    assert [r.key for r in records] == ["000.tar:s0-0", "000.tar:s0-1", "000.tar:s0-2", "001.tar:s1-0"]


def test_labelled_grid_keeps_every_cell_exact_and_writes_labels_around_them():
    colours = [[(1.0, 0.0, 0.0), (0.0, 1.0, 0.0)], [(0.0, 0.0, 1.0), (1.0, 1.0, 1.0)]]
    cells = [[np.ones((64, 64, 3)) * np.array(c) for c in row] for row in colours]
    rows, columns = ["no subject", "subject 1"], ["a prompt | seed 0", "seed 1"]
    grid, boxes = preview_lib.labelled_grid(cells, rows, columns)
    pixels = np.asarray(grid)
    assert [[(b[2] - b[0], b[3] - b[1]) for b in row] for row in boxes] == [[(256, 256)] * 2] * 2  # 64 px x 4
    for r, row in enumerate(boxes):
        for c, (left, top, right, bottom) in enumerate(row):
            np.testing.assert_array_equal(pixels[top:bottom, left:right], enlarge(torch_of(cells[r][c]), 4))
    top = boxes[0][0][1]
    assert (pixels[:top, boxes[0][0][0] :] < 100).any()  # column labels in the header
    assert (pixels[top : boxes[0][0][3], : boxes[0][0][0]] < 100).any()  # a row label left of row 0


def test_preview_labels_draw_accents_and_wrap_long_file_names_whole():
    from PIL import Image, ImageDraw

    face = preview_lib.font(20)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def drawn(text):
        image = Image.new("L", (60, 40), 0)
        ImageDraw.Draw(image).text((5, 5), text, fill=255, font=face)
        return np.asarray(image)

    unassigned = drawn("\u0378")  # no font has it: the 'missing glyph' box
    for letter in "éëüçñ":
        assert not np.array_equal(drawn(letter), unassigned), letter  # drawn, not as a box
    name = "café-au-lait-cat-photographed-on-the-sofa-2024-05-01_IMG_4821.png"
    lines = preview_lib.wrap(draw, f"{name} x", 120, face)
    assert "".join(lines)[: len(name)] == name  # every character kept, in order
    assert all(draw.textlength(line, font=face) <= 120 for line in lines)
    assert lines[0].endswith("-")  # cut after a separator where one fits


def torch_of(array):
    import torch

    return torch.from_numpy(array)


# ------------------------------------------------------------------------------------------------
# Paper-scale runs: global batch, epochs, checkpoint limit, resume warning


@pytest.mark.parametrize(
    "flags, world, expected",
    [
        (["--domain", "faces"], 1, (4, 8, 32)),
        (["--domain", "faces"], 4, (4, 2, 32)),  # the paper: 4 GPUs, global 32 at 512
        (["--domain", "faces", "--resolution", "1024"], 8, (2, 1, 16)),  # 8 GPUs, 16 at 1024: batch lowered
        (["--domain", "pets"], 8, (4, 4, 128)),
        (["--domain", "pets", "--resolution", "1024"], 8, (4, 1, 32)),
        (["--domain", "faces", "--train_batch_size", "8"], 1, (8, 4, 32)),
        (["--domain", "pets", "--global_batch_size", "64", "--train_batch_size", "2"], 2, (2, 16, 64)),
        (["--domain", "pets", "--gradient_accumulation_steps", "2"], 1, (4, 2, 8)),  # flags win over presets
        (["--domain", "tiny"], 1, (2, 1, 2)),
        (["--domain", "tiny"], 2, (2, 1, 4)),
    ],
)
def test_global_batch_splits_into_per_device_batch_and_accumulation(flags, world, expected, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    config = train_config.parse_args(flags)
    assert (config.train_batch_size, config.gradient_accumulation_steps, config.global_batch_size) == expected
    assert config.num_processes == world
    assert config.train_batch_size * world * config.gradient_accumulation_steps == config.global_batch_size


@pytest.mark.parametrize(
    "flags, world, message",
    [
        (["--domain", "faces"], 3, "--global_batch_size 32 must be --train_batch_size 4 x 3 process(es)"),
        (["--domain", "pets", "--global_batch_size", "30", "--train_batch_size", "4"], 1, "a multiple of 4"),
        (["--domain", "faces", "--gradient_accumulation_steps", "2", "--global_batch_size", "32"], 1,
         "--gradient_accumulation_steps (derived when not given; 2 here)"),
        (["--domain", "tiny", "--num_train_epochs", "2", "--max_train_steps", "5"], 1, "give one"),
        (["--domain", "tiny", "--num_train_epochs", "0"], 1, "--num_train_epochs must be positive"),
        (["--domain", "tiny", "--checkpoints_total_limit", "-1"], 1, "0 (keep all) or a positive number"),
        (["--domain", "tiny", "--train_batch_size", "0"], 1, "--train_batch_size must be at least 1"),
        (["--domain", "tiny", "--gradient_accumulation_steps", "0"], 1, "--gradient_accumulation_steps must be"),
    ],
)
def test_batch_and_length_flags_that_do_not_fit_are_refused(flags, world, message, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(SystemExit) as e:
        train_config.parse_args(flags)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_epochs_refuse_tar_shards_and_set_steps_from_the_data_size(tmp_path, capsys):
    (tmp_path / "000.tar").write_bytes(b"")
    with pytest.raises(SystemExit):
        train_config.parse_args(["--domain", "tiny", "--num_train_epochs", "1", "--train_data", str(tmp_path)])
    assert "tar shards do not tell" in capsys.readouterr().err
    config = train_config.parse_args(
        ["--domain", "tiny", "--num_train_epochs", "2.5", "--train_batch_size", "3"]
        + ["--gradient_accumulation_steps", "2"]
    )
    assert config.max_train_steps is None and config.global_batch_size == 6
    assert config.with_epochs(100).max_train_steps == 42  # ceil(2.5 x 100 / 6)
    with pytest.raises(SystemExit, match="tar shards do not tell"):  # shards found at the default path
        config.with_epochs(0)
    assert train_config.parse_args(["--domain", "tiny"]).with_epochs(100).max_train_steps == 30  # the preset's


def test_checkpoints_keep_three_by_default_and_zero_keeps_all(tmp_path):
    assert {train_config.parse_args(["--domain", d]).checkpoints_total_limit for d in PRESETS} == {3}
    keep_all = train_config.parse_args(["--domain", "tiny", "--checkpoints_total_limit", "0"])
    assert keep_all.checkpoints_total_limit == 0
    for step in (1, 2, 3, 4, 5):
        complete_checkpoint(tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-6").mkdir()  # no completion marker: not counted, not pruned
    checkpoints_lib.prune(tmp_path, 0)
    assert len(list(tmp_path.glob("checkpoint-*"))) == 6
    checkpoints_lib.prune(tmp_path, 3)  # pruned once checkpoint-5 is complete: 3, 4 and 5 stay
    names = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert names == ["checkpoint-3", "checkpoint-4", "checkpoint-5", "checkpoint-6"]


def complete_checkpoint(folder, files=None):
    """A checkpoint folder as `Checkpoints.save` leaves it: its files written into checkpoint-N.partial, the
    completion marker, the rename. `files`: {name: text} (default: one stand-in model file)."""
    partial = folder.with_name(folder.name + checkpoints_lib.PARTIAL)
    partial.mkdir()
    for name, text in (files or {"model.safetensors": "x" * 10}).items():
        (partial / name).write_text(text)
    checkpoints_lib.finalize(partial, folder, int(folder.name.split("-")[1]))


class FakeAccelerator:
    """What Checkpoints.resume asks of accelerate, without a model."""

    def __init__(self, world: int):
        self.num_processes, self.process_index, self.is_main_process = world, 0, True
        self.loaded = None

    def load_state(self, folder):
        self.loaded = folder


def test_resuming_with_another_batch_layout_warns(tmp_path, caplog):
    folder = tmp_path / "checkpoint-4"
    state = checkpoints_lib.ProcessState(
        global_step=4, batches=8, world=2, weights_sha256="a", initial_weights_sha256="b",
        train_batch_size=4, gradient_accumulation_steps=2,
    )
    complete_checkpoint(folder, {f"trainer_state-{rank}.json": json.dumps(dataclasses.asdict(state)) for rank in (0, 1)})

    def resume(world, batch, accumulation):
        caplog.clear()
        checkpoints = checkpoints_lib.Checkpoints(
            accelerator=FakeAccelerator(world), output_dir=tmp_path, limit=3, encoder_file="x", export=None
        )
        with caplog.at_level(logging.WARNING, logger="training"):
            position = checkpoints.resume("latest", accumulation, None, batch)
        assert position.global_step == 4
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    assert resume(2, 4, 2) == []
    (warning,) = resume(1, 2, 2)
    assert "processes 2 -> 1, batch size per device 4 -> 2" in warning and "data order" in warning
    (warning,) = resume(2, 4, 1)
    assert "gradient accumulation steps 2 -> 1" in warning


def test_faces_dry_run_reads_the_clip_size_from_the_file_and_never_opens_sdxl(tmp_path, monkeypatch):
    """A faces run's settings and preview without SDXL: the checkpoint file is not even a safetensors file."""
    import torch
    from safetensors.torch import save_file

    clip = tmp_path / "clip_vision_h.safetensors"  # ViT-H/14's embedding shapes: 16 x 16 patches of 14 px
    save_file(
        {
            "vision_model.embeddings.position_embedding.weight": torch.zeros(257, 1280),
            "vision_model.embeddings.patch_embedding.weight": torch.zeros(1280, 3, 14, 14),
        },
        str(clip),
    )
    sdxl = tmp_path / "sd_xl_base_1.0.safetensors"
    sdxl.write_bytes(b"not loaded by a dry run")
    data = image_folder(tmp_path / "data", {"crop.png": None, "wild.png": None}, size=(300, 200))
    (data / "manifest.jsonl").write_text(
        '{"input": "crop.png", "target": "wild.png", "caption": "a Woman on a boat"}\n'
    )
    no_models(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "1")
    out = tmp_path / "out"
    summary = run_trainer(
        ["--domain", "faces", "--pretrained_model", str(sdxl), "--clip_vision", str(clip)]
        + ["--train_data", str(data), "--output_dir", str(out), "--report_to", "none", "--dry_run"]
    )
    args = json.loads((out / "args.json").read_text())
    batch = (args["global_batch_size"], args["train_batch_size"], args["gradient_accumulation_steps"])
    assert batch == (32, 4, 8)  # the paper's global batch at 512 on one GPU
    assert args["resolution"] == 512 and args["checkpoints_total_limit"] == 3
    (path,) = summary["preview"]
    record = data_lib.read_manifest(data / "manifest.jsonl")[0]
    rule = CaptionRule("person", PRESETS["faces"].subject_words + ("person",), TEMPLATE)
    sample = data_lib.load_sample(record, data_lib.SampleConfig(512, 224, True, True, rule, 0), 0)
    assert sample["caption"] == "a person on a boat" and sample["clip_pixels"].shape == (224, 224, 3)
    image, boxes = preview_lib.preview_image(record, sample, 224, 512)
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(image))
    (clip_box, target_box), = boxes
    assert clip_box[2] - clip_box[0] == target_box[2] - target_box[0] == 512  # the CLIP crop shown at 512
    target = np.asarray(image)[target_box[1] : target_box[3], target_box[0] : target_box[2]]
    np.testing.assert_array_equal(target, enlarge(sample["pixels"], 1))  # the target crop, pixel for pixel
