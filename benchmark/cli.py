"""`python -m benchmark`: flags, defaults by device, the run, the table and the JSON file."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from .report import format_table
from .run import run_benchmark
from .trainer import tiny_trainer_child
from .workload import DTYPES, configure_comfy

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "runs" / "benchmark" / "benchmark.json"


def parse_args(args: list[str] | None = None) -> argparse.Namespace:
    p = _parser()
    parsed = p.parse_args(args)
    if not parsed.trainer_child:
        _fill_defaults(p, parsed)
    return parsed


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmark",
        description="Measure nested attention's cost per SDXL sampling step next to plain SDXL and an IP-Adapter-style "
        "injection, with FLOP floors, encoding time, memory and the trainer's throughput.",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="Where to run: 'auto' takes the GPU when torch sees one, else the CPU.",
    )
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Image side in pixels, a multiple of 64 (default: 512 on the CPU, 1024 on a GPU).",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="Timed UNet evaluations (CFG steps) per variant after one warm-up step each (default: 3 on "
        "the CPU, where one full SDXL step at 512 takes 10 to 20 s on two cores; 10 on a GPU).",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="Weights and activations of the UNet and the encoder (default: fp32 on the CPU, fp16 on a GPU).",
    )
    p.add_argument(
        "--json",
        default=str(DEFAULT_JSON),
        help=f"Where to write the results as JSON (default: {DEFAULT_JSON.relative_to(REPO)}).",
    )
    p.add_argument(
        "--attention-reps",
        type=int,
        default=None,
        help="Back-to-back calls per timed block when timing the 70 cross-attention calls alone; each "
        "layer is timed in 3 interleaved rounds (default: 1 on the CPU, 20 on a GPU).",
    )
    p.add_argument(
        "--skip-trainer",
        action="store_true",
        help="Do not measure the trainer (the tiny preset's command line, and the trainer's step on the full-size "
        "UNet).",
    )
    p.add_argument(
        "--trainer-steps",
        type=int,
        default=8,
        help="Timed training steps for each trainer figure, after warm-up.",
    )
    p.add_argument(
        "--trainer-batch-size", type=int, default=1, help="Batch size of the full-size (SDXL) trainer figure."
    )
    p.add_argument(
        "--trainer-full-steps",
        type=int,
        default=2,
        help="Timed steps of the full-size trainer figure on the CPU, after one warm-up step (each takes tens of "
        "seconds there; on a GPU --trainer-steps counts).",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="Also print torch.profiler's operator table for one nested attn2 call (M=1024, widest layer).",
    )
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke run on tiny models (tests)
    p.add_argument("--trainer-child", default=None, help=argparse.SUPPRESS)  # internal: the tiny trainer's process
    p.add_argument("--trainer-warmup", type=int, default=2, help=argparse.SUPPRESS)
    return p


def _fill_defaults(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The device's defaults for the flags left out, and the checks that need several flags."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA GPU on this machine; use --device cpu or auto.")
    gpu = args.device == "cuda"
    args.resolution = (1024 if gpu else 512) if args.resolution is None else args.resolution
    args.steps = (10 if gpu else 3) if args.steps is None else args.steps
    args.dtype = ("fp16" if gpu else "fp32") if args.dtype is None else args.dtype
    args.attention_reps = (20 if gpu else 1) if args.attention_reps is None else args.attention_reps
    if args.resolution % 64 or args.resolution <= 0:
        p.error(
            f"--resolution {args.resolution}: expected a positive multiple of 64 (SDXL's latent is 1/8 of it "
            "and the UNet halves that twice)."
        )
    if min(args.steps, args.attention_reps, args.trainer_steps, args.trainer_batch_size, args.trainer_full_steps) < 1:
        p.error("--steps, --attention-reps, --trainer-steps, --trainer-full-steps and --trainer-batch-size must be at "
                "least 1.")
    if args.dtype == "fp16" and not gpu:
        p.error(
            "--dtype fp16 on the CPU: ComfyUI computes float16 weights in float32 there; use fp32 or bf16."
        )


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    if args.trainer_child:
        from training.comfy_env import setup_comfy

        setup_comfy()  # the trainer's own set-up: ComfyUI's default attention, as `python -m training.run` has it
        tiny_trainer_child(args.trainer_child, steps=args.steps or 8, warmup=args.trainer_warmup)
        return {}
    configure_comfy(args.device)
    result = run_benchmark(args)
    print(format_table(result), flush=True)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nResults: {path}", flush=True)
    return result
