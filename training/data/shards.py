"""Streamed tar shards: records of one shard in order, and an endless sample stream split between ranks.

Shards are read with the standard library's `tarfile` as a stream, never unpacked, so a data set can
be larger than the disk. Members are grouped by key (the member name up to the first dot of its base
name), as webdataset writes them: `<key>.jpg|png|webp` (or `<key>.input.<ext>`) the input,
`<key>.target.<ext>` the target, `<key>.txt` the caption, `<key>.json` {"caption", "subject",
"face_box"}, `<key>.mask.png` the mask. Samples are made by training.data.dataset.load_sample, as for manifests
and folders.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tarfile
from collections.abc import Iterator, Sequence

from torch.utils.data import IterableDataset, get_worker_info

from training.data.dataset import PREFIX, Record, SampleConfig, load_sample, mix_seed
from training.data.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)


def _member_role(name: str) -> tuple[str, str | None]:
    """(key, role) of a tar member: role "input", "target", "caption", "json" or None (ignored)."""
    directory, base = os.path.split(name)
    if "." not in base:
        return name, None
    stem, ext = base.split(".", 1)
    key = os.path.join(directory, stem)
    ext = ext.lower()
    if ext in ("txt", "caption", "caption.txt"):
        return key, "caption"
    if ext.startswith("mask.") and "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
        return key, "mask"
    if ext == "json":
        return key, "json"
    last = "." + ext.rsplit(".", 1)[-1]
    if last in IMAGE_EXTENSIONS:
        if ext.startswith("target."):
            return key, "target"
        if ext.startswith("input.") or "." not in ext:
            return key, "input"
    return key, None


def iter_tar_records(path: str, read_from: int = 0) -> Iterator[Record | None]:
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
            mask=parts.get("mask"),
            face_box=tuple(float(v) for v in meta["face_box"]) if meta.get("face_box") else None,
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

    def __iter__(self) -> Iterator[dict | None]:
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
