"""Paper-scale run shapes: the global batch split over processes and accumulation, and epochs as steps.

The paper trains faces with a global batch of 32 at 512 px then 16 at 1024 px, pets with 128 then 32
(docs/ARCHITECTURE.md §6). A global batch is per-device batch x processes x gradient accumulation:
`--global_batch_size` (default: the preset's for the resolution's phase) is split over the processes
`accelerate launch` / torchrun start ($WORLD_SIZE), the per-device batch lowered to fit when it was not
given, the accumulation derived; what does not divide evenly is refused (the rule declared on
TrainConfig.global_batch_size), never rounded. What changes when a run is resumed with another layout:
training.loop.checkpoints.batch_mismatch.
"""

from __future__ import annotations

import math
import os
from typing import Any


def launcher_world_size() -> int:
    """The processes of this launch: $WORLD_SIZE, which torchrun and `accelerate launch` set (1 without)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def batch_sizes(preset: Any, values: dict) -> dict:
    """train_batch_size, gradient_accumulation_steps and global_batch_size from the flags and the preset.

    `values` holds the flags (None where not given) with resolution and num_processes resolved. A global
    batch (--global_batch_size, else the preset's for this resolution when no accumulation is given) is
    split as per-device batch x processes x accumulation: the accumulation is derived, and the per-device
    batch, when not given, is the largest up to the preset's that divides the global batch per process.
    Without a global batch, accumulation defaults to 1.
    """
    world = values["num_processes"]
    batch, accumulation = values["train_batch_size"], values["gradient_accumulation_steps"]
    total = values["global_batch_size"]
    if total is None and accumulation is None and preset.global_batch_sizes:
        phases = [i for i, r in enumerate(preset.resolutions) if r <= values["resolution"]]
        phase = min(phases[-1] if phases else 0, len(preset.global_batch_sizes) - 1)
        total = preset.global_batch_sizes[phase]
    if total is None:
        batch = preset.train_batch_size if batch is None else batch
        accumulation = 1 if accumulation is None else accumulation
        total = batch * world * accumulation
        return {"train_batch_size": batch, "gradient_accumulation_steps": accumulation, "global_batch_size": total}
    if batch is None:
        per_process = total // world if total % world == 0 else 0
        batch = max((d for d in range(1, preset.train_batch_size + 1) if per_process % d == 0), default=1)
        batch = batch if per_process else preset.train_batch_size
    if accumulation is None:
        accumulation = max(1, total // (batch * world))
    return {"train_batch_size": batch, "gradient_accumulation_steps": accumulation, "global_batch_size": total}


def epochs_to_steps(epochs: float, samples: int, global_batch: int) -> int:
    """Optimizer steps for `epochs` passes over `samples` records at `global_batch` samples per step."""
    return max(1, math.ceil(epochs * samples / global_batch))
