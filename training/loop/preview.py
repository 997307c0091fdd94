"""Seeing the data: labelled image grids, `--dry_run`'s args.json and data preview, the first samples.

`labelled_grid` lays out equal-sized cells under a header of column labels, beside a column of row
labels, with optional lines of text below; the sample grids (training.models.sampling) and the data preview
use it. Cells smaller than `MIN_CELL` pixels are enlarged by a whole factor with nearest-neighbour
sampling, so a 64 px tiny run stays legible and every pixel of a cell is still the image's own.

Every run writes the resolved config as <output_dir>/args.json (`write_args`). `--dry_run` stops after
`dry_run`: for the first few readable samples one PNG each in <output_dir>/data-preview/: the encoder's
input as CLIP sees it (after alpha / mask compositing on white, and CLIP's resize and centre crop at the
vision model's size), the target crop as the UNet sees it (after EXIF rotation, 16-bit conversion,
resize and crop), the training caption with the token; data-preview/captions.tsv has each caption's
exact text (the drawn font may lack a character). Nothing of SDXL is loaded; the CLIP input size is read
from the vision model file's header (224, ViT-H/14's, when the file is not there yet).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from nested_attention.images import from_pil, to_pil
from nested_attention.logs import LOG_PREFIX as PREFIX
from training.comfy_env import setup_comfy
from training.data import dataset as data_lib
from training.data.images import BadImage
from training.data.shards import iter_tar_records
from training.tiny.models import TINY_CLIP_VISION_CONFIG

log = logging.getLogger("training")
MIN_CELL = 256  # cells are shown at least this large (pixels)
PREVIEW_SAMPLES = 4  # samples the data preview shows
CLIP_H_SIZE = 224  # ViT-H/14's input, the presets' vision model: the dry run's size when its file is missing


# ------------------------------------------------------------------------------------------------
# Labelled grids


def font(size: int):
    """DejaVu Sans at `size` px, the font matplotlib ships (the trainer's extras install it): it draws
    accented letters, Greek and Cyrillic, which Pillow's own default font shows as boxes ("café"). Pillow's
    default font when matplotlib is missing."""
    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.__file__).parent / "mpl-data/fonts/ttf/DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        pass
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def split_word(draw, word: str, width: int, face) -> list[str]:
    """A word wider than `width` pixels (a file name) in pieces that fit: after '-', '_', '.' or '/' where it
    can, anywhere else where it must."""
    pieces, piece, last_break = [], "", 0
    for char in word:
        if piece and draw.textlength(piece + char, font=face) > width:
            cut = last_break if last_break else len(piece)
            pieces.append(piece[:cut])
            piece = piece[cut:]
            last_break = max(piece.rfind(mark) for mark in "-_./") + 1
        piece += char
        if char in "-_./":
            last_break = len(piece)
    return [*pieces, piece]


def wrap(draw, text: str, width: int, face) -> list[str]:
    """`text` broken into lines no wider than `width` pixels (a word longer than a line is split)."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            trial = f"{line} {word}" if line else word
            if draw.textlength(trial, font=face) <= width:
                line = trial
                continue
            if line:
                lines.append(line)
            *full, line = split_word(draw, word, width, face)
            lines += full
        lines.append(line)
    return lines


def to_display(cell: np.ndarray, size: int):
    """An (H, W, 3) array in [0, 1] as a PIL image `size` px wide: whole-factor nearest-neighbour
    enlargement where it fits, Lanczos otherwise."""
    image = to_pil(cell)
    if image.width == size:
        return image
    height = round(image.height * size / image.width)
    exact = size % image.width == 0
    return image.resize((size, height), Image.Resampling.NEAREST if exact else Image.Resampling.LANCZOS)


def labelled_grid(
    cells: Sequence[Sequence[np.ndarray]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    footer: Sequence[str] = (),
    cell_size: int | None = None,
):
    """A white PIL image: column labels on top, row labels on the left, the cells (rows of (H, W, 3)
    arrays in [0, 1], shown `cell_size` px wide), then `footer` lines. Returns (image, boxes) with
    boxes[r][c] = (left, top, right, bottom) of each cell."""
    size = cell_size or max(cell.shape[1] for row in cells for cell in row)
    if cell_size is None and size < MIN_CELL:
        size *= math.ceil(MIN_CELL / size)
    shown = [[to_display(cell, size) for cell in row] for row in cells]
    height = max(image.height for row in shown for image in row)
    face = font(max(12, min(40, size // 16)))
    pad = max(4, size // 64)
    line_h = int(face.size * 1.25) if hasattr(face, "size") else 12
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = size // 2
    cols = max(len(row) for row in shown)
    col_lines = [wrap(measure, text, size - 2 * pad, face) for text in col_labels]
    row_lines = [wrap(measure, text, label_w - 2 * pad, face) for text in row_labels]
    step_x = size + pad  # a gap between cells, for their outlines
    # Each row as tall as its cells, or its label where that is longer (a long file name, wrapped).
    steps_y = [max(height, len(row_lines[r]) * line_h + 2 * pad if r < len(row_lines) else 0) + pad
               for r in range(len(shown))]
    width = label_w + cols * step_x
    foot_lines = [line for text in footer for line in wrap(measure, text, width - 2 * pad, face)]
    header = max((len(lines) for lines in col_lines), default=0) * line_h + 2 * pad
    footer_h = len(foot_lines) * line_h + 2 * pad if foot_lines else 0
    body = sum(steps_y)
    grid = Image.new("RGB", (width, header + body + footer_h), "white")
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(col_lines):
        for i, line in enumerate(lines):
            draw.text((label_w + c * step_x, pad + i * line_h), line, fill="black", font=face)
    boxes = []
    for r, row in enumerate(shown):
        top = header + sum(steps_y[:r])
        for i, line in enumerate(row_lines[r] if r < len(row_lines) else []):
            draw.text((pad, top + pad + i * line_h), line, fill="black", font=face)
        boxes.append([])
        for c, image in enumerate(row):
            left = label_w + c * step_x
            grid.paste(image, (left, top))
            # a grey outline just outside the cell, so white-background images keep their edges
            outline = (left - 1, top - 1, left + image.width, top + image.height)
            draw.rectangle(outline, outline=(160, 160, 160))
            boxes[-1].append((left, top, left + image.width, top + image.height))
    for i, line in enumerate(foot_lines):
        draw.text((pad, header + body + pad + i * line_h), line, fill="black", font=face)
    return grid, boxes


# ------------------------------------------------------------------------------------------------
# The data's first samples


def first_records(kind: str, source, records: Sequence, count: int) -> list:
    """The first `count` readable records of the data: manifest / folder records in order, or the first
    of the tar shards in the order they are named (for sample grids and previews of streamed data)."""
    if kind != "shards":
        return list(records[:count])

    found = []
    for shard in source:
        for record in iter_tar_records(shard):
            if record is not None:
                found.append(record)
                if len(found) == count:
                    return found
    return found


def load_validation_images(config, data) -> list:
    """(H, W, 3) images for the sample grid: --validation_images, else the first two training inputs as
    the encoder sees them, masks applied (of the manifest or folder, or of the tar shards' stream)."""
    sources = [(path, None) for path in config.validation_images] or [
        (r.input, r.mask) for r in first_records(data.kind, data.source, data.records, 2)
    ]
    images = []
    for source, mask in sources:
        try:
            images.append(from_pil(data_lib.open_image(source, mask)))
        except BadImage as e:
            name = source if isinstance(source, str) else "?"
            log.warning("%s validation image %s skipped: %s", PREFIX, name, e)
    return images


# ------------------------------------------------------------------------------------------------
# --dry_run


def clip_input_size(config) -> int:
    """The CLIP vision model's input size, from its file's header (no weights read); tiny: its config."""
    if config.preset.tiny:
        return int(TINY_CLIP_VISION_CONFIG["image_size"])
    if not config.clip_vision or not Path(config.clip_vision).is_file():  # resolve_inputs has warned
        return CLIP_H_SIZE
    from safetensors import safe_open

    from nested_attention.encoder import clip_vision_architecture

    with safe_open(config.clip_vision, framework="pt") as f:
        names = f.keys()  # a header read: no weights
        shapes = {key: f.get_slice(key).get_shape() for key in names}
    try:
        return clip_vision_architecture(shapes, config.clip_vision).image_size
    except ValueError:
        raise SystemExit(
            f"{PREFIX} --clip_vision {config.clip_vision} has no embeddings.position_embedding / "
            "embeddings.patch_embedding weights; expected a CLIP vision model file (ViT-H/14)."
        ) from None


def write_args(config) -> Path:
    """<output_dir>/args.json: every resolved setting of the run (the frozen TrainConfig)."""
    path = Path(config.output_dir) / "args.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(config), indent=1) + "\n")
    return path


def write_preview(config, data, clip_size: int, count: int = PREVIEW_SAMPLES) -> list[Path]:
    """One labelled PNG per sample in <output_dir>/data-preview/, processed exactly as training does."""
    sample_config = data_lib.SampleConfig(
        resolution=config.resolution,
        clip_size=clip_size,
        center_crop=config.center_crop,
        random_flip=config.random_flip,
        captions=data.captions,
        seed=config.seed,
    )
    folder = Path(config.output_dir) / "data-preview"
    folder.mkdir(parents=True, exist_ok=True)
    paths, lines = [], []
    for i, record in enumerate(first_records(data.kind, data.source, data.records, count)):
        sample = data_lib.load_sample(record, sample_config, i)
        if sample is None:  # unreadable: load_sample has logged it
            continue
        path = folder / f"sample-{i}.png"
        preview_image(record, sample, clip_size, config.resolution)[0].save(path)
        paths.append(path)
        lines.append(f"{path.name}\t{record.key}\t{sample['caption']}\n")
    (folder / "captions.tsv").write_text("".join(lines), encoding="utf-8")
    return paths


def preview_columns(clip_size: int, resolution: int) -> list[str]:
    """The column labels of a preview (they alone set where its two panels are: preview_boxes)."""
    return [f"encoder input: CLIP centre crop, {clip_size} px", f"target: UNet crop, {resolution} px"]


def preview_boxes(clip_size: int, resolution: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(left, top, right, bottom) of the encoder-input and target panels in every preview of a run."""
    cells = [[np.zeros((clip_size, clip_size, 3)), np.zeros((resolution, resolution, 3))]]
    _, ((clip_box, target_box),) = labelled_grid(cells, ["x"], preview_columns(clip_size, resolution))
    return clip_box, target_box


def preview_image(record, sample: dict, clip_size: int, resolution: int):
    """(image, boxes) of one sample's preview: CLIP input and target crop side by side, captions below."""
    t = [int(v) for v in sample["time_ids"].tolist()]
    return labelled_grid(
        [[sample["clip_pixels"].numpy(), sample["pixels"].numpy()]],
        row_labels=[record.key],
        col_labels=preview_columns(clip_size, resolution),
        footer=[
            f"caption: {sample['caption']}",
            f"raw caption: {record.caption or '(none)'}",
            f"time ids: original {t[0]}x{t[1]}, crop top-left ({t[2]}, {t[3]}), target {t[4]}x{t[5]}",
        ],
    )


def dry_run(config, data) -> dict:
    """Write the data preview and say where it and args.json are; nothing is trained or loaded."""
    setup_comfy()  # the CLIP crop is ComfyUI's own clip_preprocess
    paths = write_preview(config, data, clip_input_size(config))
    log.info(
        "%s dry run: settings in %s, %d preview(s) in %s; stopping before loading the models",
        PREFIX,
        Path(config.output_dir) / "args.json",
        len(paths),
        Path(config.output_dir) / "data-preview",
    )
    return {"dry_run": True, "output_dir": str(config.output_dir), "preview": [str(p) for p in paths]}
