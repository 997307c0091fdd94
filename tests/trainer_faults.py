"""The trainer under faults: SIGKILL during checkpoint writes, SIGTERM, a disk that fills up.

    .venv/bin/python tests/trainer_faults.py [--kills 10] [--seed 0] [--workdir DIR] [--disk-full]

Runs the real `python -m training.run --domain tiny` as a subprocess, a checkpoint every step:

- kills: each trial starts the trainer (resuming from `latest`), waits for its k-th checkpoint write to
  begin (k = 1 or 2; the first trial watches one whole write to time it), sends SIGKILL after a random
  delay within that write's duration, and records where the write was (its last file). The next start
  must resume from the newest checkpoint-N folder, and every checkpoint-N folder must be whole: each of
  its files loads (safetensors, torch, JSON), judged here without the trainer's own marker check.
- SIGTERM: one more start is sent SIGTERM at a random moment of a training step; it must exit 0 with a
  checkpoint of the step it was in (or the next one), and a last start resumes from it and finishes.
- losses: every step that two runs both trained (a killed run's last steps are trained again after its
  resume) must have the same loss, to the bit: the resumed state is exactly the state that was saved.
- disk full (--disk-full): the output folder on a small tmpfs (root only; else a file size limit set on
  the running trainer with prlimit, the same write error by another name): the run must stop with the
  trainer's message and leave its earlier checkpoints byte for byte as they were.

Each start is a new `python -m training.run` process. With --fork, starts are forked from one process
that has already imported what the trainer imports (torch, accelerate, ComfyUI: about 5 s of CPU per
start) and then run `training.run` as `__main__`, as `python -m` does: the same program, minus the
imports. `tests/test_trainer_faults.py` runs a fixed-seed campaign that way.

Prints what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTIAL = ".partial"  # training.loop.checkpoints.PARTIAL (kept literal: this tool judges the folders on its own)
RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")
POLL_S = 0.002


@dataclass
class Trial:
    """One start of the trainer and how it ended."""

    number: int
    resumed_from: str | None  # the folder it resumed from, None for a new run
    expected_from: str | None  # the newest checkpoint-N folder before it started
    signal: str  # "SIGKILL" or "SIGTERM" or "" (ran to the end)
    mid_write: bool = False  # the kill found a checkpoint write under way
    phase: str = ""  # the last file of that write when the kill came
    start_s: float = 0.0  # start to the first checkpoint write (or to SIGTERM)
    exit_s: float = 0.0  # SIGTERM to the process's exit
    returncode: int | None = None
    cpu_s: float | None = None  # CPU time the trainer process used (user + system)
    steps: tuple[int, int] = (0, 0)  # (first, last) step it logged
    log: str = ""


@dataclass
class Report:
    trials: list[Trial] = field(default_factory=list)
    write_s: list[float] = field(default_factory=list)  # durations of the checkpoint writes watched whole
    checked_folders: int = 0
    repeated_steps: int = 0  # steps trained twice, with equal losses
    problems: list[str] = field(default_factory=list)

    def kills(self) -> list[Trial]:
        return [t for t in self.trials if t.signal == "SIGKILL"]


def trainer_env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def trainer_args(out: Path, max_steps: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "training.run", "--domain", "tiny", "--output_dir", str(out),
        "--max_train_steps", str(max_steps), "--checkpointing_steps", "1", "--checkpoints_total_limit", "2",
        "--validation_steps", "0", "--report_to", "none", "--resume_from_checkpoint", "latest", *extra,
    ]


class Launcher:
    """Starts trainer processes: new interpreters, or (fork=True) forks of a warm process (module docstring)."""

    def __init__(self, fork: bool = False):
        self.server = None
        if fork:
            command = [sys.executable, str(Path(__file__).resolve()), "--fork-server"]
            self.server = subprocess.Popen(command, cwd=REPO, env=trainer_env(), stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True, bufsize=1)
            ready = self.server.stdout.readline()
            if ready.strip() != "ready":
                raise RuntimeError(f"the fork server did not start: {ready!r}")

    def start(self, args: list[str], log_path: Path):
        if self.server is None:
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(args, cwd=REPO, env=trainer_env(), stdout=log, stderr=subprocess.STDOUT)
            proc.cpu_before = children_cpu()  # one trainer at a time: the rise when it is reaped is its own
            return proc
        self.server.stdin.write(json.dumps({"argv": args[3:], "log": str(log_path)}) + "\n")
        return Forked(self.server, int(json.loads(self.server.stdout.readline())["pid"]))

    def close(self) -> None:
        if self.server is not None:
            self.server.stdin.close()
            self.server.wait(timeout=60)
            self.server = None


class Forked:
    """A trainer forked by the fork server: Popen's pid, poll, wait, send_signal, returncode."""

    def __init__(self, server: subprocess.Popen, pid: int):
        self.server, self.pid, self.returncode, self.cpu_s = server, pid, None, None

    def poll(self) -> int | None:
        return self.wait(timeout=0, raise_timeout=False)

    def wait(self, timeout: float | None = None, raise_timeout: bool = True) -> int | None:
        import select

        if self.returncode is None:
            ready, _, _ = select.select([self.server.stdout], [], [], timeout)
            if ready:
                ended = json.loads(self.server.stdout.readline())
                self.returncode, self.cpu_s = int(ended["returncode"]), ended.get("cpu_s")
            elif raise_timeout:
                raise subprocess.TimeoutExpired(f"trainer {self.pid}", timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)


