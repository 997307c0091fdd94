"""The trainer under faults, through the real `python -m training.run --domain tiny` (tests/trainer_faults.py):
SIGKILL during checkpoint writes, SIGTERM, a full disk; and the pieces that make it safe, one by one."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
import trainer_faults as faults

from nested_attention.weights import write_safetensors
from training.loop import checkpoints as checkpoints_lib


@pytest.fixture(scope="module")
def launcher():
    """One fork server for the module's trainer starts (each start is its own forked child, tests/trainer_faults.py)."""
    launcher = faults.Launcher(fork=True)
    yield launcher
    launcher.close()


@pytest.mark.slow
@pytest.mark.xdist_group("trainer_faults")  # one worker, one fork server
def test_sigkill_during_checkpoint_writes_always_resumes_from_the_newest_whole_checkpoint(tmp_path, launcher):
    """10 kills inside checkpoint writes (random moments, seed 0), then SIGTERM, then a run to the end."""
    report = faults.campaign(launcher, tmp_path, kills=10, seed=0)
    print(faults.summary(report))
    assert not report.problems, faults.summary(report)
    kills = report.kills()
    assert sum(t.mid_write for t in kills) >= 10
    assert all(t.returncode == -9 for t in kills)
    # Each start resumed from the newest checkpoint-N there was (none for the first), never from a partial one.
    assert report.trials[0].resumed_from is None
    for trial in report.trials[1:]:
        assert trial.resumed_from == trial.expected_from and trial.resumed_from.startswith("checkpoint-")
    assert report.checked_folders >= len(report.trials)  # every checkpoint-N folder seen loaded whole
    assert report.repeated_steps >= 10  # the steps after each killed write were trained again, same losses
    (sigterm,) = [t for t in report.trials if t.signal == "SIGTERM"]
    assert sigterm.returncode == 0
    assert "stopped by SIGTERM after step" in sigterm.log


@pytest.mark.slow
@pytest.mark.xdist_group("trainer_faults")
@pytest.mark.parametrize("how", ["tmpfs", "file size limit"])
def test_a_full_disk_stops_with_a_clear_error_and_leaves_earlier_checkpoints_intact(tmp_path, how, launcher):
    if how == "tmpfs" and not faults.can_mount_tmpfs():
        pytest.skip("mounting a small tmpfs needs root; the 'file size limit' case gives the same write error")
    result = faults.disk_full(launcher, tmp_path, how)
    assert result.returncode == 1, result.message
    assert "could not write" in result.message and "checkpoint-2" in result.message, result.message
    assert "is full" in result.message and "earlier checkpoints are intact (checkpoint-1)" in result.message
    assert "--resume_from_checkpoint latest" in result.message
    assert result.intact_before and result.intact_after == result.intact_before  # byte for byte
    assert result.partial_left == []


# ------------------------------------------------------------------------------------------------
# The pieces


def checkpoint(output_dir, step, files=None, finish=True):
    """checkpoint-`step` as Checkpoints.save writes it (`finish`: marker and rename; else left partial)."""
    partial = output_dir / f"checkpoint-{step}{checkpoints_lib.PARTIAL}"
    partial.mkdir(parents=True)
    for name, text in (files or {"model.safetensors": "weights", "trainer_state-0.json": "{}"}).items():
        (partial / name).write_text(text)
    if finish:
        checkpoints_lib.finalize(partial, output_dir / f"checkpoint-{step}", step)
    return output_dir / f"checkpoint-{step}"


def test_latest_is_the_newest_complete_checkpoint_never_a_partial_or_unmarked_one(tmp_path, caplog):
    checkpoint(tmp_path, 2)
    checkpoint(tmp_path, 3, finish=False)  # killed while writing
    unmarked = tmp_path / "checkpoint-4"  # a folder with the final name but no marker
    unmarked.mkdir()
    shortened = checkpoint(tmp_path, 5)
    (shortened / "model.safetensors").write_text("cut")  # not the size the marker recorded
    assert checkpoints_lib.find_resume("latest", tmp_path) == tmp_path / "checkpoint-2"
    assert "checkpoint-5: model.safetensors has 3 bytes, the marker says 7" in caplog.text
    assert "checkpoint-4: no completion marker" in caplog.text
    with pytest.raises(SystemExit, match="checkpoint-5 is not a complete checkpoint: model.safetensors has 3"):
        checkpoints_lib.find_resume(str(shortened), tmp_path)
    assert checkpoints_lib.find_resume(str(unmarked), tmp_path) == unmarked  # by name: warned, allowed
    checkpoints_lib.remove_partial(tmp_path)
    assert not (tmp_path / "checkpoint-3.partial").exists()


