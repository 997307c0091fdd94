"""SIGTERM (preemption on clusters, `kill`, `docker stop`): save a resumable checkpoint and exit 0.

Schedulers send SIGTERM, wait a grace period (Slurm's KillWait and Kubernetes' default are 30 s), then
SIGKILL. While the set-up runs (data scan, model loading) there is nothing new to save: the run stops at
once. Once the loop runs, it finishes the optimizer step under way, writes checkpoint-N and returns
normally, so the bound is one optimizer step (all its accumulation batches) plus one checkpoint write
(README, Reliability, has the measured figures). Every process of a distributed run receives the signal at
its own moment; they agree on the step to stop after through the loss gather they already do per batch.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import torch

from nested_attention.logs import LOG_PREFIX as PREFIX

log = logging.getLogger("training")


class Preempted(SystemExit):
    """SIGTERM before the training loop: nothing new to save, exit 0."""

    def __init__(self):
        super().__init__(0)


class StopRequest:
    """Catches SIGTERM for the duration of a run (a context manager; the previous handler comes back)."""

    def __init__(self):
        self.requested_at: float | None = None  # time.monotonic() of the first SIGTERM
        self.in_loop = False  # set by the loop: from then on a SIGTERM waits for the step under way
        self._previous = None

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            log.warning("%s SIGTERM again: still finishing the step and the checkpoint", PREFIX)
            return
        self.requested_at = time.monotonic()
        if not self.in_loop:
            log.warning("%s SIGTERM during set-up: nothing trained yet to save; stopping", PREFIX)
            raise Preempted()
        log.warning("%s SIGTERM: finishing this optimizer step, then saving a checkpoint and exiting", PREFIX)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def agreed(self, accelerator) -> bool:
        """Whether any process has been asked to stop: every process gets the same answer (one tiny gather
        per optimizer step when there are several processes)."""
        if accelerator.num_processes == 1:
            return self.requested

        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.gather(flag).max().item())
