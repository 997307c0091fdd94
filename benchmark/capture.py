"""What Capture Nested Attention costs: one nested variant's step with and without a capture recording it.

Off, the patch looks up one transformer_options key per call and finds nothing: that is the nested variant's
own row. On, the step carries a SamplingRun with one capture over the whole run, as the capture node's wrapper
hands it to the patches (nested_attention.capture), so every step adds to its running means.
"""

from __future__ import annotations

import gc
from typing import Any

import torch

from .counters import PeakMemory
from .workload import timed, unet_step


def capture_cost(model: Any, name: str, inputs: tuple, device: torch.device, steps: int) -> dict:
    """Best step time and peak memory of `model` (a nested variant) off and on, interleaved; the bytes the
    capture keeps (its running means) after all those steps."""
    from nested_attention.capture import RUN_KEY, Capture, SamplingRun, Window, token_grid

    latent = tuple(inputs[0].shape[-2:])
    captured = model.clone()
    run = SamplingRun(batch=1, latent=latent)  # cond + uncond of one image
    capture = Capture(Window(), token_grid(latent), run.batch)
    run.captures.append(capture)
    captured.model_options["transformer_options"][RUN_KEY] = run
    memory = PeakMemory(device)
    times: dict = {"off": [], "on": []}
    peaks = {}
    step = {"off": lambda: unet_step(model, inputs), "on": lambda: unet_step(captured, inputs)}
    for key, fn in step.items():  # a first step each (caches, and the capture's sums)
        gc.collect()
        memory.reset()
        timed(fn, device)
        peaks[key] = memory.peak_bytes()
    for _ in range(steps):
        for key, fn in step.items():
            times[key].append(timed(fn, device)[0])
    off, on = min(times["off"]), min(times["on"])
    kept = sum(t.numel() * t.element_size() for maps in (capture.placement, capture.tokens)
               for t in maps.sums.values())
    return {
        "variant": name,
        "step_off_s": off,
        "step_on_s": on,
        "extra_step_s": on - off,
        "extra_step": (on - off) / off,
        "peak_off_bytes": peaks["off"],
        "peak_on_bytes": peaks["on"],
        "kept_bytes": kept,
        "token_grid": list(capture.grid),
        "subjects": len(capture.bindings),
    }
