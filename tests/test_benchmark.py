"""The benchmark's pieces on tiny models: FLOP counts, the IP-Adapter-style patch, projection counting, the trainer timer.

No assertion here depends on a timing: the figures themselves are read from the benchmark's table.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

from benchmark import cli, counters, trainer, variants, workload
from nested_attention import SDXL_LAYERS, unet_layers
from nested_attention.patch import NestedAttentionPatch
from training.tiny import models as builders

CPU, META = torch.device("cpu"), torch.device("meta")


@pytest.fixture(scope="module")
def host():
    return workload.host_attention()


@pytest.fixture(scope="module")
def tiny_meta():
    return builders.build_unet(builders.sdxl_unet_config(tiny=True), META, torch.float32)


def _tiny_encoder(m: int, layers, device=CPU):
    return builders.build_encoder(m, layers, device, torch.float32, seed=1, qformer=builders.tiny_qformer())


def test_nested_flops_are_the_floor_plus_the_widened_heads_and_the_previous_recomputed_logits(tiny_meta, host):
    layers = unet_layers(tiny_meta.model.diffusion_model)
    m = 64
    encoder = _tiny_encoder(m, layers, META)
    binding = variants.subject_binding(encoder, torch.empty(1, m, 2048, device="meta"))
    nested = variants.with_nested(tiny_meta, binding, layers)
    previous = variants.with_nested(tiny_meta, binding, layers, previous=True)
    for resolution in (64, 128):
        calls = counters.attention_calls(tiny_meta, resolution, host)
        plain = counters.count_flops(tiny_meta, resolution)["total"]
        floor = counters.nested_floor(calls, m)
        assert plain > 0 and floor > 0
        # q K~^T and P V~ (the floor); the subject row's text attention is the host's, its heads 8 columns wider
        # (q K^T and P V over d + 8 instead of d: 4 N T h 8 more). The K~/V~ projection is cached before counting.
        widening = sum(4 * c.n * workload.CHUNK * c.heads * 8 for c in calls)
        assert counters.count_flops(nested, resolution)["total"] - plain == floor + widening
        # The previous form recomputed the plain logits q K^T (2 N T D) beside the host's attention.
        logits = sum(2 * c.n * workload.CHUNK * c.dim for c in calls)
        assert counters.count_flops(previous, resolution)["total"] - plain == floor + logits


def test_ip_adapter_flops_are_its_floor(tiny_meta, host):
    layers = unet_layers(tiny_meta.model.diffusion_model)
    ip = variants.with_ip_adapter(tiny_meta, layers, host, META, torch.float32)
    calls = counters.attention_calls(tiny_meta, 64, host)
    extra = counters.count_flops(ip, 64)["total"] - counters.count_flops(tiny_meta, 64)["total"]
    assert extra == counters.ip_adapter_floor(calls)


def test_full_sdxl_has_seventy_attention_calls_in_table_order_and_the_design_floor(host):
    meta = builders.build_unet(builders.sdxl_unet_config(), META, torch.float16)
    calls = counters.attention_calls(meta, 1024, host)
    assert [c.key for c in calls] == [layer.key for layer in SDXL_LAYERS]
    assert [c.dim for c in calls] == [layer.dim for layer in SDXL_LAYERS]
    # docs/ARCHITECTURE.md §7: +0.107 TFLOP at M = 256 and +0.429 at M = 1024 per conditional evaluation at 1024x1024.
    assert counters.nested_floor(calls, 256) / 1e12 == pytest.approx(0.107, abs=5e-4)
    assert counters.nested_floor(calls, 1024) / 1e12 == pytest.approx(0.429, abs=5e-4)


def test_ip_adapter_patch_adds_a_decoupled_attention_to_every_row(host):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 16, 64, generator=g), torch.randn(2, 77, 64, generator=g), torch.randn(2, 77, 64, generator=g)
    tokens = torch.randn(1, workload.IP_TOKENS, 2048, generator=g)
    wk, wv = torch.randn(64, 2048, generator=g) / 45, torch.randn(64, 2048, generator=g) / 45
    extra = {"n_heads": 4, "cond_or_uncond": [0, 1]}
    plain = host(q, k, v, 4, extra)

    out = variants.NaiveIPAdapterPatch(image_tokens=tokens, to_k_ip=wk, to_v_ip=wv, host=host)(q, k, v, extra)
    assert out.shape == q.shape
    k_ip, v_ip = (torch.nn.functional.linear(tokens, w).expand(2, -1, -1) for w in (wk, wv))
    torch.testing.assert_close(out, plain + host(q, k_ip, v_ip, 4, extra))
    assert ((out - plain).abs().amax(dim=(1, 2)) > 0).all()  # both rows (cond and uncond) change

    off = variants.NaiveIPAdapterPatch(image_tokens=tokens, to_k_ip=wk, to_v_ip=wv, host=host, scale=0.0)
    torch.testing.assert_close(off(q, k, v, extra), plain, rtol=0, atol=0)


def test_kv_projections_happen_in_the_first_step_only_and_uncond_flops_equal_plain(tiny_unet, host):
    layers = unet_layers(tiny_unet.model.diffusion_model)
    encoder = _tiny_encoder(16, layers)
    binding = variants.subject_binding(encoder, torch.randn(1, 16, 2048))
    model = variants.with_nested(tiny_unet, binding, layers)
    counts = counters.count_projections(binding)
    inputs = workload.step_inputs(2, 64, CPU)

    out = workload.unet_step(model, inputs)
    assert torch.isfinite(out).all()
    assert counts["linear"] == 2 * len(layers)  # K~ and V~ of every layer
    counts["linear"] = 0
    workload.unet_step(model, inputs)
    workload.unet_step(model, inputs)
    assert counts["linear"] == 0
    assert counters.cache_bytes(binding) == sum(2 * 16 * layer.dim * 4 for layer in layers)

    # An unconditional evaluation runs the host attention alone: the same FLOPs as the plain model.
    from torch.utils.flop_counter import FlopCounterMode

    one = tuple(t[:1] for t in inputs)
    flops = []
    for m in (tiny_unet, model):
        with FlopCounterMode(display=False) as counter:
            workload.unet_step(m, one, cond_or_uncond=(1,))
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1] > 0


def test_uncond_rows_of_a_cfg_step_are_bit_identical_to_plain(tiny_unet, host):
    layers = unet_layers(tiny_unet.model.diffusion_model)
    binding = variants.subject_binding(_tiny_encoder(16, layers), torch.randn(1, 16, 2048))
    model = variants.with_nested(tiny_unet, binding, layers)
    inputs = workload.step_inputs(2, 64, CPU)
    plain, nested = workload.unet_step(tiny_unet, inputs), workload.unet_step(model, inputs)
    torch.testing.assert_close(nested[1], plain[1], rtol=0, atol=0)
    assert (nested[0] - plain[0]).abs().max() > 0


def test_device_syncs_are_counted_on_meta_and_plain_attention_has_none(host):
    call = counters.AttentionCall(("input", 4, 0), 64, 128, 2)
    q, k, v, extra = counters.layer_inputs(call, 2, META, torch.float32, seed=0)
    tokens = torch.empty(1, workload.IP_TOKENS, 2048, device="meta")
    weights = torch.empty(128, 2048, device="meta")
    ip = variants.NaiveIPAdapterPatch(image_tokens=tokens, to_k_ip=weights, to_v_ip=weights, host=host)
    with workload.comfy_sdpa_attention():  # the benchmark's host attention; the CPU default cannot run on meta
        assert counters.device_syncs_per_call(lambda: host(q, k, v, 2, extra)) == []
        assert counters.device_syncs_per_call(lambda: ip(q, k, v, extra)) == []

    def reads_back():
        return float(q.max()), torch.tensor([1, 2], device="meta"), torch.arange(3).to("meta")

    assert len(counters.device_syncs_per_call(reads_back)) == 3


def test_a_warm_nested_patch_never_waits_for_the_device(tiny_meta, host):
    """No read-back and no blocking host copy per attn2 call: on a GPU each would drain its queue 70 times a step."""
    import math

    layers = unet_layers(tiny_meta.model.diffusion_model)
    encoder = _tiny_encoder(16, layers, META)
    tokens = torch.empty(1, 16, 2048, device="meta")
    call = max(counters.attention_calls(tiny_meta, 64, host), key=lambda c: c.n * c.dim)
    q, k, v, extra = counters.layer_inputs(call, 2, META, torch.float32, seed=0)  # CFG rows [cond, uncond]
    index = [layer.key for layer in layers].index(call.key)
    plain = variants.subject_binding(encoder, tokens)
    boosted = variants.subject_binding(encoder, tokens)
    boosted.lam, boosted.sigma_start, boosted.sigma_end = 3.0, 1e9, 0.5  # lambda, and a sigma window
    with workload.comfy_sdpa_attention():
        for binding in (plain, boosted):
            patch = NestedAttentionPatch(layers[index], index, [binding], host)
            work = counters.device_work_per_call(functools.partial(patch, q, k, v, extra))
            assert work["syncs"] == [], (binding.lam, work)
            assert "nonzero" not in work["kernels"] and "index_copy" not in work["kernels"]
        # A new sigmas tensor (the next step) is read once, for all layers: a window needs that one read.
        extra["sigmas"] = torch.full((2,), 2.0, device="meta")
        assert counters.device_syncs_per_call(lambda: boosted.active(extra["sigmas"])) == []
    assert plain.sigma_start == math.inf


def test_the_new_form_launches_fewer_kernels_and_holds_less_memory_than_the_previous(tiny_meta, host):
    """Counted on meta at a layer with as many queries as SDXL's widest at 1024 x 1024 (N = 4096)."""
    from benchmark.previous import PreviousNestedPatch

    layers = unet_layers(tiny_meta.model.diffusion_model)
    widest = max(counters.attention_calls(tiny_meta, 64, host), key=lambda c: c.dim)
    index = [spec.key for spec in layers].index(widest.key)
    layer = layers[index]
    call = counters.AttentionCall(widest.key, 4096, widest.dim, widest.heads)
    q, k, v, extra = counters.layer_inputs(call, 2, META, torch.float32, seed=0)
    binding = variants.subject_binding(_tiny_encoder(256, layers, META), torch.empty(1, 256, 2048, device="meta"))
    with workload.comfy_sdpa_attention():
        plain = counters.device_work_per_call(lambda: host(q, k, v, call.heads, extra))
        work = {cls: counters.device_work_per_call(functools.partial(cls(layer, index, [binding], host), q, k, v, extra))
                for cls in (NestedAttentionPatch, PreviousNestedPatch)}
    new, old = work[NestedAttentionPatch], work[PreviousNestedPatch]
    assert plain["kernels"] == ["scaled_dot_product_attention"] and plain["peak_bytes"] == q.numel() * 4
    assert new["syncs"] == old["syncs"] == []
    assert len(new["kernels"]) < len(old["kernels"]) == 14
    # The previous form held the subject row's (h, N, T) float32 logits and their softmax; the new one none.
    logits = call.heads * call.n * workload.CHUNK * 4
    assert new["peak_bytes"] + logits < old["peak_bytes"]