def fork_server() -> None:
    """Import what the trainer imports, then for each request line fork a child that runs
    `python -m training.run <argv>` with its output in the request's log file; report pid and exit code."""
    import runpy
    import traceback

    from training.comfy_env import setup_comfy

    setup_comfy()
    import accelerate  # noqa: F401
    import comfy.sd  # noqa: F401
    import torch

    import training.models.sdxl
    import training.tiny.models

    # The tiny CLIP the trainer builds (its default seed, float32): drawn once here, copied by every child.
    training.tiny.models.tiny_sdxl_clip(seed=0, dtype=torch.float32)
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.argv = ["-m", *request["argv"]]
            code = 0
            try:
                runpy.run_module("training.run", run_name="__main__", alter_sys=True)
            except SystemExit as e:  # as the interpreter reports it
                if isinstance(e.code, int) or e.code is None:
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
                    code = 1
            except BaseException:  # noqa: BLE001 (reported as the interpreter would)
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status, usage = os.wait4(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status),
                          "cpu_s": usage.ru_utime + usage.ru_stime}), flush=True)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def finish(proc, log_path: Path, timeout: float = 600) -> str:
    proc.wait(timeout=timeout)
    if hasattr(proc, "cpu_before"):
        proc.cpu_s = children_cpu() - proc.cpu_before
    return log_path.read_text(errors="replace")


def partial_folders(out: Path, old: frozenset = frozenset()) -> list[str]:
    """checkpoint-N.partial folders in `out`, but those in `old` (from `partial_ids`: an earlier run's leftovers,
    which the next save deletes; its own write may then make a folder of the same name)."""
    try:
        return [e.name for e in os.scandir(out) if e.name.endswith(PARTIAL) and identity(e) not in old]
    except FileNotFoundError:
        return []


def identity(entry: os.DirEntry) -> tuple:
    with contextlib.suppress(FileNotFoundError):
        info = entry.stat()
        return entry.name, info.st_ino, info.st_ctime_ns
    return (entry.name,)


def partial_ids(out: Path) -> frozenset:
    try:
        return frozenset(identity(e) for e in os.scandir(out) if e.name.endswith(PARTIAL))
    except FileNotFoundError:
        return frozenset()


def final_folders(out: Path) -> list[tuple[int, Path]]:
    found = []
    for path in out.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if m and path.is_dir():
            found.append((int(m.group(1)), path))
    return sorted(found)


def whole(folder: Path) -> str | None:
    """Why `folder` is not a whole checkpoint (a file that does not load), judged from its files alone."""
    import torch
    from safetensors.torch import load_file

    names = {p.name for p in folder.iterdir()}
    needed = {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
              "tiny-encoder.safetensors", "trainer_state-0.json"}
    if needed - names:
        return f"missing {sorted(needed - names)}"
    for path in sorted(folder.iterdir()):
        try:
            if path.suffix == ".safetensors":
                load_file(str(path))
            elif path.suffix == ".bin":
                torch.load(path, weights_only=True)
            elif path.suffix == ".pkl":
                torch.load(path, weights_only=False)  # accelerate's random states (numpy): our own file
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception as e:  # noqa: BLE001 (any failure to load is the finding)
            return f"{path.name} does not load ({type(e).__name__}: {e})"
    return None


