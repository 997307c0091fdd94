"""Training data: (input image, caption, target image) triplets from manifests, folders or tar shards.

Sources (`--train_data`):
- a JSON-lines manifest: one object per line, {"input": path, "target": path (optional, default the
  input), "caption": text (optional), "subject": the caption's subject word (optional)}; paths are
  relative to the manifest's folder;
- a folder of images: each image is input and target; its caption is the sidecar `<name>.txt`
  when there is one, else the domain's template. A folder holding `manifest.jsonl` is read as that
  manifest, and a folder holding `.tar` files as those shards;
- tar shards (a .tar file, a folder of them, or a glob): streamed with the standard library's
  `tarfile`, never unpacked, so a data set can be larger than the disk. Members are grouped by key
  (the member name up to the first dot of its base name), as webdataset writes them:
  `<key>.jpg|png|webp` (or `<key>.input.<ext>`) the input, `<key>.target.<ext>` the target,
  `<key>.txt` the caption, `<key>.json` {"caption", "subject"}.

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
import io
import json
import logging
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .captions import CaptionRule  # noqa: F401  (the caption rule lives with the caption report)

log = logging.getLogger(__name__)
PREFIX = "[nested-attention]"

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MANIFEST_NAMES = ("manifest.jsonl", "metadata.jsonl")

ImageSource = Union[str, bytes]  # a path, or the bytes of a file inside a tar shard


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


def read_manifest(path: Path) -> list[Record]:
    """Records of a JSON-lines manifest; malformed lines are reported and skipped."""
    records = []
    root = path.parent
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                item = json.loads(line)
                source = item["input"]
                if not isinstance(source, str):
                    raise TypeError("'input' must be a path")
                target = item.get("target")
                records.append(
                    Record(
                        key=f"{path.name}:{number}",
                        input=str(root / source),
                        target=str(root / target) if target else None,
                        caption=item.get("caption"),
                        subject=item.get("subject"),
                    )
                )
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                log.warning(
                    '%s %s line %d skipped: %s. Expected {"input": path, "target": path (optional), '
                    '"caption": text (optional)}.',
                    PREFIX,
                    path,
                    number,
                    e,
                )
    return records


def read_folder(folder: Path) -> list[Record]:
    """Records of a folder of images (searched recursively), captions from sidecar .txt files."""
    records = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        sidecar = path.with_suffix(".txt")
        caption = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else None
        records.append(Record(key=str(path.relative_to(folder)), input=str(path), caption=caption))
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


class BadImage(Exception):
    pass


def open_image(source: ImageSource):
    """A PIL RGB image, fully decoded (so a truncated file fails here, not later)."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        image.load()
        if image.width < 1 or image.height < 1:
            raise ValueError("empty image")
        return image.convert("RGB")
    except (
        Exception
    ) as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError, ...)
        raise BadImage(f"{type(e).__name__}: {e}") from e


