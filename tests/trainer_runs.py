"""One way for a test to run the trainer: the real CLI (`training.run.parse_args`, `main`) in this process.

`train(output_dir, *flags)` runs the tiny domain with the quick settings below, the flags given after them
(a flag given twice: the last wins, as argparse reads it); `run_trainer(argv)` runs any argv. Both reset
the state a run leaves in the process: accelerate's singletons and ComfyUI's loaded models.
"""

from __future__ import annotations

from pathlib import Path

import comfy.model_management
from accelerate.state import AcceleratorState, GradientState

from training.loop import config as train_config
from training.loop import trainer

# The tiny domain, quick: two images per batch, no loss curves to a tracker, no sample grids.
TINY_FLAGS = ("--domain", "tiny", "--train_batch_size", "2", "--report_to", "none", "--validation_steps", "0")


def tiny_argv(output_dir: Path | str, *flags: str) -> list[str]:
    """The quick tiny run's command line into `output_dir`, then `flags`."""
    return [*TINY_FLAGS, "--output_dir", str(output_dir), *flags]


def reset_after_run() -> None:
    """Forget what a run in this process set up: accelerate's state and ComfyUI's loaded models."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    comfy.model_management.unload_all_models()


def run_trainer(argv: list[str]) -> dict:
    """Parse `argv` as `python -m training.run` does and run it; returns `main`'s summary."""
    try:
        return trainer.main(train_config.parse_args(argv))
    finally:
        reset_after_run()


def train(output_dir: Path | str, *flags: str) -> dict:
    """A quick tiny run into `output_dir` with `flags` on top of the quick settings."""
    return run_trainer(tiny_argv(output_dir, *flags))
