"""The latent cache (--cache_latents): VAE latents and CLIP image tokens computed once, then read back.

`build_cache` (the writer) encodes every record once before training, split over the processes,
into <cache_dir>/<hash of records, crop, seed and models>/cache-<rank>.safetensors and marks the
folder complete; a later run with the same identity reuses it. `CachedDataset` (the reader) serves
the samples the data loader asks for from those files, in place of decoding and encoding images.
One crop per image: the cache cannot be combined with --random_flip (rejected in training.loop.config).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from nested_attention.logs import LOG_PREFIX as PREFIX
from training.data.captions import CaptionRule
from training.data.dataset import Record, SampleConfig, load_sample

log = logging.getLogger("training")


def build_cache(
    accelerator,
    frozen,
    records: Sequence[Record],
    config: SampleConfig,
    root: Path,
    *,
    model: str,
    batch_size: int,
) -> Path:
    """VAE latents and CLIP tokens of every record, computed once (split over processes) into safetensors."""
    from nested_attention_comfy.clip_vision import (
        clip_vision_tokens,  # imports ComfyUI: set up by training.models
    )

    identity = json.dumps(
        {
            "records": [
                [
                    r.key,
                    r.input if isinstance(r.input, str) else len(r.input),
                    r.target if isinstance(r.target, str) or r.target is None else len(r.target),
                ]
                for r in records
            ],
            "resolution": config.resolution,
            "center_crop": config.center_crop,
            "seed": config.seed,
            "model": model,
            "clip_vision": frozen.clip_vision_spec.describe(),
        },
        sort_keys=True,
    )
    folder = root / hashlib.sha256(identity.encode()).hexdigest()[:16]
    done = folder / "complete.json"
    if done.is_file():
        log.info("%s using the latent cache %s", PREFIX, folder)
        return folder
    rank, world = accelerator.process_index, accelerator.num_processes
    folder.mkdir(parents=True, exist_ok=True)
    mine = list(range(rank, len(records), world))
    rows = {"index": [], "latents": [], "clip_tokens": [], "time_ids": []}
    chunk = max(1, batch_size)
    for start in tqdm(
        range(0, len(mine), chunk), desc="caching latents", disable=not accelerator.is_main_process
    ):
        samples = [(i, load_sample(records[i], config, position=i)) for i in mine[start : start + chunk]]
        samples = [(i, s) for i, s in samples if s is not None]
        if not samples:
            continue
        with torch.no_grad():
            pixels = torch.stack([s["pixels"] for _, s in samples])
            latents = frozen.vae.encode(pixels).float().cpu()
            clip_pixels = torch.stack([s["clip_pixels"] for _, s in samples])
            clip = clip_vision_tokens(frozen.clip_vision, frozen.clip_vision_spec, clip_pixels).cpu()
        rows["index"].append(torch.tensor([i for i, _ in samples]))
        rows["latents"].append(latents)
        rows["clip_tokens"].append(clip)
        rows["time_ids"].append(torch.stack([s["time_ids"] for _, s in samples]))
    if rows["index"]:
        save_file(
            {k: torch.cat(v).contiguous() for k, v in rows.items()},
            str(folder / f"cache-{rank:04d}.safetensors"),
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        done.write_text(json.dumps({"records": len(records), "processes": world}))
    accelerator.wait_for_everyone()
    return folder


class CachedDataset(Dataset):
    """Samples from a latent cache (written by build_cache): latents, CLIP tokens, time ids, caption."""

    def __init__(self, folder: Path, records: Sequence[Record], captions: CaptionRule):
        from safetensors import safe_open

        self.folder, self.records, self.captions = folder, list(records), captions
        self.where: dict[int, tuple[str, int]] = {}
        for path in sorted(folder.glob("cache-*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                for row, index in enumerate(f.get_tensor("index").tolist()):
                    self.where[int(index)] = (str(path), row)
        self._open: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.records)

    def _file(self, path: str):
        from safetensors import safe_open

        if path not in self._open:  # opened lazily, once per worker process
            self._open[path] = safe_open(path, framework="pt")
        return self._open[path]

    def __getitem__(self, item: tuple[int, int]) -> dict | None:
        index, _ = item
        if index not in self.where:
            return None  # unreadable when the cache was built (logged then)
        path, row = self.where[index]
        f = self._file(path)
        record = self.records[index]
        return {
            "key": record.key,
            "latents": f.get_slice("latents")[row],
            "clip_tokens": f.get_slice("clip_tokens")[row],
            "time_ids": f.get_slice("time_ids")[row],
            "caption": self.captions.apply(record.caption, record.subject),
        }
