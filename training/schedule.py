"""Paper-scale run shapes: global batch sizes from the presets, epochs as steps, and resume checks.

The paper trains faces with a global batch of 32 at 512 px then 16 at 1024 px, pets with 128 then 32
(docs/ARCHITECTURE.md §6). A global batch is per-device batch x processes x gradient accumulation; the presets fix the
global batch of each phase and the per-device batch, and the accumulation makes up the rest for however
many processes `accelerate launch` starts (its WORLD_SIZE).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

log = logging.getLogger(__name__)
PREFIX = "[nested-attention]"


def world_size() -> int:
    """Processes of this run, as accelerate launch / torchrun announce them (1 when run directly)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def accumulation_for_global_batch(
    train_batch_size: int,
    resolution: int,
    global_batches: tuple[int, ...],
    resolutions: tuple[int, ...],
    world: int | None = None,
) -> int:
    """The --gradient_accumulation_steps that makes the preset's global batch at `resolution` (1 without one)."""
    if not global_batches:
        return 1
    world = world or world_size()
    phase = resolutions.index(resolution) if resolution in resolutions else 0
    target = global_batches[min(phase, len(global_batches) - 1)]
    per_step = train_batch_size * world
    accumulation = max(1, round(target / per_step))
    got = per_step * accumulation
    if got != target:
        log.warning(
            "%s the preset's global batch at %d px is %d; %d per device x %d processes gives %d with "
            "accumulation %d. Set --train_batch_size or --gradient_accumulation_steps to choose.",
            PREFIX,
            resolution,
            target,
            train_batch_size,
            world,
            got,
            accumulation,
        )
    return accumulation


def epochs_to_steps(run: Any, samples: int, world: int) -> int:
    """Optimizer steps for --num_train_epochs passes over `samples` records at the run's global batch."""
    global_batch = run.train_batch_size * world * run.gradient_accumulation_steps
    return max(1, math.ceil(run.num_train_epochs * samples / global_batch))


def resume_warnings(state: dict, run: Any, world: int) -> list[str]:
    """What differs between the checkpoint's run shape and this run's (data order and global batch)."""
    out = []
    for name, now in (
        ("world", world),
        ("train_batch_size", run.train_batch_size),
        ("gradient_accumulation_steps", run.gradient_accumulation_steps),
    ):
        before = state.get(name)
        if before is not None and before != now:
            what = "processes" if name == "world" else f"--{name}"
            out.append(
                f"resuming with {what} {now}, the checkpoint was saved with {before}: the global batch "
                "and the order of the data differ from the interrupted run's (it is not an exact resume)."
            )
    return out
