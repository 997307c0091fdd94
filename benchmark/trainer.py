"""The trainer's throughput: the tiny preset's CLI in a child process, and the trainer's step on a given UNet.

The tiny figure runs the trainer's command line (`python -m training.run --domain tiny ...`, as a
program) under timing hooks; the benchmark never calls the trainer's entry point itself.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nested_attention import SDXL_CONTEXT_DIM, NestedEncoder

from .workload import CHUNK, SUBJECT_POSITION, synchronize, timed

REPO = Path(__file__).resolve().parents[1]


def measure_trainer_steps(
    run_steps: Callable[[], None], unet_model: Any, encoder_cls: type, device: torch.device
) -> dict:
    """Time the training steps `run_steps` performs; split off the frozen UNet's forward and backward.

    Hooks, no change to the trainer: BaseModel.apply_model is timed for the UNet forward (nested
    patches included); a gradient hook on its output marks the start of the UNet's backward and one
    on the subject tokens (NestedEncoder.encode's output, whose gradient is complete when the
    backward leaves the UNet) marks its end. Steps are the intervals between backward ends.
    Returns per-step lists of seconds.
    """
    marks: dict[str, list] = {"fwd": [], "bwd_start": [], "bwd_end": []}
    original_apply = unet_model.apply_model
    original_encode = encoder_cls.encode

    def stamp(name):
        def hook(grad):
            synchronize(device)
            marks[name].append(time.perf_counter())
            return grad

        return hook

    def apply_model(self, *args, **kwargs):
        synchronize(device)
        start = time.perf_counter()
        out = original_apply(self, *args, **kwargs)
        synchronize(device)
        marks["fwd"].append(time.perf_counter() - start)
        if out.requires_grad:
            out.register_hook(stamp("bwd_start"))
        return out

    def encode(self, clip_tokens):
        tokens = original_encode(self, clip_tokens)
        if tokens.requires_grad:
            tokens.register_hook(stamp("bwd_end"))
        return tokens

    with (
        _class_attribute(unet_model, "apply_model", apply_model),
        _class_attribute(encoder_cls, "encode", encode),
    ):
        run_steps()
    ends = marks["bwd_end"]
    steps = [b - a for a, b in itertools.pairwise(ends)]
    unet = [f + (e - s) for f, s, e in zip(marks["fwd"][1:], marks["bwd_start"][1:], ends[1:])]
    return {"step_s": steps, "unet_s": unet}


@contextlib.contextmanager
def _class_attribute(cls: type, name: str, value: Any):
    """Set a class attribute for a while; restore exactly what the class itself held (maybe nothing)."""
    missing = object()
    saved = cls.__dict__.get(name, missing)
    setattr(cls, name, value)
    try:
        yield
    finally:
        if saved is missing:
            delattr(cls, name)
        else:
            setattr(cls, name, saved)


def summarize_trainer(raw: dict, batch_size: int, warmup: int, **extra) -> dict:
    steps, unet = raw["step_s"][warmup:], raw["unet_s"][warmup:]
    if not steps:
        raise RuntimeError(f"the trainer ran too few steps to time (got {len(raw['step_s'])} intervals)")
    step = statistics.median(steps)
    unet_s = statistics.median(unet)
    return {
        "batch_size": batch_size,
        "steps_timed": len(steps),
        "step_s": step,
        "images_per_s": batch_size / step,
        "unet_fwd_bwd_s": unet_s,
        "outside_unet_share": max(0.0, 1.0 - unet_s / step),
        **extra,
    }


def tiny_trainer_child(out_json: str, steps: int, warmup: int) -> None:
    """Run `python -m training.run --domain tiny` for warmup + steps + 1 steps; write its timing to `out_json`.

    The trainer runs as a program (runpy, as `python -m` runs it) in this process, under the timing
    hooks; its settings for the figure come from its config (`training.loop.config`), not from its entry point.
    """
    import comfy.model_base

    from training.loop.config import parse_args

    with tempfile.TemporaryDirectory(prefix="nested-bench-") as tmp:
        total = warmup + steps + 1
        argv = [
            "--domain",
            "tiny",
            "--output_dir",
            tmp,
            "--max_train_steps",
            str(total),
            "--checkpointing_steps",
            str(10 * total),
            "--validation_steps",
            "0",
            "--report_to",
            "none",
            "--dataloader_num_workers",
            "0",
        ]
        config = parse_args(argv)

        def run_cli() -> None:
            saved = sys.argv
            sys.argv = ["training.run", *argv]
            try:
                runpy.run_module("training.run", run_name="__main__", alter_sys=True)
            finally:
                sys.argv = saved

        raw = measure_trainer_steps(run_cli, comfy.model_base.BaseModel, NestedEncoder, torch.device("cpu"))
        result = summarize_trainer(
            raw,
            config.train_batch_size,
            warmup,
            preset="tiny",
            device="cpu",
            resolution=config.resolution,
            num_tokens=config.num_tokens,
            mixed_precision=config.mixed_precision,
            what="python -m training.run --domain tiny: data, text, VAE, CLIP, Q-Former, UNet, optimizer",
        )
    Path(out_json).write_text(json.dumps(result))


def tiny_trainer_throughput(steps: int = 8, warmup: int = 2) -> dict:
    """The tiny preset's throughput on the CPU, from a child process (its own accelerate state, no GPU)."""
    with tempfile.TemporaryDirectory(prefix="nested-bench-") as tmp:
        out = Path(tmp) / "trainer.json"
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        cmd = [
            sys.executable,
            "-m",
            "benchmark",
            "--trainer-child",
            str(out),
            "--steps",
            str(steps),
            "--trainer-warmup",
            str(warmup),
        ]
        proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(
                f"the tiny trainer run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
            )
        return json.loads(out.read_text())


