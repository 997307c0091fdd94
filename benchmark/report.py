"""The report: the benchmark's result as the table it prints."""

from __future__ import annotations

from typing import Optional

from .capture import describe as describe_capture


def _pct(x: Optional[float]) -> str:
    return "" if x is None else f"{100 * x:.2f} %"


def format_table(result: dict) -> str:
    """The report: machine, per-variant step costs next to their floors, FLOPs, encoding, trainer."""
    cfg, machine = result["config"], result["machine"]
    res = cfg["resolution"]
    where = machine.get("gpu") or f"{machine['cpu']}, {machine['torch_threads']} threads"
    lines = [
        f"Nested attention benchmark: SDXL UNet ({result['unet_parameters'] / 1e9:.3f} B parameters, random weights), "
        f"{res}x{res}, {cfg['device']} {cfg['dtype']}, attention {cfg['host_attention']}",
        f"Machine: {where}; torch {machine['torch']}, ComfyUI {machine.get('comfyui', '?')}, "
        f"Python {machine['python']}"
        + (f"; load average at start {machine['load_average'][0]:.2f}" if "load_average" in machine else ""),
        "",
        "Per sampling step (one UNet evaluation of cond + uncond, batch 2); overheads vs plain, best of "
        f"{cfg['steps']} timed steps after a first one:",
    ]
    head = (
        f"{'variant':<22}{'first s':>9}{'step s':>9}{'+step':>9}{'+eval':>9}{'floor':>9}{'ratio':>7}"
        f"{'attn +eval':>11}{'ratio':>7}{'FLOP +eval':>11}{'peak GB':>9}"
    )
    lines += [head, "-" * len(head)]
    for r in result["variants"]:
        line = f"{r['name']:<22}{r['first_step_s']:>9.2f}{r['step_best_s']:>9.2f}"
        if r["rows"]:
            line += (
                f"{_pct(r['overhead_step']):>9}{_pct(r['overhead_eval']):>9}{_pct(r['floor_eval']):>9}"
                f"{r['ratio_to_floor']:>7.2f}{_pct(r['attention_overhead_eval']):>11}"
                f"{r['attention_ratio_to_floor']:>7.2f}{_pct(r['counted_eval']):>11}"
            )
        else:
            line += " " * 73
        line += f"{r['peak_memory_bytes'] / 1e9:>9.2f}"
        lines.append(line)
    lines += [
        "  +step: extra time per step. +eval: extra time per UNet evaluation that carries the injection (nested: the",
        "  cond half only; IP-Adapter: both halves), over plain/2. floor: 4*N*M*D per layer over one plain",
        "  evaluation's FLOPs (IP-Adapter: 4*N*16*D + its per-call K/V projection; docs/ARCHITECTURE.md, Performance",
        "  model). ratio: +eval / floor (target on a GPU: <= 1.5). attn +eval: the same from the 70 attn2 calls timed",
        "  alone (host vs patch, less noisy).",
        "  FLOP +eval: the extra FLOPs torch's counter sees per evaluation. peak: "
        + result["variants"][0]["peak_memory_kind"]
        + ".",
    ]
    for r in result["variants"]:
        if "kv_projections_first_step" in r:
            lines.append(
                f"  {r['name']}: K~/V~ projections in the first step {r['kv_projections_first_step']}, "
                f"per step after the first: {r['kv_projections_per_later_step']:g}; "
                f"cache {r['kv_cache_bytes'] / 1e6:.0f} MB"
            )
    if "capture" in result:  # Capture Nested Attention (benchmark/capture.py)
        lines.append(describe_capture(result["capture"], result["variants"][0]["step_best_s"]))
    ac = result["attention_calls"]
    work = ac["gpu_work_per_call"]
    layer = "/".join(map(str, ac["widest_layer"]))
    lines.append(
        f"  per attn2 call ({layer}, batch 2, counted on meta), GPU kernel launches: "
        + ", ".join(f"{k} {len(v['kernels'])}" for k, v in work.items())
    )
    lines.append(
        "  ... and host-GPU syncs (each drains the GPU's queue): "
        + ", ".join(f"{k} {len(v['syncs'])}" for k, v in work.items())
    )

    lines += ["", "FLOPs per conditional UNet evaluation (torch FlopCounterMode, meta device):"]
    head = f"{'resolution':<12}{'plain TFLOP':>12}" + "".join(
        f"{name + ' floor / counted':>42}" for name in next(iter(result["flops"].values()))["variants"]
    )
    lines += [head, "-" * len(head)]
    for r, entry in result["flops"].items():
        plain = entry["plain_cond_eval"]
        line = f"{r + 'x' + r:<12}{plain / 1e12:>12.3f}"
        for v in entry["variants"].values():
            cell = (
                f"+{v['floor'] / 1e12:.3f} ({_pct(v['floor'] / plain)}) / "
                f"+{v['counted'] / 1e12:.3f} ({_pct(v['counted'] / plain)})"
            )
            line += f"{cell:>42}"
        lines.append(line)
    lines.append(
        f"  {entry['attention_calls']} cross-attention calls per evaluation. "
        "docs/ARCHITECTURE.md, Performance model: 6.76 TFLOP plain at 1024; floors 1.6 % (M=256) and "
        "6.4 % (M=1024) per conditional evaluation, half that per CFG step."
    )

    enc = result["encode"]
    lines += [
        "",
        f"Encoding one subject (best of {enc['reps']}): CLIP ViT-H/14 {enc['clip_vision_s']:.3f} s "
        f"(weights {enc['clip_vision_dtype']})",
    ]
    for m, e in enc["by_num_tokens"].items():
        lines.append(
            f"  M={m}: Q-Former {e['qformer_s']:.3f} s, K~/V~ of all layers {e['kv_projection_s']:.3f} s "
            f"({e['kv_projection_flops'] / 1e9:.0f} GFLOP), total {e['total_s']:.3f} s; "
            f"K~/V~ cache {e['kv_cache_bytes'] / 1e6:.0f} MB ({cfg['dtype']})"
        )

    trainer = result.get("trainer") or {}
    if trainer:
        lines += ["", "Trainer throughput (median step after warm-up):"]
        for name, t in trainer.items():
            lines.append(
                f"  {name}: {t['images_per_s']:.2f} images/s (batch {t['batch_size']}, "
                f"{t['resolution']}x{t['resolution']}, M={t['num_tokens']}, step {t['step_s']:.3f} s); "
                f"outside the frozen UNet's forward+backward: {_pct(t['outside_unet_share'])}  [{t['what']}]"
            )
    lines += ["", f"Wall time {result['wall_s']:.0f} s."]
    if "profile" in result:
        lines += ["", "Profile of one nested attn2 call (widest layer, batch 2, 3 calls):", result["profile"]]
    return "\n".join(lines)
