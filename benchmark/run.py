"""One benchmark run: count on meta, build the models, encode a subject, time the variants, the trainer."""

from __future__ import annotations

import argparse
import functools
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
from .timing import (
    PHOTOS,
    benchmark_encoding,
    profile_attention,
    sdpa_name,
    time_attention_calls,
    time_encode_subject,
)
from .trainer import synthetic_trainer_throughput, tiny_trainer_throughput
from .variants import (
    IP_LAYOUT,
    IP_NAME,
    Variant,
    ip_adapter_plus_layout,
    nested_name,
    patches_by_key,
    subject_binding,
    with_ip_adapter,
    with_nested,
)
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
    # The shared model builders, imported only after configure_comfy: they import comfy.model_management.
    from training.tiny.models import build_unet, sdxl_unet_config, tiny_qformer

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    host = host_attention()
    started = time.perf_counter()
    result = {"machine": machine_info(device), "config": _config(args)}
    unet_config = sdxl_unet_config(tiny=args.tiny)
    qformer = tiny_qformer() if args.tiny else QFormerConfig()

    meta = build_unet(unet_config, torch.device("meta"), dtype)
    layers = unet_layers(meta.model.diffusion_model)
    flops, gpu_work, widest_1024, calls = _count_on_meta(meta, layers, qformer, args.resolution, host, dtype)
    result["flops"] = {str(k): v for k, v in flops.items()}
    widest = max(calls, key=lambda c: c.n * c.dim)
    del meta

    log.info("%s building SDXL (random weights) on %s in %s", PREFIX, device, args.dtype)
    model = build_unet(unet_config, device, dtype)
    result["unet_parameters"] = sum(p.numel() for p in model.model.diffusion_model.parameters())
    encoders, result["encode"], tokens = _encode(args.tiny, layers, qformer, device, dtype)
    variants = _variants(model, encoders, tokens, layers, host, device, dtype)
    memory = PeakMemory(device)
    _time_steps(variants, step_inputs(2, args.resolution, device), memory, args.steps, device)

    # The 70 cross-attention calls alone, beside the nested SDPA alone (the subject rows' attention over the
    # M tokens: what the floor counts), and operators per call.
    log.info("%s timing the cross-attention calls alone", PREFIX)
    patch_sets = {v.name: patches_by_key(v.model) for v in variants[1:]}
    alone = {sdpa_name(m): patch_sets[nested_name(m)] for m in NUM_TOKENS}
    attention = time_attention_calls(calls, patch_sets, host, device, dtype, reps=args.attention_reps, alone=alone)
    # Capture Nested Attention on the largest nested variant: what it adds to those calls (benchmark/capture.py).
    largest = nested_name(NUM_TOKENS[-1])
    log.info("%s capture on and off: %s", PREFIX, largest)
    result["capture"] = capture_cost(calls, patch_sets[largest], host, device, dtype, args.attention_reps,
                                     args.resolution, largest)
    if args.profile:
        result["profile"] = profile_attention(widest, patch_sets[largest][widest.key], device, dtype)

    result["variants"] = _variant_rows(variants, attention, flops[args.resolution], memory, args.steps, device)
    result["attention_calls"] = {
        "host_s": attention["host"],
        "reps": args.attention_reps,
        "count": len(calls),
        "widest_layer": list(widest_1024.key),
        "widest_layer_queries": widest_1024.n,
        "gpu_work_per_call": gpu_work,
    }
    if not args.skip_trainer:
        # Free the inference variants (IP weights, K~/V~ caches, encoders) before training.
        del variants, encoders, tokens, patch_sets, alone
        result["trainer"] = _trainer(args, model, layers, qformer, device, dtype)
    result["wall_s"] = time.perf_counter() - started
    return result


def _config(args: argparse.Namespace) -> dict:
    import comfy.ldm.modules.attention

    return {
        "device": torch.device(args.device).type,
        "dtype": args.dtype,
        "resolution": args.resolution,
        "steps": args.steps,
        "batch": "cond + uncond (CFG), 2 rows",
        "host_attention": comfy.ldm.modules.attention.optimized_attention.__name__,
        "num_tokens": list(NUM_TOKENS),
        "ip_tokens": IP_TOKENS,
        "tiny_models": args.tiny,
    }


