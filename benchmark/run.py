"""One benchmark run: count on meta, build the models, encode a subject, time the variants, the trainer."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from nested_attention import SDXL_CONTEXT_DIM, QFormerConfig, unet_layers

from .capture import capture_cost
from .counters import (
    PeakMemory,
    attention_calls,
    cache_bytes,
    count_flops,
    count_projections,
    device_work_per_call,
    ip_adapter_floor,
    layer_inputs,
    nested_floor,
)
from .timing import benchmark_encoding, profile_attention, time_attention_calls
from .trainer import synthetic_trainer_throughput, tiny_trainer_throughput
from .variants import Variant, patches_by_key, subject_binding, with_ip_adapter, with_nested
from .workload import (
    DTYPES,
    IP_TOKENS,
    NUM_TOKENS,
    PREFIX,
    comfy_sdpa_attention,
    host_attention,
    step_inputs,
    timed,
    unet_step,
)

log = logging.getLogger(__name__)


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        import comfyui_version

        info["comfyui"] = comfyui_version.__version__
    except ImportError:
        pass
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_benchmark(args: argparse.Namespace) -> dict:
    """The whole measurement (see the package's docstring); returns the result the table and the JSON show."""
    import comfy.ldm.modules.attention

    # The shared model builders, imported only after configure_comfy: they import comfy.model_management.
    from training.tiny.models import build_encoder, build_unet, clip_vision_h, sdxl_unet_config, tiny_qformer

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    host = host_attention()
    started = time.perf_counter()
    result: dict = {
        "machine": machine_info(device),
        "config": {
            "device": device.type,
            "dtype": args.dtype,
            "resolution": args.resolution,
            "steps": args.steps,
            "batch": "cond + uncond (CFG), 2 rows",
            "host_attention": comfy.ldm.modules.attention.optimized_attention.__name__,
            "num_tokens": list(NUM_TOKENS),
            "ip_tokens": IP_TOKENS,
            "tiny_models": args.tiny,
        },
    }

    # FLOPs and attention shapes on meta: free, and at 1024 whatever the run's resolution.
    log.info("%s counting FLOPs on the meta device", PREFIX)
    unet_config = sdxl_unet_config(tiny=args.tiny)
    qformer = tiny_qformer() if args.tiny else QFormerConfig()
    meta = build_unet(unet_config, torch.device("meta"), dtype)
    layers = unet_layers(meta.model.diffusion_model)
    meta_encoders = {
        m: build_encoder(m, layers, torch.device("meta"), dtype, qformer=qformer) for m in NUM_TOKENS
    }
    meta_tokens = {m: torch.empty(1, m, SDXL_CONTEXT_DIM, device="meta", dtype=dtype) for m in NUM_TOKENS}
    meta_variants = {
        f"nested M={m}": with_nested(meta, subject_binding(meta_encoders[m], meta_tokens[m]), layers)
        for m in NUM_TOKENS
    }
    meta_variants[f"IP-Adapter {IP_TOKENS} tokens"] = with_ip_adapter(
        meta, layers, host, torch.device("meta"), dtype
    )
    flops: dict = {}
    for res in sorted({args.resolution, 1024}):
        calls = attention_calls(meta, res, host)
        plain = count_flops(meta, res)["total"]
        entry = {"plain_cond_eval": plain, "attention_calls": len(calls), "variants": {}}
        for name, variant in meta_variants.items():
            m = int(name.split("=")[1]) if name.startswith("nested") else IP_TOKENS
            floor = nested_floor(calls, m) if name.startswith("nested") else ip_adapter_floor(calls)
            entry["variants"][name] = {
                "floor": floor,
                "counted": count_flops(variant, res)["total"] - plain,
                "rows": 1 if name.startswith("nested") else 2,
            }
        flops[res] = entry
    result["flops"] = {str(k): v for k, v in flops.items()}
    calls = attention_calls(meta, args.resolution, host)
    widest = max(calls, key=lambda c: c.n * c.dim)

    # What would make the host wait for a GPU in one attn2 call (sigmas live on the GPU, as in sampling).
    q, k, vv, extra = layer_inputs(widest, 2, torch.device("meta"), dtype, seed=0)
    with comfy_sdpa_attention():
        gpu_work = {"host": device_work_per_call(lambda: host(q, k, vv, widest.heads, extra))}
        for name, variant in meta_variants.items():
            patch = patches_by_key(variant)[widest.key]
            gpu_work[name] = device_work_per_call(lambda: patch(q, k, vv, extra))
    del meta, meta_encoders, meta_variants

    # The real models.
    log.info("%s building SDXL (random weights) on %s in %s", PREFIX, device, args.dtype)
    model = build_unet(unet_config, device, dtype)
    result["unet_parameters"] = sum(p.numel() for p in model.model.diffusion_model.parameters())
    first = build_encoder(NUM_TOKENS[0], layers, device, dtype, seed=1, qformer=qformer)
    encoders = {NUM_TOKENS[0]: first}
    for m in NUM_TOKENS[1:]:
        encoders[m] = build_encoder(
            m, layers, device, dtype, seed=1, qformer=qformer, projections=first.projections
        )

    log.info("%s encoding one subject", PREFIX)
    if args.tiny:
        from training.tiny.models import tiny_clip_vision

        clip_vision = tiny_clip_vision(seed=0, hidden=qformer.clip_dim)
    else:
        clip_vision = clip_vision_h(device)
    result["encode"], tokens = benchmark_encoding(
        clip_vision, encoders, device, dtype, reps=3 if device.type == "cuda" else 1
    )
    del clip_vision
    gc.collect()

    variants = [Variant("plain SDXL", model, rows=0)]
    for m in NUM_TOKENS:
        binding = subject_binding(encoders[m], tokens[m], name=f"benchmark M={m}")
        variant = Variant(
            f"nested M={m}", with_nested(model, binding, layers), rows=1, num_tokens=m, binding=binding
        )
        variant.projections = count_projections(binding)
        variants.append(variant)
    variants.append(
        Variant(
            f"IP-Adapter {IP_TOKENS} tokens",
            with_ip_adapter(model, layers, host, device, dtype),
            rows=2,
            num_tokens=IP_TOKENS,
        )
    )

    # Whole steps: one first (warm-up; nested projects K~/V~ here) per variant, then timed rounds.
    inputs = step_inputs(2, args.resolution, device)
    memory = PeakMemory(device)
    for v in variants:
        log.info("%s first step: %s", PREFIX, v.name)
        gc.collect()
        memory.reset()
        v.first_s, out = timed(lambda: unet_step(v.model, inputs), device)
        v.peak_bytes = memory.peak_bytes()
        v.finite = bool(torch.isfinite(out).all())
        if v.projections is not None:
            v.projections_first, v.projections["linear"] = v.projections["linear"], 0
    for round_ in range(args.steps):
        for v in variants:
            log.info("%s step %d/%d: %s", PREFIX, round_ + 1, args.steps, v.name)
            v.step_s.append(timed(lambda: unet_step(v.model, inputs), device)[0])
    for v in variants:
        if v.projections is not None:
            v.projections_later = v.projections["linear"]

    # The 70 cross-attention calls alone, and operators per call.
    log.info("%s timing the cross-attention calls alone", PREFIX)
    patch_sets = {v.name: patches_by_key(v.model) for v in variants[1:]}
    attention = time_attention_calls(calls, patch_sets, host, device, dtype, reps=args.attention_reps)
    # Capture Nested Attention on the largest nested variant: what it adds to those calls (benchmark/capture.py).
    largest = f"nested M={NUM_TOKENS[-1]}"
    log.info("%s capture on and off: %s", PREFIX, largest)
    result["capture"] = capture_cost(calls, patch_sets[largest], host, device, dtype, args.attention_reps,
                                     args.resolution, largest)
    profile = None
    if args.profile:
        profile = profile_attention(
            widest, patch_sets[f"nested M={NUM_TOKENS[-1]}"][widest.key], device, dtype
        )

    # The fastest timed step: other load on the machine only ever slows a step down.
    plain = min(variants[0].step_s)
    plain_eval_flops = flops[args.resolution]["plain_cond_eval"]
    rows = []
    for v in variants:
        step = min(v.step_s)
        row = {
            "name": v.name,
            "rows": v.rows,
            "num_tokens": v.num_tokens,
            "first_step_s": v.first_s,
            "step_s": v.step_s,
            "step_best_s": step,
            "step_median_s": statistics.median(v.step_s),
            "peak_memory_bytes": v.peak_bytes,
            "peak_memory_kind": "cuda max_memory_allocated"
            if device.type == "cuda"
            else ("peak RSS of the step" if memory.resettable else "process peak RSS so far"),
            "output_finite": v.finite,
        }
        if v.rows:
            extra_s = step - plain
            fl = flops[args.resolution]["variants"][v.name]
            row.update(
                {
                    "overhead_step": extra_s / plain,
                    # Per evaluation that carries the injection: nested only in the cond half, IP-Adapter in both.
                    "overhead_eval": (extra_s / v.rows) / (plain / 2),
                    "attention_s": attention[v.name],
                    "attention_host_s": attention["host"],
                    "attention_overhead_eval": ((attention[v.name] - attention["host"]) / v.rows)
                    / (plain / 2),
                    "floor_eval": fl["floor"] / plain_eval_flops,
                    "counted_eval": fl["counted"] / plain_eval_flops,
                }
            )
            row["ratio_to_floor"] = row["overhead_eval"] / row["floor_eval"]
            row["attention_ratio_to_floor"] = row["attention_overhead_eval"] / row["floor_eval"]
        if v.binding is not None:
            row["kv_projections_first_step"] = v.projections_first
            row["kv_projections_per_later_step"] = v.projections_later / max(1, args.steps)
            row["kv_cache_bytes"] = cache_bytes(v.binding)
        rows.append(row)
    result["variants"] = rows
    result["attention_calls"] = {
        "host_s": attention["host"],
        "reps": args.attention_reps,
        "count": len(calls),
        "widest_layer": list(widest.key),
        "gpu_work_per_call": gpu_work,
    }
    if profile is not None:
        result["profile"] = profile

    if not args.skip_trainer:
        result["trainer"] = {}
        log.info("%s trainer throughput: tiny preset on the CPU", PREFIX)
        result["trainer"]["tiny_cpu"] = tiny_trainer_throughput(steps=args.trainer_steps)
        if device.type == "cuda":
            log.info("%s trainer throughput: SDXL UNet at %d on %s", PREFIX, args.resolution, device)
            # Free the inference variants (IP weights, K~/V~ caches, encoders) before training.
            del variants, variant, binding, encoders, first, tokens, patch_sets, out
            gc.collect()
            torch.cuda.empty_cache()
            encoder = build_encoder(NUM_TOKENS[0], layers, device, torch.float32, seed=1, qformer=qformer)
            result["trainer"]["sdxl_gpu"] = synthetic_trainer_throughput(
                model,
                encoder,
                args.resolution,
                args.trainer_batch_size,
                args.trainer_steps,
                1,
                device,
                autocast=dtype,
            )
    result["wall_s"] = time.perf_counter() - started
    return result
