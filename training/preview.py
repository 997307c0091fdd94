"""`--dry_run`: resolve every setting, write args.json and a preview of processed samples, then stop.

`<output_dir>/data-preview/NN.png` shows, for the first few readable samples, the input as the encoder sees
it (after alpha/mask compositing, alignment done by training.prepare, and CLIP's resize and centre crop),
the target crop as the UNet sees it (after EXIF rotation, 16-bit conversion, resize and crop) and the
training caption with the domain token, under the sample's name. Nothing loads a model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np

from . import data as data_lib

log = logging.getLogger(__name__)
PREVIEW_DIR = "data-preview"
PANEL = 256  # each image is shown at this size
CLIP_SIZE = 224  # the CLIP ViT-H/14 input the presets train with (the tiny preset's model is smaller)


def args_json(config: Any) -> dict:
    """The resolved settings (a TrainConfig), JSON-safe."""
    return {
        k: (
            v
            if isinstance(v, (int, float, str, bool, type(None)))
            else [str(x) for x in v]
            if isinstance(v, (list, tuple))
            else str(v)
        )
        for k, v in sorted(dataclasses.asdict(config).items())
    }


def _records_for_preview(scan, count: int, spec: str) -> list:
    return scan.records[:count] if scan.kind != "shards" else data_lib.first_records(spec, count)


def _panel(pixels) -> "np.ndarray":
    from PIL import Image

    array = (pixels.numpy() * 255).round().clip(0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(array).resize((PANEL, PANEL), Image.Resampling.NEAREST))


def render(sample: dict) -> "object":
    """One preview image: [encoder input | target crop] over the sample's key and caption."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    images = np.concatenate(
        [_panel(sample["clip_pixels"]), np.full((PANEL, 8, 3), 255, np.uint8), _panel(sample["pixels"])],
        axis=1,
    )
    lines = [f"{sample['key']}   (left: encoder input, right: target crop)"]
    lines += textwrap.wrap(f"caption: {sample['caption']}", width=80)
    canvas = Image.new("RGB", (images.shape[1], PANEL + 14 * len(lines) + 10), (255, 255, 255))
    canvas.paste(Image.fromarray(images), (0, 0))
    draw = ImageDraw.Draw(canvas)
    try:  # DejaVu draws accented captions; Pillow's own font lacks them (captions.tsv has the exact text)
        font = ImageFont.truetype("DejaVuSans.ttf", 12)
    except OSError:
        font = ImageFont.load_default(size=12)
    for i, line in enumerate(lines):
        draw.text((4, PANEL + 4 + 14 * i), line, fill=(0, 0, 0), font=font)
    return canvas


def dry_run(
    config: Any,
    scan,
    captions,
    output_dir: Path,
    *,
    count: int = 8,
    clip_size: Optional[int] = None,
) -> dict:
    """Write args.json and data-preview/ for `scan`'s data; returns {"dry_run": True, "preview", ...}."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "args.json").write_text(json.dumps(args_json(config), indent=2) + "\n")
    folder = output_dir / PREVIEW_DIR
    folder.mkdir(exist_ok=True)
    samples = data_lib.SampleConfig(
        resolution=config.resolution,
        clip_size=clip_size or CLIP_SIZE,
        center_crop=config.center_crop,
        random_flip=config.random_flip,
        captions=captions,
        seed=config.seed,
    )
    written, lines = [], []
    for i, record in enumerate(_records_for_preview(scan, count, config.train_data)):
        sample = data_lib.load_sample(record, samples, i)
        if sample is None:
            continue
        path = folder / f"{i:02d}.png"
        render(sample).save(path)
        written.append(str(path))
        lines.append(f"{path.name}\t{sample['key']}\t{sample['caption']}")
    (folder / "captions.tsv").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    log.info(
        "[nested-attention] dry run: settings in %s, %d preview samples in %s; no training was done",
        output_dir / "args.json",
        len(written),
        folder,
    )
    return {
        "dry_run": True,
        "args_path": str(output_dir / "args.json"),
        "preview": written,
        "output_dir": str(output_dir),
    }
