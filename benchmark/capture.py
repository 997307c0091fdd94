"""What Capture Nested Attention costs per step: a nested variant's cross-attention calls with and without it.

Capture only adds work inside the attn2 calls, so its cost is timed there, on the step's 70 calls (batch 2,
cond + uncond), interleaved with the same calls without it (the timing of `timing.time_attention_calls`).
Off, the patch looks up one transformer_options key per call and finds nothing: that is the variant's own
figure. On, every call carries a SamplingRun with one capture over the whole run, as the capture node's
wrapper hands it to the patches (nested_attention.capture), and adds to its running means.

    python -m benchmark.capture [--resolution 1024] [--device cpu]   # this line alone (no full UNet weights)
"""

from __future__ import annotations

import argparse
import gc
import logging
from collections.abc import Callable, Sequence

import torch

from .counters import AttentionCall, PeakMemory, layer_inputs
from .timing import time_attention_calls
from .workload import DTYPES, PREFIX, configure_comfy, synchronize

log = logging.getLogger(__name__)


def capture_cost(
    calls: Sequence[AttentionCall],
    patches: dict,
    host: Callable,
    device: torch.device,
    dtype: torch.dtype,
    reps: int,
    resolution: int,
    name: str,
) -> dict:
    """Seconds per step in the attn2 calls of `patches` (a nested variant's, by layer key) off, with a capture
    of the placement only, and with the sources too; the peak memory of one pass of them each way; the bytes
    the capture with sources keeps after all those calls."""
    from nested_attention.capture import RUN_KEY, Capture, SamplingRun, Window, token_grid

    latent = (resolution // 8, resolution // 8)
    captures = {}

    def with_run(patch: Callable, run: SamplingRun) -> Callable:
        return lambda q, k, v, extra: patch(q, k, v, {**extra, RUN_KEY: run})

    def recording(sources: bool) -> dict:
        run = SamplingRun(batch=1, latent=latent)  # cond + uncond of one image
        captures[sources] = Capture(Window(), token_grid(latent), run.batch, sources)
        run.captures.append(captures[sources])
        return {key: with_run(p, run) for key, p in patches.items()}

    ways = {"off": patches, "placement": recording(False), "on": recording(True)}
    peaks = {}
    memory = PeakMemory(device)
    with torch.inference_mode():
        for way, by_key in ways.items():  # one pass each: warm-up, K~/V~ into the cache, the peak
            gc.collect()
            memory.reset()
            for i, call in enumerate(calls):
                q, k, v, extra = layer_inputs(call, 2, device, dtype, seed=i)
                by_key[call.key](q, k, v, extra)
            synchronize(device)
            peaks[way] = memory.peak_bytes()
    seconds = time_attention_calls(calls, ways, host, device, dtype, reps)
    capture = captures[True]
    kept = sum(
        t.numel() * t.element_size()
        for maps in (capture.placement, capture.tokens)
        for t in maps.sums.values()
    )
    return {
        "variant": name,
        "attention_off_s": seconds["off"],
        "attention_placement_s": seconds["placement"],
        "attention_on_s": seconds["on"],
        "extra_step_s": seconds["on"] - seconds["off"],
        "extra_placement_step_s": seconds["placement"] - seconds["off"],
        "peak_off_bytes": peaks["off"],
        "peak_placement_bytes": peaks["placement"],
        "peak_on_bytes": peaks["on"],
        "kept_bytes": kept,
        "token_grid": list(capture.grid),
        "subjects": len(capture.bindings),
    }


def describe(c: dict, plain_step_s: float | None = None) -> str:
    """The benchmark's lines for `capture_cost`'s result."""

    def share(extra: float) -> str:
        return "" if plain_step_s is None else f", {100 * extra / plain_step_s:.2f} % of a plain step"

    return (
        f"  Capture Nested Attention on {c['variant']}, its 70 attn2 calls per step: "
        f"{c['attention_off_s']:.3f} s off; placement only {c['attention_placement_s']:.3f} s "
        f"({c['extra_placement_step_s']:+.3f} s{share(c['extra_placement_step_s'])}); with sources "
        f"{c['attention_on_s']:.3f} s ({c['extra_step_s']:+.3f} s{share(c['extra_step_s'])}).\n"
        f"  Peak of one pass: {c['peak_off_bytes'] / 1e9:.2f} GB off, "
        f"{c['peak_placement_bytes'] / 1e9:.2f} GB placement only, {c['peak_on_bytes'] / 1e9:.2f} GB with "
        f"sources; running means kept {c['kept_bytes'] / 1e6:.1f} MB (token grid "
        f"{c['token_grid'][0]}x{c['token_grid'][1]}). Off, each call only looks up one transformer_options "
        "key."
    )


def main(args: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmark.capture", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="Where to run (default: the GPU when torch sees one).",
    )
    p.add_argument("--resolution", type=int, default=1024, help="Image side in pixels, a multiple of 64.")
    p.add_argument("--num-tokens", type=int, default=1024, help="M, the subject's tokens.")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="Default: fp16 on a GPU, fp32 on the CPU."
    )
    p.add_argument(
        "--reps", type=int, default=None, help="Calls per timed block (default: 20 on a GPU, 1 on the CPU)."
    )
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the tiny models (tests)
    a = p.parse_args(args)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    configure_comfy(a.device)
    from nested_attention import SDXL_CONTEXT_DIM, unet_layers
    from nested_attention_comfy.model import attn2_patches
    from training.tiny.models import build_encoder, build_unet, sdxl_unet_config, tiny_qformer

    from .counters import attention_calls
    from .variants import subject_binding
    from .workload import host_attention

    device = torch.device(a.device)
    dtype = DTYPES[a.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    host = host_attention()
    meta = build_unet(sdxl_unet_config(tiny=a.tiny), torch.device("meta"), dtype)
    layers = unet_layers(meta.model.diffusion_model)
    calls = attention_calls(meta, a.resolution, host)
    encoder = build_encoder(
        a.num_tokens, layers, device, dtype, seed=1, qformer=tiny_qformer() if a.tiny else None
    )
    tokens = torch.randn(1, a.num_tokens, SDXL_CONTEXT_DIM, generator=torch.Generator().manual_seed(0))
    binding = subject_binding(encoder, tokens.to(device, dtype), name=f"benchmark M={a.num_tokens}")
    patches = attn2_patches(layers, [binding])
    log.info("%s capture on and off: %d attn2 calls at %d px", PREFIX, len(calls), a.resolution)
    result = capture_cost(
        calls,
        patches,
        host,
        device,
        dtype,
        a.reps or (20 if device.type == "cuda" else 1),
        a.resolution,
        f"nested M={a.num_tokens}",
    )
    where = f"{a.resolution}x{a.resolution}, {device.type} {str(dtype).removeprefix('torch.')}"
    print(f"{where}:\n{describe(result)}")
    return result


if __name__ == "__main__":
    main()
