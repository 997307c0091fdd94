"""Checkpoints: save (accelerate's state + the node file + each process's position), prune, resume.

A checkpoint is the folder <output_dir>/checkpoint-N: accelerate's `save_state` (encoder, optimizer,
scheduler, random states, EMA), the encoder exported as the nodes load it
(<domain>-encoder.safetensors), and one trainer_state-<rank>.json per process saying where its data
stream stands (for an exact resume) and a fingerprint of the weights it holds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

log = logging.getLogger("training")
PREFIX = "[nested-attention]"
FOLDER = re.compile(r"checkpoint-(\d+)")


@dataclass(frozen=True)
class ProcessState:
    """What one process writes into each checkpoint (trainer_state-<rank>.json)."""

    global_step: int  # optimizer steps done
    batches: int  # batches this process has drawn (its data stream's position)
    world: int  # processes of the run
    weights_sha256: str  # fingerprint of the encoder it holds (equal on every process)
    initial_weights_sha256: str  # fingerprint of the encoder the run started from
    batch_keys: list = field(default_factory=list)  # keys of its last batch
    train_batch_size: Optional[int] = None  # per-device batch of the run (None: a checkpoint from before)
    gradient_accumulation_steps: Optional[int] = None  # batches per optimizer step


@dataclass(frozen=True)
class Position:
    """Where a run continues: optimizer steps and batches already done (0, 0 for a new run)."""

    global_step: int = 0
    batches: int = 0


def checkpoint_steps(output_dir: Path) -> list[tuple[int, Path]]:
    """The checkpoint-N folders in `output_dir`, oldest first, with their N."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = FOLDER.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_resume(resume_from: Optional[str], output_dir: Path) -> Optional[Path]:
    """The folder to resume from: the given one, the newest for 'latest' (None when there is none)."""
    if not resume_from:
        return None
    if resume_from != "latest":
        return Path(resume_from)
    found = checkpoint_steps(output_dir)
    if not found:
        log.info("%s no checkpoint in %s; starting a new run", PREFIX, output_dir)
        return None
    return found[-1][1]


def prune(output_dir: Path, limit: Optional[int], saving: int) -> None:
    """Delete the oldest checkpoints so that, with checkpoint-`saving` written, at most `limit` remain
    (None or 0: keep all)."""
    if not limit:
        return
    existing = [path for step, path in checkpoint_steps(output_dir) if step != saving]
    for old in existing[: max(0, len(existing) - limit + 1)]:
        log.info("%s removing old checkpoint %s (--checkpoints_total_limit %d)", PREFIX, old, limit)
        shutil.rmtree(old)


def weights_fingerprint(module) -> str:
    """SHA-256 of a module's parameters: equal on every process of a distributed run after each step."""
    digest = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_position(folder: Path, rank: int, accumulation: int) -> Position:
    """This process's position from its trainer_state file (older checkpoints: from the folder's N)."""
    state_file = folder / f"trainer_state-{rank}.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    step = int(state.get("global_step", FOLDER.fullmatch(folder.name).group(1)))
    return Position(global_step=step, batches=int(state.get("batches", step * accumulation)))


def batch_mismatch(folder: Path, *, world: int, batch_size: int, accumulation: int) -> Optional[str]:
    """What differs between the run that wrote `folder` and this one (processes, per-device batch,
    accumulation), as a warning; None when nothing does or the checkpoint does not say."""
    states = sorted(Path(folder).glob("trainer_state-*.json"))
    if not states:
        return None
    saved = json.loads(states[0].read_text())
    then = {
        "processes": saved.get("world"),
        "batch size per device": saved.get("train_batch_size"),
        "gradient accumulation steps": saved.get("gradient_accumulation_steps"),
    }
    now = {
        "processes": world,
        "batch size per device": batch_size,
        "gradient accumulation steps": accumulation,
    }
    changed = [f"{k} {then[k]} -> {now[k]}" for k in now if then[k] is not None and then[k] != now[k]]
    if not changed:
        return None
    return (
        f"{PREFIX} resuming {folder} with a different batch layout ({', '.join(changed)}): the data order "
        "does not continue where it stopped (samples may repeat or be skipped), and the global batch, "
        "hence the effective learning rate, may differ. Launch with the interrupted run's settings to "
        "continue it exactly."
    )


class Checkpoints:
    """Saves and restores a run's checkpoints through accelerate, in `output_dir`.

    `export(path, step)` writes the node weight file; it runs on the main process only.
    """

    def __init__(
        self,
        *,
        accelerator: Any,
        output_dir: Path,
        limit: Optional[int],
        encoder_file: str,
        export: Callable[[Path, int], None],
    ):
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.limit = limit
        self.encoder_file = encoder_file
        self.export = export

    def save(self, step: int, state: ProcessState) -> Path:
        """checkpoint-`step`: prune older ones, save_state, export the encoder, write each process's state."""
        accelerator = self.accelerator
        if accelerator.is_main_process:
            prune(self.output_dir, self.limit, step)
        folder = self.output_dir / f"checkpoint-{step}"
        accelerator.save_state(str(folder))
        if accelerator.is_main_process:
            self.export(folder / self.encoder_file, step)
        accelerator.wait_for_everyone()
        folder.mkdir(parents=True, exist_ok=True)  # machines without a shared file system
        rank = accelerator.process_index
        (folder / f"trainer_state-{rank}.json").write_text(json.dumps(dataclasses.asdict(state), indent=1))
        return folder

    def resume(
        self, resume_from: Optional[str], accumulation: int, init_encoder: Optional[str], batch_size: int
    ) -> Position:
        """Load the state of `resume_from` (a folder or 'latest'); a new run's Position when there is none.
        Warns when the checkpoint was written with other processes, per-device batch or accumulation."""
        folder = find_resume(resume_from, self.output_dir)
        if folder is None:
            return Position()
        mismatch = batch_mismatch(
            folder, world=self.accelerator.num_processes, batch_size=batch_size, accumulation=accumulation
        )
        if mismatch and self.accelerator.is_main_process:
            log.warning(mismatch)
        if init_encoder:
            log.info("%s resuming from %s; --init_encoder is not used", PREFIX, folder)
        self.accelerator.load_state(str(folder))
        position = read_position(folder, self.accelerator.process_index, accumulation)
        log.info("%s resumed from %s at step %d", PREFIX, folder, position.global_step)
        return position
