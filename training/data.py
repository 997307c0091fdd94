"""Training data: (input image, caption, target image) triplets from manifests, folders or tar shards.

Sources (`--train_data`):
- a JSON-lines manifest: one object per line, {"input": path, "target": path (optional, default the
  input), "caption": text (optional), "subject": the caption's subject word (optional), "mask": path
  (optional, the subject's mask)}; paths are relative to the manifest's folder;
- a folder of images: each image is input and target; its caption is the sidecar `<name>.txt`
  when there is one, else the domain's template, its mask `<name>.mask.png` when there is one. A
  folder holding `manifest.jsonl` is read as that manifest, and a folder holding `.tar` files as
  those shards;
- tar shards (a .tar file, a folder of them, or a glob): streamed with the standard library's
  `tarfile`, never unpacked, so a data set can be larger than the disk. Members are grouped by key
  (the member name up to the first dot of its base name), as webdataset writes them:
  `<key>.jpg|png|webp` (or `<key>.input.<ext>`) the input, `<key>.target.<ext>` the target,
  `<key>.txt` the caption, `<key>.json` {"caption", "subject"}, `<key>.mask.png` the mask
  (training.shards reads them).

Images are read by training.images: upright (EXIF), 8-bit (16-bit greyscale scaled, not clipped),
on WHITE outside an alpha channel or a mask (the one compositing of nested_attention.images, which
the Encode node uses too); .tif and .gif are read. training.scan reads everything once before the
models load and prints one summary.

The caption's subject word (the record's "subject", else the first run of the domain's subject
words) becomes the domain token; a caption without one gets the template in front (training.captions,
which also counts them). Targets are resized
(shorter side to the resolution) and cropped to a square, and SDXL's time ids record the original
size, the crop's top-left corner and the target size. The input is fitted to the CLIP vision
model's square exactly as ComfyUI's `clip_preprocess` does for the nodes (centre crop).

Every random choice (order, crop, flip) is a function of the seed and the sample's position in the
run, so a resumed run sees the very data the uninterrupted one would have. Unreadable images are
logged and skipped; they never stop a run.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .captions import CaptionRule  # noqa: F401  (the caption rule lives with the caption report)

log = logging.getLogger(__name__)
PREFIX = "[nested-attention]"

from .images import IMAGE_EXTENSIONS, MASK_SUFFIX, BadImage, ImageSource, decode_text, load_rgb  # noqa: F401

MANIFEST_NAMES = ("manifest.jsonl", "metadata.jsonl")
CAPTION_EXTENSIONS = (".txt",)  # sidecar captions of a folder of images


def mix_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (seed, purpose, step, rank, ...), stable across runs and machines."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ------------------------------------------------------------------------------------------------
# Records and captions


@dataclass
class Record:
    key: str  # a name for messages (file name or tar key)
    input: ImageSource  # the subject image the encoder sees
    target: Optional[ImageSource] = None  # the image the UNet learns to denoise; None means the input
    caption: Optional[str] = None
    subject: Optional[str] = None  # the caption's subject word, when the data names it
    mask: Optional[ImageSource] = None  # the subject's mask: the input is put on white outside it
    face_box: Optional[tuple[float, float, float, float]] = None  # (left, top, right, bottom) in the target


@dataclass
class DataReport:
    """What reading the data found besides records, for the one summary before training (training.scan)."""

    ignored: list[str] = field(default_factory=list)  # files that are neither images, masks nor captions
    text_problems: list[str] = field(default_factory=list)  # caption / manifest files that are not UTF-8
    bad_lines: list[str] = field(default_factory=list)  # manifest lines skipped, with the reason


def read_manifest(path: Path, report: Optional[DataReport] = None) -> list[Record]:
    """Records of a JSON-lines manifest; malformed lines are reported and skipped.

    {"input", "target" (optional), "caption" (optional), "subject" (optional), "mask" (optional: the
    subject's mask, white outside it)}. A file that is not UTF-8 is read as Latin-1 and reported.
    """
    report = report if report is not None else DataReport()
    records = []
    root = path.parent
    text, problem = decode_text(Path(path).read_bytes(), str(path))
    if problem:
        report.text_problems.append(problem)
        log.warning("%s %s", PREFIX, problem)
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            item = json.loads(line)
            source = item["input"]
            if not isinstance(source, str):
                raise TypeError("'input' must be a path")
            target = item.get("target")
            mask = item.get("mask")
            records.append(
                Record(
                    key=f"{path.name}:{number}",
                    input=str(root / source),
                    target=str(root / target) if target else None,
                    caption=item.get("caption"),
                    subject=item.get("subject"),
                    mask=str(root / mask) if mask else None,
                    face_box=tuple(float(v) for v in item["face_box"]) if item.get("face_box") else None,
                )
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            report.bad_lines.append(f"{path.name} line {number}: {e}")
            log.warning(
                '%s %s line %d skipped: %s. Expected {"input": path, "target": path (optional), '
                '"caption": text (optional)}.',
                PREFIX,
                path,
                number,
                e,
            )
    return records


def _is_mask(path: Path) -> bool:
    return path.stem.lower().endswith(MASK_SUFFIX)


def read_folder(folder: Path, report: Optional[DataReport] = None) -> list[Record]:
    """Records of a folder of images (searched recursively).

    Captions come from sidecar `<name>.txt` files (Latin-1 ones are read and reported), masks from
    `<name>.mask.png` next to the image. Other files are listed in `report.ignored`.
    """
    report = report if report is not None else DataReport()
    records = []
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        suffix = path.suffix.lower()
        if suffix in IMAGE_EXTENSIONS or suffix in CAPTION_EXTENSIONS or path.name.startswith("."):
            continue
        report.ignored.append(str(path.relative_to(folder)))
    for path in (p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS and not _is_mask(p)):
        sidecar = path.with_suffix(".txt")
        caption = None
        if sidecar.is_file():
            caption, problem = decode_text(sidecar.read_bytes(), str(sidecar.relative_to(folder)))
            caption = caption.strip()
            if problem:
                report.text_problems.append(problem)
        masks = [
            m for m in path.parent.glob(f"{path.stem}{MASK_SUFFIX}.*") if m.suffix.lower() in IMAGE_EXTENSIONS
        ]
        records.append(
            Record(
                key=str(path.relative_to(folder)),
                input=str(path),
                caption=caption,
                mask=str(sorted(masks)[0]) if masks else None,
            )
        )
    return records


def find_shards(spec: str) -> list[str]:
    """Tar shards named by a file, a folder or a glob pattern; [] when `spec` names none."""
    path = Path(spec)
    if path.is_file() and path.suffix == ".tar":
        return [str(path)]
    if path.is_dir():
        return sorted(str(p) for p in path.glob("*.tar"))
    if any(ch in spec for ch in "*?["):
        return sorted(p for p in glob.glob(spec) if p.endswith(".tar"))
    return []


def describe_source(spec: str) -> tuple[str, Any]:
    """("shards", [paths]) | ("manifest", path) | ("folder", path) for `--train_data`; raises if unusable."""
    shards = find_shards(spec)
    if shards:
        return "shards", shards
    path = Path(spec)
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        return "manifest", path
    if path.is_dir():
        for name in MANIFEST_NAMES:
            if (path / name).is_file():
                return "manifest", path / name
        return "folder", path
    raise FileNotFoundError(spec)


# ------------------------------------------------------------------------------------------------
# Images


def open_image(source: ImageSource, mask: Optional[ImageSource] = None):
    """A PIL RGB image, fully decoded (so a truncated file fails here, not later), upright (EXIF), 8-bit,
    on white outside its alpha channel and its mask; see training.images."""
    return load_rgb(source, mask)


def to_comfy_image(image) -> torch.Tensor:
    """PIL RGB -> (H, W, 3) float32 in [0, 1], as ComfyUI's LoadImage makes an IMAGE."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)


def _crop_start(size: int, crop: int, keep: Optional[tuple[float, float]], center: bool, rng) -> int:
    """First pixel of a `crop`-long window in `size` pixels: centred or random, and covering `keep` (lo, hi)
    whenever it fits (else centred on it)."""
    lo, hi = 0, size - crop
    if keep is not None:
        need_lo, need_hi = math.ceil(keep[1]) - crop, math.floor(keep[0])  # window covers [keep0, keep1]
        if need_lo <= need_hi:
            lo, hi = max(lo, need_lo), min(hi, need_hi)
        else:
            lo = hi = min(max(round((keep[0] + keep[1] - crop) / 2), 0), size - crop)
        if lo > hi:  # the face is at the photo's edge: the nearest valid window
            lo = hi = min(max(lo, 0), size - crop)
        if center:
            return min(max((size - crop) // 2, lo), hi)
    elif center:
        return (size - crop) // 2
    return rng.randint(lo, hi)


def prepare_target(image, resolution: int, center_crop: bool, flip: bool, rng: random.Random,
                   keep: Optional[tuple[float, float, float, float]] = None):
    """Resize (shorter side), crop to a square and maybe mirror; returns ((res, res, 3), time ids (6,)).

    `keep` (left, top, right, bottom) in the original image is a face box the crop must contain when it fits.
    """
    from PIL import Image

    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    sx, sy = new_w / width, new_h / height
    top = _crop_start(new_h, resolution, keep and (keep[1] * sy, keep[3] * sy), center_crop, rng)
    left = _crop_start(new_w, resolution, keep and (keep[0] * sx, keep[2] * sx), center_crop, rng)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = new_w - left - resolution  # SDXL's convention: the crop as seen in the mirrored image
    # SDXL time ids: original (h, w), crop top-left (top, left), target (h, w).
    time_ids = torch.tensor([height, width, top, left, resolution, resolution], dtype=torch.float32)
    return to_comfy_image(image), time_ids


def comfy_clip_preprocess():
    """ComfyUI's clip_preprocess: in comfy.clip_model since 0.8 (comfy.clip_vision keeps an alias that
    ComfyUI means to remove), in comfy.clip_vision before."""
    import comfy.clip_model
    import comfy.clip_vision

    found = getattr(comfy.clip_model, "clip_preprocess", None)
    found = found or getattr(comfy.clip_vision, "clip_preprocess", None)
    if found is None:
        raise ImportError(
            "this ComfyUI has clip_preprocess neither in comfy.clip_model nor in comfy.clip_vision; the pack "
            "is tested with ComfyUI 0.3.75 and 0.33.0 (README, Supported ComfyUI).")
    return found


def prepare_clip_input(image, size: int) -> torch.Tensor:
    """(size, size, 3) in [0, 1]: the pixels ComfyUI's encode_image(crop=True) feeds the CLIP tower.

    clip_preprocess with mean 0 and std 1 does its resize, centre crop and rounding only; the
    normalization happens again (identically) inside encode_image, whose resize is then a no-op.
    """
    pixels = to_comfy_image(image)[None]  # (1, H, W, 3)
    out = comfy_clip_preprocess()(pixels, size=size, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], crop=True)
    return out[0].movedim(0, -1).contiguous()  # (size, size, 3)


@dataclass(frozen=True)
class SampleConfig:
    resolution: int
    clip_size: int  # the CLIP vision model's input size
    center_crop: bool
    random_flip: bool
    captions: CaptionRule
    seed: int


def load_sample(record: Record, config: SampleConfig, position: int) -> Optional[dict]:
    """The training sample of a record, or None (logged) when an image cannot be read."""
    rng = random.Random(mix_seed(config.seed, "sample", position))
    try:
        source = open_image(record.input, record.mask)
        target = source if record.target is None else open_image(record.target)
        pixels, time_ids = prepare_target(
            target, config.resolution, config.center_crop, config.random_flip, rng, keep=record.face_box
        )
        clip_pixels = prepare_clip_input(source, config.clip_size)
    except BadImage as e:
        log.warning("%s skipping %s: unreadable image (%s)", PREFIX, record.key, e)
        return None
    except Exception as e:  # an image PIL reads but cannot convert or resize: still one sample, not the run
        name = type(e).__name__
        log.warning("%s skipping %s: cannot prepare the image (%s: %s)", PREFIX, record.key, name, e)
        return None
    return {
        "key": record.key,
        "pixels": pixels,
        "clip_pixels": clip_pixels,
        "time_ids": time_ids,
        "caption": config.captions.apply(record.caption, record.subject),
    }


def collate(samples: Sequence[Optional[dict]]) -> Optional[dict]:
    """Stack samples, dropping skipped ones; None when none is left."""
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    batch = {"key": [s["key"] for s in samples], "caption": [s["caption"] for s in samples]}
    for name in samples[0]:
        if name not in batch:
            batch[name] = torch.stack([s[name] for s in samples])
    return batch


# ------------------------------------------------------------------------------------------------
# Indexed data sets (manifests, folders, the latent cache) and their sampler


class RecordDataset(Dataset):
    """Records loaded on demand; items are addressed by (index, position in the run)."""

    def __init__(self, records: Sequence[Record], config: SampleConfig):
        self.records = list(records)
        self.config = config

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: tuple[int, int]) -> Optional[dict]:
        index, position = item
        return load_sample(self.records[index], self.config, position)


class StepBatchSampler:
    """An endless, resumable order: batch j of rank r is a pure function of (seed, j, r).

    The run's samples form one stream, epoch after epoch, each epoch a fresh permutation of the data
    set seeded by (seed, epoch). Global batch j takes `batch_size * world` consecutive stream
    entries; rank r takes its slice. Starting at batch `start` is what a resumed run does.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        if size < 1:
            raise ValueError("the data set is empty")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world, self.start = rank, world, start
        self._epoch, self._perm = -1, None

    def _index(self, stream: int) -> int:
        epoch, offset = divmod(stream, self.size)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, "epoch", epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=generator).tolist()
        return self._perm[offset]

    def batch(self, j: int) -> list[tuple[int, int]]:
        first = (j * self.world + self.rank) * self.batch_size
        return [(self._index(p), p) for p in range(first, first + self.batch_size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        j = self.start
        while True:
            yield self.batch(j)
            j += 1