def to_comfy_image(image) -> torch.Tensor:
    """PIL RGB -> (H, W, 3) float32 in [0, 1], as ComfyUI's LoadImage makes an IMAGE."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)


def prepare_target(image, resolution: int, center_crop: bool, flip: bool, rng: random.Random):
    """Resize (shorter side), crop to a square and maybe mirror; returns ((res, res, 3), time ids (6,))."""
    from PIL import Image

    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if center_crop:
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    else:
        top, left = rng.randint(0, new_h - resolution), rng.randint(0, new_w - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = new_w - left - resolution  # SDXL's convention: the crop as seen in the mirrored image
    # SDXL time ids: original (h, w), crop top-left (top, left), target (h, w).
    time_ids = torch.tensor([height, width, top, left, resolution, resolution], dtype=torch.float32)
    return to_comfy_image(image), time_ids


def prepare_clip_input(image, size: int) -> torch.Tensor:
    """(size, size, 3) in [0, 1]: the pixels ComfyUI's encode_image(crop=True) feeds the CLIP tower.

    clip_preprocess with mean 0 and std 1 does its resize, centre crop and rounding only; the
    normalization happens again (identically) inside encode_image, whose resize is then a no-op.
    """
    from comfy.clip_vision import clip_preprocess

    pixels = to_comfy_image(image)[None]  # (1, H, W, 3)
    out = clip_preprocess(pixels, size=size, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], crop=True)
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
        source = open_image(record.input)
        target = source if record.target is None else open_image(record.target)
        pixels, time_ids = prepare_target(
            target, config.resolution, config.center_crop, config.random_flip, rng
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


# ------------------------------------------------------------------------------------------------
# Streamed tar shards


def _member_role(name: str) -> tuple[str, Optional[str]]:
    """(key, role) of a tar member: role "input", "target", "caption", "json" or None (ignored)."""
    directory, base = os.path.split(name)
    if "." not in base:
        return name, None
    stem, ext = base.split(".", 1)
    key = os.path.join(directory, stem)
    ext = ext.lower()
    if ext in ("txt", "caption", "caption.txt"):
        return key, "caption"
    if ext == "json":
        return key, "json"
    last = "." + ext.rsplit(".", 1)[-1]
    if last in IMAGE_EXTENSIONS:
        if ext.startswith("target."):
            return key, "target"
        if ext.startswith("input.") or "." not in ext:
            return key, "input"
    return key, None


def iter_tar_records(path: str, read_from: int = 0) -> Iterator[Optional[Record]]:
    """Records of one shard in order; members of a key must be adjacent (as tar writers keep them).

    Records before `read_from` are not read (a resumed run skipping what it consumed) and come as
    None, as do records without an input image. A damaged shard is reported and the rest of it skipped.
    """
    current_key, parts, index = None, {}, 0

    def finish():
        if index < read_from:
            return None
        if "input" not in parts:
            log.warning("%s %s: sample %s has no input image, skipped", PREFIX, path, current_key)
            return None
        meta = {}
        if "json" in parts:
            try:
                meta = json.loads(parts["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                log.warning(
                    "%s %s: sample %s has unreadable json (%s); ignored", PREFIX, path, current_key, e
                )
        caption = (
            parts["caption"].decode("utf-8", "replace").strip() if "caption" in parts else meta.get("caption")
        )
        return Record(
            key=f"{os.path.basename(path)}:{current_key}",
            input=parts["input"],
            target=parts.get("target"),
            caption=caption,
            subject=meta.get("subject"),
        )

    try:
        with tarfile.open(path, mode="r|*") as tar:  # a stream: no seeking, works on pipes and huge files
            for member in tar:
                if not member.isfile():
                    continue
                key, role = _member_role(member.name)
                if key != current_key:
                    if current_key is not None:
                        yield finish()
                        index += 1
                    current_key, parts = key, {}
                if role is not None and index >= read_from:
                    f = tar.extractfile(member)
                    parts[role] = f.read() if f is not None else b""
            if current_key is not None:
                yield finish()
    except (tarfile.TarError, OSError, EOFError) as e:
        log.warning("%s shard %s is damaged or unreadable (%s); the rest of it is skipped", PREFIX, path, e)


class TarShardStream(IterableDataset):
    """An endless stream of samples from tar shards, split between ranks and data loader workers.

    With at least as many shards as (ranks x workers), each slot reads its own shards (the shard
    order reshuffled every pass, seeded); otherwise every slot reads all shards and keeps every
    n-th record. Each slot's stream is endless, so no rank runs out before another. A resumed run
    skips the records the interrupted run consumed without reading their images. Unreadable
    records yield None, so record counts, and therefore resume positions, never depend on which
    images fail.
    """

    def __init__(
        self,
        shards: Sequence[str],
        config: SampleConfig,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        start_batch: int = 0,
    ):
        if not shards:
            raise ValueError("no tar shards")
        self.shards, self.config, self.batch_size = list(shards), config, batch_size
        self.rank, self.world, self.start_batch = rank, world, start_batch

    def _slot(self) -> tuple[int, int, int]:
        """(slot, slots, records to skip) for this worker."""
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        # The loader takes batch j from worker j % workers: count this worker's batches before start_batch.
        consumed_batches = len(range(worker, self.start_batch, workers))
        return self.rank * workers + worker, self.world * workers, consumed_batches * self.batch_size

    def __iter__(self) -> Iterator[Optional[dict]]:
        slot, slots, skip = self._slot()
        own_shards = len(self.shards) >= slots
        count = 0  # this slot's records so far
        seen = 0  # records read in shared mode, all slots together
        epoch = 0
        while True:
            count_at_pass = count
            order = list(self.shards)
            random.Random(mix_seed(self.config.seed, "shards", epoch)).shuffle(order)
            for shard in order[slot::slots] if own_shards else order:
                read_from = max(0, skip - count) if own_shards else max(0, skip * slots - seen)
                for record in iter_tar_records(shard, read_from=read_from):
                    if not own_shards:
                        seen += 1
                        if (seen - 1) % slots != slot:
                            continue
                    position = count
                    count += 1
                    if position < skip:
                        continue
                    yield (
                        None
                        if record is None
                        else load_sample(record, self.config, mix_seed("stream", slot, position))
                    )
            epoch += 1
            if count == count_at_pass:
                raise RuntimeError(
                    f"the tar shards ({len(self.shards)}, e.g. {self.shards[0]}) hold no samples for "
                    f"data loader slot {slot} of {slots}"
                )