@pytest.mark.parametrize("lam", [1.0, 2.5])
def test_the_previous_implementation_equals_the_reference(lam):
    """The benchmark's "(previous)" variants compute what the current code does: checked as the current one is."""
    from benchmark.previous import previous_nested_attention
    from nested_attention import NestedSubject
    from nested_attention.reference import reference_nested_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 6, 8, generator=g), torch.randn(2, 12, 8, generator=g), torch.randn(2, 12, 8, generator=g)
    subjects = [NestedSubject(torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), torch.tensor([3, 9]),
                              lam=lam, region_weight=torch.rand(6, generator=g)),
                NestedSubject(torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g), torch.tensor([5]))]
    out = previous_nested_attention(q, k, v, subjects, heads=2, rows=torch.tensor([True, False]))
    ref = reference_nested_attention(q, k, v, subjects, heads=2, rows=[0])
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


def test_trainer_timer_splits_steps_into_unet_and_the_rest(tiny_unet):
    layers = unet_layers(tiny_unet.model.diffusion_model)
    encoder = _tiny_encoder(8, layers)
    before = {name: p.clone() for name, p in encoder.named_parameters()}
    result = trainer.synthetic_trainer_throughput(tiny_unet, encoder, resolution=64, batch_size=2, steps=2, warmup=1,
                                                device=CPU, autocast=None, checkpointing=False)
    assert result["steps_timed"] == 2 and result["images_per_s"] > 0
    assert 0.0 <= result["outside_unet_share"] < 1.0
    assert any(not torch.equal(p, before[name]) for name, p in encoder.named_parameters())  # it trained