def _count_on_meta(meta, layers, qformer: QFormerConfig, resolution: int, host, dtype: torch.dtype) -> tuple:
    """FLOPs and attention shapes on meta (free, and at 1024 whatever the run's resolution), and what one attn2
    call costs a GPU beyond FLOPs at 1024x1024's widest layer (sigmas on the device, as in sampling): kernel
    launches, host waits, and the memory its own tensors hold at once. Returns (flops, gpu_work, widest call at
    1024, the attention calls at `resolution`).
    """
    from training.tiny.models import build_encoder

    log.info("%s counting FLOPs on the meta device", PREFIX)
    variants = {}  # name -> (model, tokens M, UNet rows per CFG step that carry the injection)
    for m in NUM_TOKENS:
        encoder = build_encoder(m, layers, torch.device("meta"), dtype, qformer=qformer)
        binding = subject_binding(encoder, torch.empty(1, m, SDXL_CONTEXT_DIM, device="meta", dtype=dtype))
        for previous in (False, True):
            variants[nested_name(m, previous)] = (with_nested(meta, binding, layers, previous), m, 1)
    variants[IP_NAME] = (with_ip_adapter(meta, layers, host, torch.device("meta"), dtype), IP_TOKENS, 2)
    flops: dict = {}
    calls_at = {res: attention_calls(meta, res, host) for res in sorted({resolution, 1024})}
    for res, calls in calls_at.items():
        plain = count_flops(meta, res, one_off_work=False)["total"]
        entry = {"plain_cond_eval": plain, "attention_calls": len(calls), "variants": {}}
        for name, (variant, m, rows) in variants.items():
            entry["variants"][name] = {
                "floor": nested_floor(calls, m) if rows == 1 else ip_adapter_floor(calls),
                "counted": count_flops(variant, res)["total"] - plain,
                "rows": rows,
            }
        flops[res] = entry

    widest = max(calls_at[1024], key=lambda c: c.n * c.dim)
    q, k, v, extra = layer_inputs(widest, 2, torch.device("meta"), dtype, seed=0)
    with comfy_sdpa_attention():
        gpu_work = {"host": device_work_per_call(lambda: host(q, k, v, widest.heads, extra))}
        for name, (variant, _, _) in variants.items():
            patch = patches_by_key(variant)[widest.key]
            gpu_work[name] = device_work_per_call(functools.partial(patch, q, k, v, extra))
    return flops, gpu_work, widest, calls_at[resolution]


def _encode(tiny: bool, layers, qformer: QFormerConfig, device: torch.device, dtype: torch.dtype) -> tuple:
    """The encoders (one per M, projections shared), the encoding figures and each M's subject tokens."""
    from nested_attention_comfy.clip_vision import clip_vision_spec
    from training.tiny.models import build_encoder, clip_vision_h, tiny_clip_vision

    clip_vision = tiny_clip_vision(seed=0, hidden=qformer.clip_dim) if tiny else clip_vision_h(device)
    clip = clip_vision_spec(clip_vision)  # the tower's shapes, read off the model
    first = build_encoder(NUM_TOKENS[0], layers, device, dtype, seed=1, qformer=qformer, clip_vision=clip)
    encoders = {NUM_TOKENS[0]: first}
    for m in NUM_TOKENS[1:]:
        encoders[m] = build_encoder(
            m, layers, device, dtype, seed=1, qformer=qformer, projections=first.projections, clip_vision=clip
        )
    log.info("%s encoding subjects", PREFIX)
    reps = 3 if device.type == "cuda" else 1
    figures, tokens = benchmark_encoding(clip_vision, encoders, device, dtype, reps=reps)
    layouts = {IP_LAYOUT: ip_adapter_plus_layout(layers, device, dtype, clip, first.projections, tiny),
               **{f"M={m}": encoders[m] for m in NUM_TOKENS}}
    figures["photos"] = time_encode_subject(clip_vision, layouts, PHOTOS, device, reps=reps)
    del clip_vision, layouts
    gc.collect()
    return encoders, figures, tokens


def _variants(model, encoders: dict, tokens: dict, layers, host, device: torch.device,
              dtype: torch.dtype) -> list[Variant]:
    """Plain SDXL, nested attention per M beside the previous implementation, and the IP-Adapter injection."""
    variants = [Variant("plain SDXL", model, rows=0)]
    for m in NUM_TOKENS:
        binding = subject_binding(encoders[m], tokens[m], name=f"benchmark M={m}")
        variant = Variant(nested_name(m), with_nested(model, binding, layers), rows=1, num_tokens=m, binding=binding)
        variant.projections = count_projections(binding)
        variants.append(variant)
        # The previous implementation, on the same subject (its K~/V~ are cached by then).
        variants.append(Variant(nested_name(m, True), with_nested(model, binding, layers, previous=True), rows=1,
                                num_tokens=m))
    variants.append(
        Variant(IP_NAME, with_ip_adapter(model, layers, host, device, dtype), rows=2, num_tokens=IP_TOKENS)
    )
    return variants


