"""The report: the benchmark's result as the table it prints."""

from __future__ import annotations

from .capture import describe as describe_capture


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f} %"


def format_table(result: dict) -> str:
    """The report: machine, per-variant step costs next to their floors, FLOPs, encoding, trainer."""
    lines = _steps(result) + _per_call(result) + _flops(result) + _encoding(result) + _trainer(result)
    lines += ["", f"Wall time {result['wall_s']:.0f} s."]
    if "profile" in result:
        lines += ["", "Profile of one nested attn2 call (widest layer, batch 2, 3 calls):", result["profile"]]
    return "\n".join(lines)


def _steps(result: dict) -> list[str]:
    cfg, machine = result["config"], result["machine"]
    res = cfg["resolution"]
    where = machine.get("gpu") or f"{machine['cpu']}, {machine['torch_threads']} threads"
    load = f"; load average at start {machine['load_average'][0]:.2f}" if "load_average" in machine else ""
    lines = [
        (f"Nested attention benchmark: SDXL UNet ({result['unet_parameters'] / 1e9:.3f} B parameters, random "
         f"weights), {res}x{res}, {cfg['device']} {cfg['dtype']}, attention {cfg['host_attention']}"),
        (f"Machine: {where}; torch {machine['torch']}, ComfyUI {machine.get('comfyui', '?')}, "
         f"Python {machine['python']}{load}"),
        "",
        ("Per sampling step (one UNet evaluation of cond + uncond, batch 2); overheads vs plain, best of "
         f"{cfg['steps']} timed steps after a first one:"),
    ]
    head = (
        f"{'variant':<26}{'first s':>9}{'step s':>9}{'+step':>9}{'+eval':>9}{'floor':>9}{'ratio':>7}"
        f"{'attn +eval':>11}{'ratio':>7}{'FLOP +eval':>11}{'peak GB':>9}"
    )
    lines += [head, "-" * len(head)]
    for r in result["variants"]:
        line = f"{r['name']:<26}{r['first_step_s']:>9.2f}{r['step_best_s']:>9.2f}"
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
        "  model). ratio: +eval / floor (target: <= 1.2). attn +eval: the same from the 70 attn2 calls timed alone",
        "  (host vs patch, interleaved, best of 3 rounds: the stable figure). (previous): the implementation before",
        "  the widened heads (benchmark/previous.py), on the same subject; its first step finds K~/V~ cached.",
        "  FLOP +eval: the extra FLOPs torch's counter sees per evaluation. peak: "
        + result["variants"][0]["peak_memory_kind"]
        + ".",
    ]
    for r in result["variants"]:
        if "sdpa_alone_s" in r:
            lines.append(
                f"  {r['name']}: the nested SDPA alone (the subject row's attention over its {r['num_tokens']} tokens, "
                f"through the host) runs at {r['sdpa_alone_ratio_to_floor']:.2f} x the floor; the rest of the "
                f"patch adds {r['beyond_sdpa_ratio_to_floor']:.2f} x"
            )
    for r in result["variants"]:
        if "kv_projections_first_step" in r:
            lines.append(
                f"  {r['name']}: K~/V~ projections in the first step {r['kv_projections_first_step']}, "
                f"per step after the first: {r['kv_projections_per_later_step']:g}; "
                f"cache {r['kv_cache_bytes'] / 1e6:.0f} MB"
            )
    if "capture" in result:  # Capture Nested Attention (benchmark/capture.py)
        lines.append(describe_capture(result["capture"], result["variants"][0]["step_best_s"]))
    return lines


def _per_call(result: dict) -> list[str]:
    cfg, ac = result["config"], result["attention_calls"]
    work = ac["gpu_work_per_call"]
    layer = "/".join(map(str, ac["widest_layer"]))
    head = f"{'':<26}{'launches':>10}{'syncs':>7}{'peak MB':>9}{'+MB':>8}"
    lines = [
        "",
        (f"Per attn2 call, counted on the meta device (layer {layer} at 1024x1024: N={ac['widest_layer_queries']}, "
         f"batch 2 = cond + uncond, {cfg['dtype']}):"),
        head,
        "-" * len(head),
    ]
    host_bytes = work["host"]["peak_bytes"]
    for name, w in work.items():
        lines.append(
            f"{name:<26}{len(w['kernels']):>10}{len(w['syncs']):>7}{w['peak_bytes'] / 1e6:>9.1f}"
            f"{(w['peak_bytes'] - host_bytes) / 1e6:>8.1f}"
        )
    lines.append(
        "  launches: ops that start a GPU kernel (the fused SDPA counts one); syncs: waits for the GPU; peak:"
        " the most memory the call's own tensors hold at once (+MB: beyond the host's attention)."
    )
    return lines