def synthetic_trainer_throughput(
    model: Any,
    encoder: NestedEncoder,
    resolution: int,
    batch_size: int,
    steps: int,
    warmup: int,
    device: torch.device,
    autocast: torch.dtype | None,
    checkpointing: bool = True,
) -> dict:
    """The trainer's step on a given UNet with a synthetic batch (cached latents and CLIP tokens, no data pipeline).

    The trainer's own module (`NestedTrainingModule`: Q-Former, patches on every layer, ComfyUI's
    apply_model), epsilon MSE, backward, AdamW on the encoder; the UNet's blocks checkpointed as the
    trainer does. `encoder` is trained in float32 (a copy is not made: it is changed).
    """
    from training.loop.optim import adamw
    from training.models.sdxl import NestedTrainingModule, enable_gradient_checkpointing

    base = model.model
    if checkpointing:
        enable_gradient_checkpointing(base.diffusion_model)
    encoder.float().train().requires_grad_(True)
    module = NestedTrainingModule(encoder, base)
    optimizer = adamw(encoder.parameters(), lr=1e-4)  # the trainer's
    g = torch.Generator().manual_seed(0)
    side = resolution // 8
    clip_dim = encoder.config.qformer.clip_dim
    batch = {
        "clip_tokens": torch.randn(batch_size, 257, clip_dim, generator=g),
        "x": torch.randn(batch_size, 4, side, side, generator=g),
        "noise": torch.randn(batch_size, 4, side, side, generator=g),
        "sigmas": torch.rand(batch_size, generator=g) * 10 + 0.1,
        "context": torch.randn(batch_size, CHUNK, SDXL_CONTEXT_DIM, generator=g),
        "adm": torch.randn(batch_size, 2816, generator=g),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    groups = [((SUBJECT_POSITION,), torch.ones(batch_size, dtype=torch.bool, device=device))]

    def run_steps():
        for _ in range(warmup + steps + 1):
            ctx = (
                torch.autocast(device.type, dtype=autocast)
                if autocast is not None
                else contextlib.nullcontext()
            )
            with ctx:
                eps = module(
                    batch["clip_tokens"], batch["x"], batch["sigmas"], batch["context"], batch["adm"], groups
                )
                loss = (eps.float() - batch["noise"]).pow(2).mean()
            loss.backward()
            optimizer_s.append(timed(optimizer.step, device)[0])
            optimizer.zero_grad(set_to_none=True)

    optimizer_s: list[float] = []
    raw = measure_trainer_steps(run_steps, type(base), NestedEncoder, device)
    return summarize_trainer(
        raw,
        batch_size,
        warmup,
        device=device.type,
        resolution=resolution,
        num_tokens=encoder.config.num_tokens,
        autocast=str(autocast) if autocast else "no",
        gradient_checkpointing=checkpointing,
        encoder_parameters=sum(p.numel() for p in encoder.parameters()),
        optimizer_s=statistics.median(optimizer_s[warmup + 1 :]),
        adamw_per_tensor_vs_fused_s=adamw_seconds(encoder.qformer, device),
        what="NestedTrainingModule step, synthetic cached batch: Q-Former, UNet, AdamW",
    )


def adamw_seconds(module: torch.nn.Module, device: torch.device, steps: int = 3) -> dict:
    """Seconds of one AdamW step over `module`'s parameters (copies), with the per-tensor loop torch uses on a CPU by
    default (the trainer's optimizer before it was fused) and fused (the trainer's now): best of `steps`."""
    params = [torch.nn.Parameter(p.detach().clone()) for p in module.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    figures = {"parameters": sum(p.numel() for p in params)}
    for name, options in (("per_tensor", {"foreach": False}), ("fused", {"fused": True})):
        optimizer = torch.optim.AdamW(params, lr=1e-4, **options)
        optimizer.step()
        figures[name] = min(timed(optimizer.step, device)[0] for _ in range(steps))
    return figures