def _time_steps(variants: list[Variant], inputs, memory: PeakMemory, steps: int, device: torch.device) -> None:
    """Whole steps: one first (warm-up; nested projects K~/V~ here) per variant, then timed rounds."""
    for v in variants:
        log.info("%s first step: %s", PREFIX, v.name)
        gc.collect()
        memory.reset()
        v.first_s, out = timed(functools.partial(unet_step, v.model, inputs), device)
        v.peak_bytes = memory.peak_bytes()
        v.finite = bool(torch.isfinite(out).all())
        del out
        if v.projections is not None:
            v.projections_first, v.projections["linear"] = v.projections["linear"], 0
    for round_ in range(steps):
        for v in variants:
            log.info("%s step %d/%d: %s", PREFIX, round_ + 1, steps, v.name)
            v.step_s.append(timed(functools.partial(unet_step, v.model, inputs), device)[0])
    for v in variants:
        if v.projections is not None:
            v.projections_later = v.projections["linear"]


def _variant_rows(variants: list[Variant], attention: dict, flops: dict, memory: PeakMemory, steps: int,
                  device: torch.device) -> list[dict]:
    """One row per variant: its fastest step (other load on the machine only ever slows a step down), its
    overheads per evaluation against the plain step and the FLOP floor, the attn2 calls alone."""
    plain = min(variants[0].step_s)
    memory_kind = ("cuda max_memory_allocated" if device.type == "cuda"
                   else ("peak RSS of the step" if memory.resettable else "process peak RSS so far"))
    rows = []
    for v in variants:
        step = min(v.step_s)
        row = {"name": v.name, "rows": v.rows, "num_tokens": v.num_tokens, "first_step_s": v.first_s,
               "step_s": v.step_s, "step_best_s": step, "step_median_s": statistics.median(v.step_s),
               "peak_memory_bytes": v.peak_bytes, "peak_memory_kind": memory_kind, "output_finite": v.finite}
        if v.rows:
            row.update(_overheads(v, step, plain, attention, flops))
        if v.binding is not None:
            row["kv_projections_first_step"] = v.projections_first
            row["kv_projections_per_later_step"] = v.projections_later / max(1, steps)
            row["kv_cache_bytes"] = cache_bytes(v.binding)
        rows.append(row)
    return rows


def _overheads(v: Variant, step: float, plain: float, attention: dict, flops: dict) -> dict:
    extra_s = step - plain
    fl = flops["variants"][v.name]
    floor_eval = fl["floor"] / flops["plain_cond_eval"]
    # Per evaluation that carries the injection: nested only in the cond half, IP-Adapter in both.
    overhead_eval = (extra_s / v.rows) / (plain / 2)
    attention_eval = ((attention[v.name] - attention["host"]) / v.rows) / (plain / 2)
    row = {
        "overhead_step": extra_s / plain,
        "overhead_eval": overhead_eval,
        "attention_s": attention[v.name],
        "attention_host_s": attention["host"],
        "attention_overhead_eval": attention_eval,
        "floor_eval": floor_eval,
        "counted_eval": fl["counted"] / flops["plain_cond_eval"],
        "ratio_to_floor": overhead_eval / floor_eval,
        "attention_ratio_to_floor": attention_eval / floor_eval,
    }
    if v.name == nested_name(v.num_tokens):  # where the limit is: the nested SDPA alone, against the floor
        alone_eval = attention[sdpa_name(v.num_tokens)] / (plain / 2)
        row["sdpa_alone_s"] = attention[sdpa_name(v.num_tokens)]
        row["sdpa_alone_ratio_to_floor"] = alone_eval / floor_eval
        row["beyond_sdpa_ratio_to_floor"] = (attention_eval - alone_eval) / floor_eval
    return row


def _trainer(args: argparse.Namespace, model, layers, qformer: QFormerConfig, device: torch.device,
             dtype: torch.dtype) -> dict:
    """The tiny preset's throughput on the CPU, and the trainer's step on the full-size UNet (on a CPU a few
    steps only, tens of seconds each)."""
    from training.tiny.models import build_encoder

    log.info("%s trainer throughput: tiny preset on the CPU", PREFIX)
    figures = {"tiny_cpu": tiny_trainer_throughput(steps=args.trainer_steps)}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    steps = args.trainer_steps if device.type == "cuda" else args.trainer_full_steps
    log.info("%s trainer step: SDXL UNet at %d on %s, %d steps", PREFIX, args.resolution, device, steps)
    encoder = build_encoder(NUM_TOKENS[0], layers, device, torch.float32, seed=1, qformer=qformer)
    figures[f"sdxl_{device.type}"] = synthetic_trainer_throughput(
        model, encoder, args.resolution, args.trainer_batch_size, steps, 1, device,
        autocast=dtype if device.type == "cuda" else None,
    )
    return figures