def logged_losses(out: Path) -> list[tuple[int, float]]:
    path = out / "logs" / "losses.jsonl"
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line cut by SIGKILL
            entry = json.loads(line)
            entries.append((int(entry["step"]), float(entry["loss"])))
    return entries


def check_folders(out: Path, report: Report) -> None:
    for _, folder in final_folders(out):
        reason = whole(folder)
        report.checked_folders += 1
        if reason:
            report.problems.append(f"{folder.name} has a final name but is not whole: {reason}")


def watch_writes(proc, out: Path, count: int, old: frozenset) -> tuple[float, list[float]]:
    """Wait until the `count`-th checkpoint write begins; returns (its start time, durations of the writes
    before it, each watched from its partial folder appearing to its disappearing)."""
    seen, durations, began = 0, [], None
    while proc.poll() is None:
        now = time.monotonic()
        if partial_folders(out, old):
            if began is None:
                began, seen = now, seen + 1
                if seen == count:
                    return began, durations
        elif began is not None:
            durations.append(now - began)
            began = None
        time.sleep(POLL_S)
    raise RuntimeError(f"the trainer exited (code {proc.returncode}) before checkpoint write {count}")


def newest_file(folder: Path) -> str:
    """The name of the newest file in `folder`, temporary files named for what they become."""
    with contextlib.suppress(FileNotFoundError):
        files = sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime_ns)
        if not files:
            return "(empty folder)"
        name = files[-1].name
        if re.fullmatch(r"\.tmp\w{6}", name):  # safetensors writes <file> as .tmpXXXXXX, then renames it
            return "a .safetensors file (its temporary file)"
        return re.sub(r"^\.(.+)\.\d+\.tmp$", r"\1 (its temporary file)", name)
    return "(gone)"


def resumed_from(log: str) -> str | None:
    found = RESUMED.findall(log)
    return Path(found[-1][0]).name if found else None


