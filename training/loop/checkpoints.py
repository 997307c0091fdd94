"""Checkpoints: save (accelerate's state + the node file + each process's position), prune, resume.

A checkpoint is the folder <output_dir>/checkpoint-N: accelerate's `save_state` (encoder, optimizer,
scheduler, random states, EMA), the encoder exported as the nodes load it
(<domain>-encoder.safetensors), and one trainer_state-<rank>.json per process saying where its data
stream stands (for an exact resume) and a fingerprint of the weights it holds.

The folder is written as a unit: everything goes into checkpoint-N.partial, each file is flushed to disk,
a completion marker (complete.json: every file's name and size) is written last, and only then is the
folder renamed to checkpoint-N (one atomic rename). So a run killed at any moment leaves either a
complete checkpoint-N or a checkpoint-N.partial that no resume ever reads (the next save deletes it);
`--resume_from_checkpoint latest` takes the newest folder whose marker matches its files. Older
checkpoints are pruned only after the new one is complete, so a failed write (a full disk) leaves them
all intact, and each is renamed checkpoint-N.deleting before it is deleted, so a kill while deleting
never leaves half a folder under a checkpoint's name.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nested_attention.logs import LOG_PREFIX as PREFIX

log = logging.getLogger("training")
FOLDER = re.compile(r"checkpoint-(\d+)")
PARTIAL = ".partial"  # checkpoint-N.partial: a checkpoint being written (never resumed from)
DELETING = ".deleting"  # checkpoint-N.deleting: an old checkpoint being pruned
REPLACED = ".replaced"  # checkpoint-N.replaced: an older checkpoint-N while finalize puts the new one in place
MARKER = "complete.json"  # written last into a checkpoint: {"step": N, "files": {name: size in bytes}}
# Errors that mean "the disk is full" (ENOSPC), "over quota" (EDQUOT) or "file too large" (EFBIG, a file
# size limit): a write failure the user fixes by freeing space, not a bug.
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


@dataclass(frozen=True)
class ProcessState:
    """What one process writes into each checkpoint (trainer_state-<rank>.json)."""

    global_step: int  # optimizer steps done
    batches: int  # batches this process has drawn (its data stream's position)
    world: int  # processes of the run
    weights_sha256: str  # fingerprint of the encoder it holds (equal on every process)
    initial_weights_sha256: str  # fingerprint of the encoder the run started from
    batch_keys: list = field(default_factory=list)  # keys of its last batch
    train_batch_size: int | None = None  # per-device batch of the run (None: a checkpoint from before)
    gradient_accumulation_steps: int | None = None  # batches per optimizer step


@dataclass(frozen=True)
class Position:
    """Where a run continues: optimizer steps and batches already done (0, 0 for a new run)."""

    global_step: int = 0
    batches: int = 0
    weights_sha256: str | None = None  # the fingerprint the checkpoint recorded (None: new run / not said)


class CheckpointWriteError(SystemExit):
    """A checkpoint or export could not be written (disk full, quota, permissions); the message says which
    file, what is left intact and what to do. A SystemExit: the trainer stops with this message only."""


def checkpoint_steps(output_dir: Path) -> list[tuple[int, Path]]:
    """The checkpoint-N folders in `output_dir`, oldest first, with their N (complete or not)."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = FOLDER.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def incomplete_reason(folder: Path) -> str | None:
    """Why `folder` is not a complete checkpoint (no marker, a file missing or of another size), or None."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
        files = dict(marker["files"])
    except FileNotFoundError:
        return f"no completion marker ({MARKER})"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable completion marker ({e})"
    for name, size in sorted(files.items()):
        path = Path(folder) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the marker says {size}"
    return None


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """The complete checkpoint-N folders in `output_dir`, oldest first."""
    return [(step, path) for step, path in checkpoint_steps(output_dir) if incomplete_reason(path) is None]


def find_resume(resume_from: str | None, output_dir: Path) -> Path | None:
    """The folder to resume from: the given one, the newest complete one for 'latest' (None when there is
    none). An incomplete folder given by name stops the run; 'latest' skips incomplete ones with a warning."""
    if not resume_from:
        return None
    if resume_from != "latest":
        folder = Path(resume_from)
        reason = incomplete_reason(folder)
        if reason is not None and (folder / MARKER).exists():
            raise SystemExit(
                f"{PREFIX} --resume_from_checkpoint {folder} is not a complete checkpoint: {reason}. Resume from "
                "an earlier checkpoint-N folder (or 'latest', the newest complete one)."
            )
        if reason is not None:  # a checkpoint from a trainer before completion markers, or a partial copy
            log.warning("%s %s has %s; resuming from it as asked (it may be incomplete)", PREFIX, folder, reason)
        return folder
    found = checkpoint_steps(output_dir)
    for step, path in reversed(found):
        reason = incomplete_reason(path)
        if reason is None:
            return path
        log.warning(
            "%s skipping %s: %s (an interrupted write, or a trainer before completion markers: give it to "
            "--resume_from_checkpoint by name to use it anyway)", PREFIX, path, reason
        )
    log.info("%s no complete checkpoint in %s; starting a new run", PREFIX, output_dir)
    return None


def prune(output_dir: Path, limit: int | None) -> None:
    """Delete the oldest complete checkpoints so that at most `limit` remain (None or 0: keep all). Called
    once the newest is complete, so a failed write never costs an earlier checkpoint."""
    if not limit:
        return
    existing = complete_checkpoints(output_dir)
    for _, old in existing[: max(0, len(existing) - limit)]:
        log.info("%s removing old checkpoint %s (--checkpoints_total_limit %d)", PREFIX, old, limit)
        # Renamed first: a run killed while deleting leaves a checkpoint-N.deleting, never a half-deleted
        # folder under a checkpoint's name.
        doomed = old.with_name(old.name + DELETING)
        os.replace(old, doomed)
        shutil.rmtree(doomed)


def remove_partial(output_dir: Path) -> None:
    """Delete checkpoint-N.partial and .deleting folders, writes and deletions that a killed or failed run
    left unfinished; put back a checkpoint-N.replaced that a run killed inside `finalize` left without its
    replacement."""
    for suffix, what in ((PARTIAL, "an unfinished checkpoint write"), (DELETING, "an unfinished deletion")):
        for path in Path(output_dir).glob(f"checkpoint-*{suffix}"):
            if path.is_dir():
                log.info("%s removing %s (%s)", PREFIX, path, what)
                shutil.rmtree(path, ignore_errors=True)
    for path in Path(output_dir).glob(f"checkpoint-*{REPLACED}"):
        original = path.with_name(path.name[: -len(REPLACED)])
        if original.exists():
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.replace(path, original)


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finalize(partial: Path, folder: Path, step: int) -> None:
    """Make `partial` the complete checkpoint `folder`: flush its files, write the marker last, rename.

    The rename is atomic: `folder` either does not exist or holds every file. A `folder` of the same name
    (a run resumed from an earlier step writes it again) is moved aside first and deleted afterwards."""
    files = {}
    for path in sorted(partial.iterdir()):
        if path.is_file():
            fsync_path(path)
            files[path.name] = path.stat().st_size
    marker = partial / MARKER
    marker.write_text(json.dumps({"step": step, "files": files}, indent=1))
    fsync_path(marker)
    fsync_path(partial)
    stale = None
    if folder.exists():
        stale = folder.with_name(folder.name + REPLACED)
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(folder, stale)
    os.replace(partial, folder)
    fsync_path(folder.parent)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or an error it wraps) is a full disk, a quota or a file size limit. torch and
    safetensors wrap the OSError: safetensors keeps its text ("os error 28"), torch only says its write
    failed, which `write_failure` tells by the free space left."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL:
            return True
        if any(f"os error {code})" in str(seen) for code in DISK_FULL):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def write_failure(what: Path, error: BaseException, output_dir: Path, removed: bool = True) -> CheckpointWriteError:
    """The error a failed write stops the run with: which file, why, what is intact, what to do.
    `removed`: the unfinished write was deleted (a checkpoint's partial folder)."""
    intact = complete_checkpoints(output_dir)
    try:
        free = shutil.disk_usage(output_dir).free
    except OSError:
        free = None
    # Less room left than the last checkpoint took: the disk is full whatever the error says.
    full = is_disk_full(error) or (free is not None and bool(intact) and free < folder_bytes(intact[-1][1]))
    return CheckpointWriteError(
        f"{PREFIX} could not write {what} ({type(error).__name__}: {error}). "
        + (f"{free / 2**20:.0f} MiB free there now" if free is not None else "Free space unknown")
        + (f", a checkpoint takes {folder_bytes(intact[-1][1]) / 2**20:.0f} MiB" if intact else "")
        + (": the disk (or your quota, or a file size limit) is full. " if full else ". ")
        + ("The unfinished write was removed; earlier" if removed else "The")
        + " checkpoints are intact"
        + (f" ({', '.join(path.name for _, path in intact)})" if intact else " (there are none yet)")
        + ". Free some space (or give --output_dir on a larger disk, or a lower --checkpoints_total_limit), "
        "then continue with --resume_from_checkpoint latest."
    )


def read_position(folder: Path, rank: int, accumulation: int) -> Position:
    """This process's position from its trainer_state file (older checkpoints: from the folder's N)."""
    state_file = folder / f"trainer_state-{rank}.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    step = int(state.get("global_step", FOLDER.fullmatch(folder.name).group(1)))
    return Position(
        global_step=step,
        batches=int(state.get("batches", step * accumulation)),
        weights_sha256=state.get("weights_sha256"),
    )


def batch_mismatch(folder: Path, *, world: int, batch_size: int, accumulation: int) -> str | None:
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
        limit: int | None,
        encoder_file: str,
        export: Callable[[Path, int], None],
    ):
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.limit = limit
        self.encoder_file = encoder_file
        self.export = export

    def save(self, step: int, state: ProcessState) -> Path:
        """checkpoint-`step`, written as a unit (module docstring): save_state, the encoder export and each
        process's state into checkpoint-`step`.partial, then the marker and the rename; then prune.
        A failed write removes the partial folder and stops the run with CheckpointWriteError."""
        accelerator = self.accelerator
        folder = self.output_dir / f"checkpoint-{step}"
        partial = self.output_dir / f"checkpoint-{step}{PARTIAL}"
        if accelerator.is_local_main_process:
            remove_partial(self.output_dir)
        accelerator.wait_for_everyone()

        def written(action: Callable[[], None]) -> None:
            try:
                action()
            except Exception as e:  # anything a write raises (OSError, torch's and safetensors' wrappers)
                shutil.rmtree(partial, ignore_errors=True)
                raise write_failure(folder, e, self.output_dir) from e

        written(lambda: self._write(partial, step, state))
        accelerator.wait_for_everyone()
        # The main process finalizes; on machines without a shared file system, each machine's first process
        # then finalizes the copy on its own disk.
        if accelerator.is_main_process:
            written(lambda: finalize(partial, folder, step))
        accelerator.wait_for_everyone()
        if accelerator.is_local_main_process and partial.exists():
            written(lambda: finalize(partial, folder, step))
        if accelerator.is_main_process:
            prune(self.output_dir, self.limit)
        return folder

    def _write(self, partial: Path, step: int, state: ProcessState) -> None:
        """This process's part of a checkpoint, into `partial`."""
        self.accelerator.save_state(str(partial))
        if self.accelerator.is_main_process:
            self.export(partial / self.encoder_file, step)
        partial.mkdir(parents=True, exist_ok=True)  # machines without a shared file system
        text = json.dumps(dataclasses.asdict(state), indent=1)
        (partial / f"trainer_state-{self.accelerator.process_index}.json").write_text(text)

    def resume(
        self, resume_from: str | None, accumulation: int, init_encoder: str | None, batch_size: int
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

    def check_resumed(self, position: Position, fingerprint: str, resume_from: str | None) -> None:
        """Stop when the weights just loaded are not those the checkpoint's trainer_state recorded (a
        checkpoint assembled from two writes, or damaged): continuing would train from unknown weights."""
        if position.weights_sha256 is not None and position.weights_sha256 != fingerprint:
            raise SystemExit(
                f"{PREFIX} the checkpoint resumed from ({resume_from}) is inconsistent: its model weights are "
                "not the ones its trainer_state file recorded. Resume from an earlier checkpoint-N folder."
            )
