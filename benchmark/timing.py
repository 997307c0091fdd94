"""Timing: the cross-attention calls alone, one nested call under torch.profiler, encoding one subject."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from nested_attention import NestedEncoder

from .counters import AttentionCall, cache_bytes, layer_inputs, projection_flops
from .variants import subject_binding
from .workload import synchronize, timed


def time_attention_calls(
    calls: Sequence[AttentionCall],
    patches: dict[str, dict],
    host: Callable,
    device: torch.device,
    dtype: torch.dtype,
    reps: int,
    rounds: int = 3,
) -> dict[str, float]:
    """Seconds per CFG step (batch 2) spent in the attn2 calls: the host alone, and each variant's patch.

    Per layer, each function runs `reps` times back to back between two syncs (on a GPU the launches
    overlap as in a real step), `rounds` times interleaved with the others; the fastest round counts
    (other load only ever slows a run down).
    """
    totals = {"host": 0.0, **{name: 0.0 for name in patches}}
    with torch.inference_mode():
        for i, call in enumerate(calls):
            q, k, v, extra = layer_inputs(call, 2, device, dtype, seed=i)
            fns = {"host": lambda: host(q, k, v, call.heads, extra)}
            for name, by_key in patches.items():
                fns[name] = (lambda p: lambda: p(q, k, v, extra))(by_key[call.key])
            for fn in fns.values():  # warm-up (and K~/V~ into the cache)
                fn()
            samples = {name: [] for name in fns}
            for _ in range(rounds):
                for name, fn in fns.items():
                    samples[name].append(timed(lambda: [fn() for _ in range(reps)], device)[0] / reps)
            for name in fns:
                totals[name] += min(samples[name])
    return totals


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
        hidden = clip_vision.encode_image(image)["last_hidden_state"].to(device, dtype)  # (1, 257, 1280)
    figures = {
        "clip_vision_s": clip_s,
        "clip_vision_dtype": str(getattr(clip_vision, "dtype", "")),
        "clip_tokens": list(hidden.shape),
        "reps": reps,
        "by_num_tokens": {},
    }
    tokens_by_m = {}
    for m, encoder in encoders.items():
        with torch.inference_mode():
            if warm:
                encoder.encode(hidden)
            qformer_s = min(timed(lambda: encoder.encode(hidden), device)[0] for _ in range(reps))
            tokens = encoder.encode(hidden)
        tokens_by_m[m] = tokens.clone()

        def project_all():
            binding = subject_binding(encoder, tokens_by_m[m])
            for i in range(len(encoder.layers)):
                binding.layer_kv(i, device, dtype)
            return binding

        if warm:
            project_all()
        kv_s, binding = min((timed(project_all, device) for _ in range(reps)), key=lambda r: r[0])
        figures["by_num_tokens"][m] = {
            "qformer_s": qformer_s,
            "kv_projection_s": kv_s,
            "total_s": clip_s + qformer_s + kv_s,
            "kv_cache_bytes": cache_bytes(binding),
            "kv_projection_flops": projection_flops(encoder.layers, m),
        }
    return figures, tokens_by_m
