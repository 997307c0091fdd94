"""python -m training.prepare: aligned faces + targets + face boxes, pets on white, captions, the summary."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nested_attention import faces
from nested_attention.images import from_pil, to_uint8
from training.data import dataset as data_lib
from training.data import prepare
from training.data.captions import CaptionRule

EYES_AND_MOUTH = [(202.5, 101.3), (246.3, 103.3), (223.8, 141.9)]  # hand-placed on the astronaut (test_faces)


def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())  # NASA, public domain


def test_faces_folder_becomes_aligned_inputs_upright_targets_and_face_boxes(tmp_path, capsys):
    from skimage import data

    src = tmp_path / "photos"
    src.mkdir()
    astronaut().save(src / "eileen.png")
    (src / "eileen.txt").write_bytes("an astronaut, caf\xe9 break".encode("latin-1"))
    exif = Image.Exif()
    exif[0x0112] = 8  # stored turned; EXIF says "rotate 90 degrees counter-clockwise to view"
    astronaut().rotate(-90).save(src / "sideways.jpg", quality=95, exif=exif)
    Image.fromarray(data.coffee()).save(src / "coffee.png")  # no face (CC0)
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")

    summary = prepare.main(["--domain", "faces", str(src), str(tmp_path / "out"), "--face_size", "128"])
    assert summary["kept"] == 2
    assert summary["skipped_names"]["no face found"] == ["coffee.png"]
    assert [k for k in summary["skipped"] if k.startswith("unreadable")]
    assert summary["captions_from_files"] == 1 and summary["captions_from_template"] == 1
    assert "eileen.txt line 1 is not UTF-8" in summary["text_problems"][0]
    printed = capsys.readouterr().out
    assert "kept 2, skipped 2" in printed and "coffee.png" in printed

    lines = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    first = lines[0]
    assert first["caption"] == "an astronaut, café break"
    aligned = np.asarray(Image.open(tmp_path / "out" / first["input"]))
    expected = to_uint8(faces.align_face(from_pil(astronaut()), size=128).image)
    assert aligned.shape == (128, 128, 3) and np.abs(aligned.astype(int) - expected).max() <= 1
    left, top, right, bottom = first["face_box"]
    assert all(left < x < right and top < y < bottom for x, y in EYES_AND_MOUTH)
    # The sideways photo: its target is upright (EXIF applied) and its aligned crop matches the first.
    second = lines[1]
    target = Image.open(tmp_path / "out" / second["target"])
    assert target.size == (512, 512)
    upright = np.asarray(target, dtype=np.float64)
    assert np.abs(upright - np.asarray(astronaut(), dtype=np.float64)).mean() < 4  # JPEG noise only
    crop = np.asarray(Image.open(tmp_path / "out" / second["input"]), dtype=np.float64)
    assert np.abs(crop - aligned).mean() < 10  # 7 measured: JPEG re-encoding moves the landmarks a little

    # The trainer reads the manifest, with the face box.
    kind, source = data_lib.describe_source(str(tmp_path / "out"))
    records = data_lib.read_manifest(source)
    assert kind == "manifest" and records[0].face_box == tuple(first["face_box"])


@pytest.mark.parametrize("center", [True, False])
def test_target_crops_keep_the_face_box(center):
    # A wide photo with the face near its left edge: a centred square crop would cut it off.
    photo = Image.new("RGB", (1000, 300), (0, 128, 0))
    box = (40.0, 60.0, 200.0, 240.0)
    for seed in range(30):
        rng = random.Random(seed)
        _, time_ids = data_lib.prepare_target(photo, 64, center_crop=center, flip=False, rng=rng, keep=box)
        top, left = time_ids[2].item(), time_ids[3].item()
        scale = 64 / 300
        assert left <= box[0] * scale and left + 64 >= box[2] * scale
        assert top <= box[1] * scale and top + 64 >= box[3] * scale
    # Without a box, the same calls give the old crops (resumed runs see the same data).
    a = data_lib.prepare_target(photo, 64, center_crop=False, flip=False, rng=random.Random(3))[1]
    b = data_lib.prepare_target(photo, 64, center_crop=False, flip=False, rng=random.Random(3), keep=None)[1]
    assert torch.equal(a, b)


def test_pets_are_put_on_white_from_alpha_or_masks(tmp_path):
    src = tmp_path / "pets"
    (src / "masks").mkdir(parents=True)
    photo = Image.new("RGB", (32, 32), (10, 20, 30))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    cut = photo.convert("RGBA")
    cut.putalpha(mask)
    cut.save(src / "cut.png")
    photo.save(src / "rex.png")
    mask.save(src / "masks" / "rex.png")
    photo.save(src / "bella.jpg", quality=100)
    mask.save(src / "bella.mask.png")
    photo.save(src / "plain.png")  # neither alpha nor mask

    summary = prepare.main(["--domain", "pets", str(src), str(tmp_path / "out")])
    assert summary["kept"] == 4 and summary["pets_without_mask"] == 1
    lines = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [entry["input"] for entry in lines] == [
        "images/bella.png",
        "images/cut.png",
        "images/plain.png",
        "images/rex.png",
    ]
    for entry in lines:
        image = Image.open(tmp_path / "out" / entry["input"])
        corner = image.getpixel((0, 0))
        assert corner == ((10, 20, 30) if entry["input"] == "images/plain.png" else (255, 255, 255))
        assert np.abs(np.array(image.getpixel((16, 16))) - (10, 20, 30)).max() <= 2

    summary = prepare.main(["--domain", "pets", str(src), str(tmp_path / "strict"), "--require_mask"])
    assert summary["kept"] == 3 and list(summary["skipped_names"].values()) == [["plain.png"]]
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        prepare.main(["--domain", "pets", str(src), str(tmp_path / "strict")])


def test_generate_synthetic_pets_with_comfys_sampler_resumes_and_is_seeded(tmp_path):
    import tiny_models  # noqa: F401  (ComfyUI set-up first)

    from training.data.synthetic_pets import plan

    out = tmp_path / "gen"
    flags = ["--domain", "pets", "--tiny", "--resolution", "64", "--steps", "2", "--seed", "7"]
    first = prepare.main([*flags, "--generate", "3", str(out)])
    assert first["made"] == 3 and first["skipped"] == 0
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [entry["input"] for entry in lines] == [f"images/{i:06d}.png" for i in range(3)]
    for i, entry in enumerate(lines):
        assert entry == {**entry, **{k: plan(i, 7)[k] for k in ("caption", "subject", "seed", "prompt")}}
        assert "white background" in entry["prompt"] and "white" not in entry["caption"]
        assert entry["subject"] in entry["caption"]
        assert Image.open(out / entry["input"]).size == (64, 64)
    # The trainer reads it: each caption's subject word becomes the token.
    records = data_lib.read_manifest(out / "manifest.jsonl")
    rule = CaptionRule("pet", ("dog", "cat"), "a photo of a {token}")
    assert all(" pet" in rule.apply(r.caption, r.subject) for r in records)
    # Resumable: a fourth sample is added, the first three are not made again; a lost one comes back the same.
    before = np.asarray(Image.open(out / "images" / "000001.png"))
    (out / "images" / "000001.json").unlink()
    again = prepare.main([*flags, "--generate", "4", str(out)])
    assert again["made"] == 2 and again["skipped"] == 2
    assert np.array_equal(np.asarray(Image.open(out / "images" / "000001.png")), before)
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 4
    # Different seeds give different prompts or noise.
    assert plan(0, 7) != plan(0, 8)


def test_generate_flags_are_checked():
    with pytest.raises(SystemExit):
        prepare.parse_args(["--domain", "faces", "--generate", "3", "out"])
    with pytest.raises(SystemExit):
        prepare.parse_args(["--domain", "pets", "--generate", "3", "src", "out"])


def tiny_captioner(folder: Path) -> Path:
    """A BLIP captioning model with random weights, saved as users keep one (save_pretrained, safetensors)."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder.mkdir(parents=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "dog", "cat", "on", "grass"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    text = {
        "vocab_size": len(words),
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "bos_token_id": 2,
        "sep_token_id": 3,
        "pad_token_id": 0,
        "eos_token_id": 3,
    }
    vision = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 32,
        "patch_size": 16,
    }
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(
        BlipConfig(text_config=text, vision_config=vision, projection_dim=32)
    )
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=BertTokenizer(str(folder / "vocab.txt")),
    )
    model.save_pretrained(folder / "blip")
    processor.save_pretrained(folder / "blip")
    return folder / "blip"


