"""Timing: the cross-attention calls alone, one nested call under torch.profiler, encoding one subject."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from nested_attention import NestedEncoder

from .counters import AttentionCall, cache_bytes, layer_inputs, projection_flops
from .variants import subject_binding
from .workload import pack_module, synchronize, timed

PHOTOS = (1, 4)  # photos per subject whose encoding is timed


def sdpa_name(num_tokens: int) -> str:
    return f"nested SDPA alone M={num_tokens}"


def _nested_sdpa(patch: Any, host: Callable, q: torch.Tensor, extra: dict) -> Callable[[], torch.Tensor]:
    """The subject row's attention over the layer's K~, V~ (cached by then) through the host: what the floor counts."""
    key, value = patch.subjects[0].layer_kv(patch.index, q.device, q.dtype)  # (M, D)
    return functools.partial(host, q[:1], key.expand(1, -1, -1), value.expand(1, -1, -1), extra["n_heads"], extra)


def time_attention_calls(
    calls: Sequence[AttentionCall],
    patches: dict[str, dict],
    host: Callable,
    device: torch.device,
    dtype: torch.dtype,
    reps: int,
    rounds: int = 3,
    alone: dict[str, dict] | None = None,
) -> dict[str, float]:
    """Seconds per CFG step (batch 2) spent in the attn2 calls: the host alone, and each variant's patch.

    alone: name -> a nested variant's patches: also time that subject row's nested SDPA alone (through the
    host, one row), the part of a call its floor counts.
    Per layer, each function runs `reps` times back to back between two syncs (on a GPU the launches
    overlap as in a real step), `rounds` times interleaved with the others; the fastest round counts
    (other load only ever slows a run down).
    """
    alone = alone or {}
    totals = {"host": 0.0, **{name: 0.0 for name in patches}, **{name: 0.0 for name in alone}}
    with torch.inference_mode():
        for i, call in enumerate(calls):
            q, k, v, extra = layer_inputs(call, 2, device, dtype, seed=i)
            fns = {"host": functools.partial(host, q, k, v, call.heads, extra)}
            for name, by_key in patches.items():
                fns[name] = functools.partial(by_key[call.key], q, k, v, extra)
            for fn in fns.values():  # warm-up (and K~/V~ into the cache)
                fn()
            for name, by_key in alone.items():
                fns[name] = _nested_sdpa(by_key[call.key], host, q, extra)
            samples = {name: [] for name in fns}
            for _ in range(rounds):
                for name, fn in fns.items():
                    samples[name].append(timed(functools.partial(_repeat, fn, reps), device)[0] / reps)
            for name in fns:
                totals[name] += min(samples[name])
    return totals


def _repeat(fn: Callable, reps: int) -> None:
    for _ in range(reps):
        fn()


def profile_attention(
    call: AttentionCall, patch: Callable, device: torch.device, dtype: torch.dtype, rows: int = 18
) -> str:
    """torch.profiler's operator table for one nested attn2 call (batch 2, cond + uncond)."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v, extra = layer_inputs(call, 2, device, dtype, seed=0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode():
        patch(q, k, v, extra)
        with profile(activities=activities) as prof:
            for _ in range(3):
                patch(q, k, v, extra)
            synchronize(device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


def benchmark_encoding(
    clip_vision: Any,
    encoders: dict[int, NestedEncoder],
    device: torch.device,
    dtype: torch.dtype,
    reps: int = 2,
) -> tuple[dict, dict[int, torch.Tensor]]:
    """Seconds to encode one subject: CLIP (one 512x512 image), Q-Former, all layers' K~/V~; best of `reps` runs.

    Each piece runs once untimed first on a GPU (kernel selection, lazy loading); the CPU has no
    such one-off beyond ComfyUI loading CLIP, which the untimed first CLIP call pays.
    Returns (figures, {M: subject tokens (1, M, 2048)}).
    """
    warm = device.type == "cuda"
    image = torch.rand(1, 512, 512, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        clip_vision.encode_image(image)
        clip_s = min(
            timed(lambda: clip_vision.encode_image(image)["last_hidden_state"], device)[0]
            for _ in range(reps)
        )
        with FlopCounterMode(display=False) as counter:
            hidden = clip_vision.encode_image(image)["last_hidden_state"].to(device, dtype)  # (1, 257, 1280)
    clip_flops = counter.get_total_flops()
    rate = matmul_rate(hidden.shape[1] * max(PHOTOS), hidden.shape[2], device)
    figures = {
        "clip_vision_s": clip_s,
        "clip_vision_dtype": str(getattr(clip_vision, "dtype", "")),
        "clip_tokens": list(hidden.shape),
        # The CLIP tower's floor: its FLOPs per photo (torch's counter) at this machine's float32 matmul rate.
        "clip_vision_flops": clip_flops,
        "matmul_flops_per_s": rate,
        "clip_vision_floor_s": clip_flops / rate,
        "reps": reps,
        "by_num_tokens": {},
    }
    tokens_by_m = {}
    for m, encoder in encoders.items():
        with torch.inference_mode():
            if warm:
                encoder.encode(hidden)
            qformer_s = min(timed(functools.partial(encoder.encode, hidden), device)[0] for _ in range(reps))
            tokens = encoder.encode(hidden)
        tokens_by_m[m] = tokens.clone()
        project = functools.partial(_project_all, encoder, tokens_by_m[m], device, dtype)
        if warm:
            project()
        kv_s, binding = min((timed(project, device) for _ in range(reps)), key=lambda r: r[0])
        figures["by_num_tokens"][m] = {
            "qformer_s": qformer_s,
            "kv_projection_s": kv_s,
            "total_s": clip_s + qformer_s + kv_s,
            "kv_cache_bytes": cache_bytes(binding),
            "kv_projection_flops": projection_flops(encoder.layers, m),
        }
    return figures, tokens_by_m


def matmul_rate(rows: int, width: int, device: torch.device, reps: int = 5) -> float:
    """FLOP/s of one float32 matmul of CLIP's MLP shape, (rows, width) by (width, 4 * width): the rate ComfyUI's
    CLIP vision computes at (it casts its weights to the float32 pixels), best of `reps` after one untimed call."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=gen).to(device)
    w = torch.randn(4 * width, width, generator=gen).to(device)
    with torch.inference_mode():
        torch.nn.functional.linear(x, w)
        seconds = min(timed(functools.partial(torch.nn.functional.linear, x, w), device)[0] for _ in range(reps))
    return 2 * rows * width * 4 * width / seconds


def _project_all(encoder: NestedEncoder, tokens: torch.Tensor, device: torch.device, dtype: torch.dtype) -> Any:
    binding = subject_binding(encoder, tokens)
    for i in range(len(encoder.layers)):
        binding.layer_kv(i, device, dtype)
    return binding


def time_encode_subject(
    clip_vision: Any, layouts: dict[str, NestedEncoder], photos: Sequence[int], device: torch.device, reps: int = 1
) -> dict:
    """Seconds for the Encode node's `encode_subject` (CLIP vision + Q-Former) per encoder layout and photo count.

    512x512 photos, best of `reps` after one untimed call (ComfyUI loads CLIP on its first). Returns
    {layout: {photos: {"seconds", "per_photo"}}}.
    """
    import comfy.model_management

    loader, subject = pack_module("nodes.loader"), pack_module("nodes.subject")
    images = torch.rand(max(photos), 512, 512, 3, generator=torch.Generator().manual_seed(0))
    # Every handle stays alive until all are timed: ComfyUI takes a dropped ModelPatcher whose model lives on (the
    # encoders do) for a leak, and collects garbage at every later load, inside the timings.
    handles = {name: loader.make_handle(encoder, clip_vision, name) for name, encoder in layouts.items()}
    figures: dict = {}
    for i, (name, handle) in enumerate(handles.items()):
        if i == 0:
            subject.encode_subject(handle, images[:1])  # ComfyUI loads CLIP on its first call
        comfy.model_management.load_model_gpu(handle.patcher)  # and each encoder on its first
        figures[name] = {}
        for n in photos:
            call = functools.partial(subject.encode_subject, handle, images[:n])
            seconds = min(timed(call, device)[0] for _ in range(reps))
            figures[name][n] = {"seconds": seconds, "per_photo": seconds / n}
    comfy.model_management.unload_all_models()
    return figures