def test_fill_parameters_is_deterministic_finite_and_scaled():
    a, b = torch.nn.Linear(300, 200), torch.nn.Linear(300, 200)
    builders.fill_parameters_(a, seed=3)
    builders.fill_parameters_(b, seed=3)
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)
    assert torch.isfinite(a.weight).all()
    assert a.weight.std().item() == pytest.approx(300 ** -0.5, rel=0.1)


def test_cli_rejects_bad_combinations_and_fills_cpu_defaults(capsys):
    args = cli.parse_args(["--device", "cpu"])
    assert (args.resolution, args.dtype, args.steps) == (512, "fp32", 3)
    for bad in (["--device", "cpu", "--resolution", "500"], ["--device", "cpu", "--dtype", "fp16"],
                ["--device", "cpu", "--steps", "0"]):
        with pytest.raises(SystemExit):
            cli.parse_args(bad)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            cli.parse_args(["--device", "cuda"])


@pytest.mark.slow
def test_the_benchmark_runs_as_a_program_on_the_tiny_models(tmp_path):
    """`python -m benchmark` in its own process, as `dev.py bench` starts it: it sets ComfyUI up itself
    (an import of ComfyUI-aware code before that fails), measures every variant, prints its table and
    writes its JSON (the one end-to-end run of the benchmark in the suite: every line is checked here)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "benchmark.json"
    args = ["--device", "cpu", "--tiny", "--resolution", "64", "--steps", "1", "--attention-reps", "1",
            "--trainer-steps", "2", "--trainer-full-steps", "1", "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "benchmark", *args], check=False, capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    names = [v["name"] for v in result["variants"]]
    assert names == ["plain SDXL", "nested M=256", "nested M=256 (previous)", "nested M=1024",
                     "nested M=1024 (previous)", "IP-Adapter 16 tokens"]
    assert all(v["output_finite"] for v in result["variants"])
    nested = [v for v in result["variants"] if v["name"] in ("nested M=256", "nested M=1024")]
    # K~/V~ are projected in the first step only: two per cross-attention layer, none after.
    layers = result["attention_calls"]["count"]
    assert all(v["kv_projections_first_step"] == 2 * layers and v["kv_projections_per_later_step"] == 0
               for v in nested)
    assert "Per sampling step" in run.stdout and "Trainer (median step" in run.stdout
    assert {"tiny_cpu", "sdxl_cpu"} <= set(result["trainer"])
    assert 0.0 <= result["trainer"]["sdxl_cpu"]["outside_unet_share"] < 1.0

    out = run.stdout
    for name in names:
        assert name in out
    work = result["attention_calls"]["gpu_work_per_call"]
    assert all(not w["syncs"] for w in work.values())
    assert len(work["nested M=256"]["kernels"]) < len(work["nested M=256 (previous)"]["kernels"])
    assert "the nested SDPA alone" in out and "peak MB" in out
    photos = result["encode"]["photos"]
    assert set(photos) == {"IP-Adapter Plus layout (M=16)", "M=256", "M=1024"}
    assert all(set(by_n) == {"1", "4"} for by_n in photos.values())  # JSON keys
    encode = result["encode"]
    assert encode["clip_vision_flops"] > 0 and encode["matmul_flops_per_s"] > 0
    assert encode["clip_vision_floor_s"] == pytest.approx(encode["clip_vision_flops"] / encode["matmul_flops_per_s"])
    assert "x the CLIP floor" in out and "float32 matmul rate" in out
    assert "K~/V~ projections" in out and "FLOPs per conditional UNet evaluation" in out
    assert set(result["flops"]) == {"64", "1024"}
    # Capture Nested Attention's line: what it keeps is its running means, a few maps of the 8x8 latent's
    # grids and the M=1024 token weights on the token grid (2x2), float32, from the patches' calls.
    capture = result["capture"]
    assert capture["variant"] == "nested M=1024" and capture["subjects"] == 1 and capture["token_grid"] == [2, 2]
    tokens = 4 * 1024 * 2 * 2
    assert tokens < capture["kept_bytes"] <= tokens + 4 * 2 * 8 * 8
    assert "Capture Nested Attention on nested M=1024" in out


def test_the_capture_line_alone_runs_on_the_tiny_models(capsys):
    from benchmark import capture

    result = capture.main(["--device", "cpu", "--tiny", "--resolution", "64", "--num-tokens", "16", "--reps", "1"])
    assert result["subjects"] == 1 and result["token_grid"] == [2, 2] and result["kept_bytes"] > 4 * 16 * 2 * 2
    assert min(result["attention_on_s"], result["attention_placement_s"], result["attention_off_s"]) > 0
    assert "Capture Nested Attention on nested M=16" in capsys.readouterr().out