def test_a_local_captioning_model_captions_photos_without_a_caption_file(tmp_path):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    model_dir = tiny_captioner(tmp_path / "models")
    src = tmp_path / "pets"
    src.mkdir()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(src / "a.png")
    Image.new("RGB", (40, 40), (30, 200, 30)).save(src / "b.png")
    (src / "b.txt").write_text("a dog on grass")
    summary = prepare.main(
        ["--domain", "pets", str(src), str(tmp_path / "out"), "--caption_model", str(model_dir)]
    )
    assert (
        summary["captions_from_files"],
        summary["captions_from_model"],
        summary["captions_from_template"],
    ) == (1, 1, 0)
    lines = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    # The reference: the same model and processor run directly, greedy.
    processor = BlipProcessor.from_pretrained(model_dir)
    model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()
    with torch.no_grad():
        ids = model.generate(
            **processor(images=Image.open(src / "a.png"), return_tensors="pt"),
            max_new_tokens=40,
            do_sample=False,
        )
    expected = processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
    assert expected and lines[0]["caption"] == expected and lines[1]["caption"] == "a dog on grass"
    with pytest.raises(SystemExit, match="no config.json"):
        prepare.main(["--domain", "pets", str(src), str(tmp_path / "o2"), "--caption_model", str(tmp_path)])