def _flops(result: dict) -> list[str]:
    lines = ["", "FLOPs per conditional UNet evaluation (torch FlopCounterMode, meta device):"]
    names = list(next(iter(result["flops"].values()))["variants"])
    head = f"{'resolution':<12}{'plain TFLOP':>12}" + "".join(f"{name + ' floor / counted':>46}" for name in names)
    lines += [head, "-" * len(head)]
    for r, entry in result["flops"].items():
        plain = entry["plain_cond_eval"]
        line = f"{r + 'x' + r:<12}{plain / 1e12:>12.3f}"
        for v in entry["variants"].values():
            cell = (
                f"+{v['floor'] / 1e12:.3f} ({_pct(v['floor'] / plain)}) / "
                f"+{v['counted'] / 1e12:.3f} ({_pct(v['counted'] / plain)})"
            )
            line += f"{cell:>46}"
        lines.append(line)
    lines.append(
        f"  {entry['attention_calls']} cross-attention calls per evaluation. "
        "docs/ARCHITECTURE.md, Performance model: 6.76 TFLOP plain at 1024; floors 1.6 % (M=256) and "
        "6.4 % (M=1024) per conditional evaluation, half that per CFG step."
    )
    return lines


def _encoding(result: dict) -> list[str]:
    enc, dtype = result["encode"], result["config"]["dtype"]
    lines = [
        "",
        (f"Encoding a subject (best of {enc['reps']}): CLIP ViT-H/14 alone {enc['clip_vision_s']:.3f} s per 512x512 "
         f"photo (weights {enc['clip_vision_dtype']})"),
    ]
    floor = enc.get("clip_vision_floor_s")
    if floor:
        lines.append(
            f"  its floor: {enc['clip_vision_flops'] / 1e9:.0f} GFLOP per photo (torch's counter) at this machine's float32 "
            f"matmul rate, {enc['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s (CLIP's MLP shape, 4 photos' rows): "
            f"{floor:.3f} s per photo"
        )
    for layout, by_n in enc.get("photos", {}).items():
        lines.append(
            f"  Encode node (CLIP + Q-Former), {layout}: "
            + "; ".join(f"{n} photo{'s' if int(n) > 1 else ''} {e['seconds']:.2f} s ({e['per_photo']:.2f} s per photo"
                        + (f", {e['per_photo'] / floor:.2f} x the CLIP floor" if floor else "") + ")"
                        for n, e in by_n.items())
        )
    for m, e in enc["by_num_tokens"].items():
        lines.append(
            f"  M={m}: Q-Former {e['qformer_s']:.3f} s, K~/V~ of all layers {e['kv_projection_s']:.3f} s "
            f"({e['kv_projection_flops'] / 1e9:.0f} GFLOP, at Apply), CLIP + Q-Former + K~/V~ {e['total_s']:.3f} s; "
            f"K~/V~ cache {e['kv_cache_bytes'] / 1e6:.0f} MB ({dtype})"
        )
    return lines


def _trainer(result: dict) -> list[str]:
    trainer = result.get("trainer") or {}
    lines = []
    if trainer:
        lines += ["", "Trainer (median step after warm-up):"]
        for name, t in trainer.items():
            lines.append(
                f"  {name}: {t['images_per_s']:.2f} images/s (batch {t['batch_size']}, "
                f"{t['resolution']}x{t['resolution']}, M={t['num_tokens']}, step {t['step_s']:.3f} s); "
                f"outside the frozen UNet's forward+backward: {_pct(t['outside_unet_share'])}  [{t['what']}]"
            )
            if "optimizer_s" in t:
                adam = t["adamw_per_tensor_vs_fused_s"]
                lines.append(
                    f"    AdamW step over the encoder's {t['encoder_parameters'] / 1e6:.0f} M parameters (fused): "
                    f"{t['optimizer_s']:.3f} s = {_pct(t['optimizer_s'] / t['step_s'])} of the step; over the "
                    f"Q-Former's {adam['parameters'] / 1e6:.0f} M: per-tensor loop {adam['per_tensor']:.3f} s, "
                    f"fused {adam['fused']:.3f} s"
                )
    return lines