def kill_trial(launcher: Launcher, number: int, out: Path, max_steps: int, rng: random.Random, report: Report,
               logs: Path) -> None:
    expected = final_folders(out)
    trial = Trial(number, None, expected[-1][1].name if expected else None, "SIGKILL")
    log_path = logs / f"trial-{number}.log"
    started = time.monotonic()
    old = partial_ids(out)
    proc = launcher.start(trainer_args(out, max_steps), log_path)
    count = 2 if not report.write_s else rng.choice((1, 2))
    try:
        began, durations = watch_writes(proc, out, count, old)
    except RuntimeError as e:
        raise RuntimeError(f"trial {number}: {e}; its log ends:\n{log_path.read_text(errors='replace')[-3000:]}") from e
    report.write_s += durations
    trial.start_s = began - started
    time.sleep(rng.uniform(0, sorted(report.write_s)[len(report.write_s) // 2]))
    names = partial_folders(out, old)
    if names:  # the last file of the write under way, as close to the kill as we can look
        trial.phase = newest_file(out / names[0])
    proc.send_signal(signal.SIGKILL)
    trial.log = finish(proc, log_path)
    trial.returncode, trial.cpu_s = proc.returncode, proc.cpu_s
    trial.mid_write = bool(partial_folders(out, old))
    trial.resumed_from = resumed_from(trial.log)
    report.trials.append(trial)


def sigterm_trial(launcher: Launcher, number: int, out: Path, max_steps: int, rng: random.Random, report: Report,
                  logs: Path) -> int:
    """SIGTERM during a training step; returns the step of the checkpoint it saved."""
    expected = final_folders(out)
    trial = Trial(number, None, expected[-1][1].name if expected else None, "SIGTERM")
    log_path = logs / f"trial-{number}.log"
    started = time.monotonic()
    before = len(logged_losses(out))
    proc = launcher.start(trainer_args(out, max_steps), log_path)
    while len(logged_losses(out)) < before + 2 and proc.poll() is None:  # training is under way
        time.sleep(POLL_S)
    time.sleep(rng.uniform(0, 0.3))
    last_logged = logged_losses(out)[-1][0]
    signalled = time.monotonic()
    trial.start_s = signalled - started
    proc.send_signal(signal.SIGTERM)
    trial.log = finish(proc, log_path, timeout=300)
    trial.exit_s = time.monotonic() - signalled
    trial.returncode, trial.cpu_s = proc.returncode, proc.cpu_s
    trial.resumed_from = resumed_from(trial.log)
    report.trials.append(trial)
    stopped = re.search(r"stopped by SIGTERM after step (\d+)", trial.log)
    if proc.returncode != 0 or not stopped:
        report.problems.append(f"SIGTERM: exit code {proc.returncode}, no 'stopped by SIGTERM' line\n{trial.log[-2000:]}")
        return -1
    step = int(stopped.group(1))
    if step not in (last_logged, last_logged + 1):
        report.problems.append(f"SIGTERM after step {last_logged} was logged, but the run stopped after step {step}")
    if not (out / f"checkpoint-{step}").is_dir() or whole(out / f"checkpoint-{step}"):
        report.problems.append(f"SIGTERM: no whole checkpoint-{step}")
    return step


def campaign(launcher: Launcher, workdir: Path, kills: int = 10, seed: int = 0, sigterm: bool = True) -> Report:
    """SIGKILL trials until `kills` of them landed during a checkpoint write (at most 2 x `kills` trials),
    then a SIGTERM trial and a last run to the end."""
    rng = random.Random(seed)
    out, logs = workdir / "run", workdir / "logs"
    shutil.rmtree(workdir / "run", ignore_errors=True)
    logs.mkdir(parents=True, exist_ok=True)
    max_steps = 4 * kills + 8  # more than the trials can reach: the last run finishes the rest
    report = Report()
    number = 0
    while sum(t.mid_write for t in report.kills()) < kills and number < 2 * kills:
        kill_trial(launcher, number, out, max_steps, rng, report, logs)
        check_folders(out, report)
        number += 1
    if sigterm:
        sigterm_trial(launcher, number, out, max_steps, rng, report, logs)
        check_folders(out, report)
        number += 1
    expected = final_folders(out)
    last = Trial(number, None, expected[-1][1].name if expected else None, "")
    log_path = logs / f"trial-{number}.log"
    # The rest of the run, with no checkpoint until its end: its writes are not what is tried here (the kills
    # above are), and one per step would be most of its time.
    args = trainer_args(out, max_steps, "--checkpointing_steps", str(max_steps))
    last.log = finish(launcher.start(args, log_path), log_path)
    last.resumed_from = resumed_from(last.log)
    report.trials.append(last)
    if "done:" not in last.log or not (out / "tiny-encoder.safetensors").is_file():
        report.problems.append(f"the last run did not finish\n{last.log[-2000:]}")
    for before, after in zip(report.trials, report.trials[1:]):
        if after.resumed_from != after.expected_from:
            report.problems.append(
                f"trial {after.number} resumed from {after.resumed_from}; the newest checkpoint was {after.expected_from}")
    first: dict[int, float] = {}
    for step, loss in logged_losses(out):
        if step in first:
            report.repeated_steps += 1
            if loss != first[step]:
                report.problems.append(f"step {step} trained twice with different losses: {first[step]!r}, {loss!r}")
        else:
            first[step] = loss
    if sorted(first) != list(range(1, max_steps + 1)):
        report.problems.append(f"steps logged: {sorted(first)}; expected 1..{max_steps}")
    return report


# ------------------------------------------------------------------------------------------------
# Disk full


def can_mount_tmpfs() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@contextlib.contextmanager
def small_disk(folder: Path, mib: int):
    """A tmpfs of `mib` MiB mounted at `folder` (root only)."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def digests(out: Path) -> dict[str, str]:
    return {f"{folder.name}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
            for _, folder in final_folders(out) for p in sorted(folder.iterdir())}


@dataclass
class DiskFull:
    how: str  # "tmpfs" or "file size limit"
    returncode: int
    message: str  # the trainer's last lines
    intact_before: dict  # checkpoint files and their digests when the trouble began
    intact_after: dict
    partial_left: list


def disk_full(launcher: Launcher, workdir: Path, how: str) -> DiskFull:
    """A run whose checkpoints stop fitting: on a tmpfs that holds one and a half checkpoints ('tmpfs'), or
    with a file size limit set on the running trainer after its first checkpoint ('file size limit')."""
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out = workdir / f"full-{how.replace(' ', '-')}"
    with contextlib.ExitStack() as stack:
        if how == "tmpfs":
            stack.enter_context(small_disk(out, 180))  # a tiny checkpoint is ~120 MB
        log_path = logs / f"disk-full-{how.replace(' ', '-')}.log"
        args = trainer_args(out, 6)
        proc = launcher.start(args, log_path)
        before = {}
        while proc.poll() is None:
            complete = [f for _, f in final_folders(out)]
            if complete and not before:
                before = digests(out)
                if how == "file size limit":
                    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (8 << 20, resource.RLIM_INFINITY))
            time.sleep(0.01)
        text = finish(proc, log_path)
        result = DiskFull(how, proc.returncode, "\n".join(text.strip().splitlines()[-3:]), before,
                          {k: v for k, v in digests(out).items() if k in before} if before else {},
                          partial_folders(out))
        return result


# ------------------------------------------------------------------------------------------------
# The command


def median(values: list) -> float:
    return sorted(values)[len(values) // 2]


def summary(report: Report) -> str:
    kills = report.kills()
    mid = [t for t in kills if t.mid_write]
    phases: dict[str, int] = {}
    for t in mid:
        phases[t.phase] = phases.get(t.phase, 0) + 1
    starts = [t.start_s for t in report.trials if t.start_s]
    kill_cpu = [t.cpu_s for t in kills if t.cpu_s is not None]
    lines = [
        (f"trainer starts: {len(report.trials)}; SIGKILL trials: {len(kills)}, {len(mid)} during a checkpoint "
         f"write ({len(kills) - len(mid)} just after one ended)"),
        ("  where the killed writes were (their newest file): "
         + ", ".join(f"{name} x{n}" for name, n in sorted(phases.items(), key=lambda kv: -kv[1]))),
        f"  checkpoint write (save_state + export + marker + rename): median "
        f"{sorted(report.write_s)[len(report.write_s) // 2]:.2f} s over {len(report.write_s)} writes watched whole"
        if report.write_s else "  no write watched whole",
        f"  start to first checkpoint write: median {sorted(starts)[len(starts) // 2]:.1f} s" if starts else "",
        (f"  CPU time of a killed start (imports, models, resume, 1-2 steps): median {median(kill_cpu):.1f} s"
         if kill_cpu else ""),
        (f"every start resumed from the newest checkpoint: "
         f"{all(t.resumed_from == t.expected_from for t in report.trials[1:])}; "
         f"checkpoint-N folders checked whole: {report.checked_folders}; steps trained twice with equal losses: "
         f"{report.repeated_steps}"),
    ]
    for t in report.trials:
        if t.signal == "SIGTERM":
            lines.append(f"SIGTERM: exit code {t.returncode} {t.exit_s:.2f} s after the signal")
    lines.append("problems: " + ("none" if not report.problems else "\n  " + "\n  ".join(report.problems)))
    return "\n".join(line for line in lines if line)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/trainer_faults.py", description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10, help="SIGKILL trials (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="kept afterwards (default: a temporary folder)")
    parser.add_argument("--disk-full", action="store_true", help="also the disk-full trials")
    parser.add_argument("--fork", action="store_true", help="fork each start from a warm process (docstring)")
    parser.add_argument("--fork-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fork_server:
        fork_server()
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="trainer-faults-"))
    began = time.monotonic()
    launcher = Launcher(fork=args.fork)
    report = campaign(launcher, workdir, kills=args.kills, seed=args.seed)
    print(summary(report))
    failed = bool(report.problems)
    if args.disk_full:
        for how in (["tmpfs"] if can_mount_tmpfs() else []) + ["file size limit"]:
            result = disk_full(launcher, workdir, how)
            same = result.intact_before and result.intact_before == result.intact_after
            print(f"disk full ({how}): exit code {result.returncode}; earlier checkpoint files byte-identical: "
                  f"{bool(same)} ({len(result.intact_before)} files); partial folders left: {result.partial_left}")
            print("  " + result.message.replace("\n", "\n  "))
            failed |= result.returncode == 0 or not same
    launcher.close()
    print(f"{time.monotonic() - began:.0f} s in all; logs in {workdir / 'logs'}")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