def test_pruning_never_leaves_a_half_deleted_folder_under_a_checkpoints_name(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        checkpoint(tmp_path, step)

    def killed_half_way(path, *args, **kwargs):  # rmtree killed after the first file
        next(p for p in sorted(path.iterdir())).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints_lib.shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        checkpoints_lib.prune(tmp_path, 2)
    monkeypatch.undo()
    # checkpoint-1 is out of the way under another name; the next save deletes it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1.deleting", "checkpoint-2", "checkpoint-3"]
    checkpoints_lib.remove_partial(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]


def test_finalize_replaces_a_checkpoint_of_the_same_step_and_a_kill_inside_it_loses_neither(tmp_path):
    old = checkpoint(tmp_path, 6, {"model.safetensors": "old"})
    checkpoint(tmp_path, 6, {"model.safetensors": "new"})
    assert (old / "model.safetensors").read_text() == "new" and checkpoints_lib.incomplete_reason(old) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6"]
    # Killed between the two renames: the older checkpoint-6 waits under .replaced; the next save puts it back.
    os.replace(old, tmp_path / "checkpoint-6.replaced")
    checkpoints_lib.remove_partial(tmp_path)
    assert checkpoints_lib.find_resume("latest", tmp_path) == old


def test_resumed_weights_that_are_not_the_recorded_ones_stop_the_run(tmp_path):
    checkpoints = checkpoints_lib.Checkpoints(accelerator=None, output_dir=tmp_path, limit=3, encoder_file="x",
                                              export=None)
    position = checkpoints_lib.Position(global_step=4, batches=4, weights_sha256="abc")
    checkpoints.check_resumed(position, "abc", "latest")
    with pytest.raises(SystemExit, match="inconsistent: its model weights are not the ones its trainer_state"):
        checkpoints.check_resumed(position, "def", "latest")


def test_write_failure_names_the_file_what_is_intact_and_what_to_do(tmp_path):
    checkpoint(tmp_path, 1)
    error = OSError(28, "No space left on device")
    message = str(checkpoints_lib.write_failure(tmp_path / "checkpoint-2", error, tmp_path).code)
    assert message.startswith(f"[nested-attention] could not write {tmp_path / 'checkpoint-2'} (OSError: ")
    assert "the disk (or your quota, or a file size limit) is full" in message
    assert "The unfinished write was removed; earlier checkpoints are intact (checkpoint-1)" in message
    assert message.endswith("then continue with --resume_from_checkpoint latest.")
    # torch only says its write failed; safetensors keeps the OS error's number in its text.
    assert checkpoints_lib.is_disk_full(RuntimeError("x")) is False
    assert checkpoints_lib.is_disk_full(RuntimeError("I/O error: File too large (os error 27)"))
    wrapped = RuntimeError("file write failed")
    wrapped.__cause__ = OSError(122, "Disk quota exceeded")
    assert checkpoints_lib.is_disk_full(wrapped)


def test_write_safetensors_is_atomic_and_follows_the_umask(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    path = tmp_path / "encoder.safetensors"
    write_safetensors(str(path), {"w": torch.ones(3)}, {"format": "x"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~current_umask()  # safetensors alone writes 0600
    umask = os.umask(0o027)
    try:
        write_safetensors(str(path), {"w": torch.zeros(3)}, {"format": "x"})
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert torch.equal(load_file(str(path))["w"], torch.zeros(3))

    def fail_half_way(tensors, filename, metadata=None):  # a writer that dies after writing part of the file
        with open(filename, "wb") as f:
            f.write(b"\x08\x00\x00\x00")
        raise OSError(28, "No space left on device")

    from nested_attention import weights

    monkeypatch.setattr(weights, "save_file", fail_half_way)
    with pytest.raises(OSError, match="No space left"):
        write_safetensors(str(path), {"w": torch.full((3,), 7.0)}, {"format": "x"})
    assert torch.equal(load_file(str(path))["w"], torch.zeros(3))  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["encoder.safetensors"]  # no temporary file left


def current_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def test_sigterm_before_training_starts_exits_0_at_once():
    import signal

    from training.loop.preemption import Preempted, StopRequest

    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop, pytest.raises(Preempted) as stopped:
        os.kill(os.getpid(), signal.SIGTERM)
    assert stopped.value.code == 0 and stop.requested
    with StopRequest() as stop:
        stop.in_loop = True
        os.kill(os.getpid(), signal.SIGTERM)  # in the loop: only noted, the step goes on
        assert stop.requested
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


def test_checkpoint_marker_lists_every_file_with_its_size(tmp_path):
    folder = checkpoint(tmp_path, 3, {"a.bin": "12345", "trainer_state-0.json": "{}"})
    marker = json.loads((folder / checkpoints_lib.MARKER).read_text())
    assert marker == {"step": 3, "files": {"a.bin": 5, "trainer_state-0.json": 2}}
