"""Benchmark: nested attention's cost next to plain SDXL and an IP-Adapter-style injection (DESIGN 8).

    python -m training.benchmark                   # CPU: 512x512, float32
    python -m training.benchmark --device cuda     # GPU: 1024x1024, float16

One run, one machine. The full-size SDXL UNet (ComfyUI's own classes, random weights) is called as
ComfyUI's sampler calls it for one step with classifier-free guidance: cond and uncond in one batch
of 2. Variants:
  - plain SDXL;
  - nested attention, one subject with M = 256 and M = 1024 tokens, installed exactly as the Apply
    node installs it (one `SubjectBinding`, a `NestedAttentionPatch` on each of the 70 layers, host
    attention = ComfyUI's `optimized_attention`);
  - an IP-Adapter-style decoupled cross-attention over 16 image tokens on every row, K/V projected
    on every call as IP-Adapter does.
Each measured overhead sits next to its FLOP floor (4 N M D per layer, DESIGN 8) and next to the
FLOPs torch's counter sees for the variant on the meta device, at the run's resolution and at
1024x1024. Also measured: time to encode one subject (CLIP ViT-H/14, Q-Former, all layers' K~/V~),
size of the K~/V~ cache, peak memory per variant, K~/V~ projections per step (0 after the first),
the 70 cross-attention calls alone (less noisy than whole steps), what one attn2 call would cost a
GPU beyond FLOPs (kernel launches and host-GPU syncs, counted on meta), and the trainer's throughput.

Output: a table on stdout and a JSON file (default runs/benchmark/benchmark.json).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
import torch.utils._python_dispatch
from torch.overrides import TorchFunctionMode

from nested_attention import SDXL_CONTEXT_DIM, EncoderConfig, LayerSpec, NestedEncoder, QFormerConfig, unet_layers
from nested_attention.patch import NestedAttentionPatch, SubjectBinding

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "runs" / "benchmark" / "benchmark.json"
log = logging.getLogger(__name__)
PREFIX = "[nested-attention]"

NUM_QUERIES = (256, 1024)  # M of the nested variants (paper: 256 pets, 1024 faces)
IP_TOKENS = 16  # image tokens of the IP-Adapter-style variant (IP-Adapter Plus: 16)
SUBJECT_POSITION = 5  # where s* sits in the 77-token prompt ("<start> a photo of a pet ...")
CHUNK = 77  # tokens per CLIP chunk
SIGMA = 7.0  # noise level of the benchmarked step (any value: no variant depends on it)
POOL = 1_000_003  # prime length of the random pool weights are tiled from (see fill_parameters_)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------
# ComfyUI as a library, with torch's fused attention


def configure_comfy(device: str) -> None:
    """Set ComfyUI's arguments before `comfy.model_management` is imported: CPU or not, SDPA attention.

    ComfyUI picks its attention implementation once at import. PyTorch's SDPA is its default on
    NVIDIA GPUs; asking for it on the CPU too (instead of the sub-quadratic fallback) makes CPU and
    GPU runs time the same host attention, and lets the FLOP counter see every attention product.
    """
    from .comfy_env import setup_comfy

    setup_comfy()
    import comfy.cli_args

    if "comfy.model_management" in sys.modules:
        log.warning("%s comfy.model_management was imported before the benchmark configured it; ComfyUI's "
                    "attention choice may not be PyTorch's SDPA", PREFIX)
    comfy.cli_args.args.use_pytorch_cross_attention = True
    if device == "cpu":
        comfy.cli_args.args.cpu = True


def host_attention() -> Callable:
    """The nodes' and trainer's host attention: ComfyUI's optimized_attention, called as CrossAttention calls it."""
    from .models import comfy_attention

    return comfy_attention


@contextlib.contextmanager
def sdpa_attention():
    """ComfyUI's attention swapped for its PyTorch SDPA path, for counting on the meta device.

    On meta, SDPA decomposes into the matmuls torch's FLOP counter knows; the other paths may not
    run on meta at all. Every CrossAttention looks the global up at call time.
    """
    import comfy.ldm.modules.attention as attention

    saved = attention.optimized_attention
    attention.optimized_attention = attention.attention_pytorch
    try:
        yield
    finally:
        attention.optimized_attention = saved


# ------------------------------------------------------------------------------------------------
# Models with random weights


@torch.no_grad()
def fill_parameters_(module: torch.nn.Module, seed: int) -> None:
    """Deterministic random weights in seconds for billions of parameters (ComfyUI's ops leave them empty).

    Drawing 2.6 B normals takes about a minute on two CPU cores; tiling one seeded pool of POOL
    normals is memory-speed. Weights of linear/conv layers get std 1/sqrt(fan_in) so activations
    keep unit scale through the stack (no overflow in float16, no denormals on the CPU); norms 1
    and 0; everything else std 0.02. Parameters on the meta device are left alone.
    """
    pool = None
    offset = 0
    for sub in module.modules():
        for name, param in sub.named_parameters(recurse=False):
            if param.device.type == "meta":
                continue
            if isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                param.fill_(1.0 if name == "weight" else 0.0)
                continue
            if pool is None or pool.device != param.device:
                pool = torch.randn(POOL, generator=torch.Generator().manual_seed(seed)).to(param.device)
            std = param[0].numel() ** -0.5 if name == "weight" and param.dim() >= 2 else 0.02
            flat = param.view(-1)
            done, start = 0, offset % POOL
            while done < flat.numel():
                take = min(flat.numel() - done, POOL - start)
                flat[done:done + take].copy_(pool[start:start + take]).mul_(std)
                done, start = done + take, 0
            offset += 7919  # every tensor starts elsewhere in the pool


def tiny_qformer() -> QFormerConfig:
    """The tiny preset's Q-Former (for --tiny smoke runs)."""
    from .presets import PRESETS

    return PRESETS["tiny"].qformer


def sdxl_unet_config(tiny: bool = False) -> dict:
    """The real SDXL base UNet config (ComfyUI's model_detection entry), or the tests' tiny SDXL-shaped one."""
    from .tiny import SDXL_UNET_CONFIG, TINY_SDXL_UNET_CONFIG

    return dict(TINY_SDXL_UNET_CONFIG if tiny else SDXL_UNET_CONFIG)


def build_unet(config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A ModelPatcher around comfy.model_base.SDXL built from `config`; random weights unless on meta."""
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.SDXL(config)
    # BASE.__init__ overwrites these with SDXL's unet_extra_config; put the requested ones back.
    model_config.unet_config["num_heads"] = config["num_heads"]
    model_config.unet_config["num_head_channels"] = config["num_head_channels"]
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, "", device=device)
    if device.type != "meta":
        fill_parameters_(model.diffusion_model, seed)
        model.model_sampling.to(device)
    model.eval().requires_grad_(False)
    home = torch.device("cpu") if device.type == "meta" else device
    return comfy.model_patcher.ModelPatcher(model, load_device=home, offload_device=home)


def build_encoder(num_queries: int, layers: Sequence[LayerSpec], device: torch.device, dtype: torch.dtype,
                  seed: int = 0, qformer: Optional[QFormerConfig] = None,
                  projections: Optional[torch.nn.Module] = None) -> NestedEncoder:
    """A NestedEncoder with random weights (QFormerConfig defaults: the real Q-Former), in eval mode.

    `projections`: share another encoder's per-layer W_K~/W_V~ (they do not depend on M), which saves
    1.4 GB of float32 when both M are benchmarked.
    """
    qformer = replace(qformer or QFormerConfig(), num_queries=num_queries)
    with torch.device("meta"):
        encoder = NestedEncoder(EncoderConfig(qformer=qformer, layers=tuple(layers)))
    if projections is not None:
        encoder.projections = projections
    encoder.qformer.to_empty(device=device).to(dtype)
    fill_parameters_(encoder.qformer, seed)
    if projections is None:
        encoder.projections.to_empty(device=device).to(dtype)
        fill_parameters_(encoder.projections, seed + 1)
    return encoder.eval().requires_grad_(False)


def subject_binding(encoder: NestedEncoder, tokens: torch.Tensor, name: str = "benchmark subject") -> SubjectBinding:
    """One subject on a one-chunk prompt, as the Apply node binds it (lambda 1, always active, no mask)."""
    return SubjectBinding(encoder=encoder, tokens=tokens, positions=(SUBJECT_POSITION,), prompt_tokens=CHUNK,
                          name=name)


def with_nested(model: Any, binding: SubjectBinding, layers: Sequence[LayerSpec], host: Callable) -> Any:
    """A clone of `model` with the subject on every cross-attention layer (nodes.apply.apply_subject's install)."""
    m = model.clone()
    for index, layer in enumerate(layers):
        m.set_model_attn2_replace(NestedAttentionPatch(layer, index, [binding], host), *layer.key)
    return m


class IPAdapterStylePatch:
    """attn2 replacement with IP-Adapter's decoupled cross-attention: attn(q, K, V) + scale * attn(q, K_ip, V_ip).

    K_ip, V_ip come from the image tokens through this layer's own to_k_ip / to_v_ip, projected on
    every call and applied to every row (cond and uncond), as IP-Adapter implementations do.
    """

    def __init__(self, *, image_tokens: torch.Tensor, to_k_ip: torch.Tensor, to_v_ip: torch.Tensor, host: Callable,
                 scale: float = 1.0):
        self.image_tokens = image_tokens  # (1, T_ip, context)
        self.to_k_ip, self.to_v_ip = to_k_ip, to_v_ip  # (dim, context) each
        self.host = host
        self.scale = scale

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        out = self.host(q, k, v, heads, extra_options)
        tokens = self.image_tokens.to(q.device, q.dtype)
        k_ip = F.linear(tokens, self.to_k_ip.to(q.device, q.dtype)).expand(q.shape[0], -1, -1)  # (B, T_ip, dim)
        v_ip = F.linear(tokens, self.to_v_ip.to(q.device, q.dtype)).expand(q.shape[0], -1, -1)
        return out + self.scale * self.host(q, k_ip, v_ip, heads, extra_options)

    def __deepcopy__(self, memo: dict) -> "IPAdapterStylePatch":
        return self  # immutable; ModelPatcher.clone() deep-copies model_options


def with_ip_adapter(model: Any, layers: Sequence[LayerSpec], host: Callable, device: torch.device,
                    dtype: torch.dtype, seed: int = 0, num_tokens: int = IP_TOKENS) -> Any:
    """A clone of `model` with an IP-Adapter-style patch (random to_k_ip / to_v_ip) on every cross-attention layer."""
    m = model.clone()
    tokens = torch.randn(1, num_tokens, SDXL_CONTEXT_DIM, generator=torch.Generator().manual_seed(seed))
    tokens = tokens.to(device, dtype)
    for layer in layers:
        weights = torch.empty(2, layer.dim, SDXL_CONTEXT_DIM, device=device, dtype=dtype)
        if device.type != "meta":
            weights.copy_(torch.randn(weights.shape, generator=torch.Generator().manual_seed(seed + layer.dim)))
            weights.mul_(SDXL_CONTEXT_DIM ** -0.5)
        patch = IPAdapterStylePatch(image_tokens=tokens, to_k_ip=weights[0], to_v_ip=weights[1], host=host)
        m.set_model_attn2_replace(patch, *layer.key)
    return m


# ------------------------------------------------------------------------------------------------
# One sampling step, as ComfyUI's sampler makes it


def step_inputs(batch: int, resolution: int, device: torch.device, seed: int = 0) -> tuple:
    """(x, sigma, context, adm) of one CFG step: latent (B, 4, R/8, R/8), text context (B, 77, 2048), y (B, 2816)."""
    g = torch.Generator().manual_seed(seed)
    side = resolution // 8
    x = torch.randn(batch, 4, side, side, generator=g)
    sigma = torch.full((batch,), SIGMA)
    context = torch.randn(batch, CHUNK, SDXL_CONTEXT_DIM, generator=g)
    adm = torch.randn(batch, 2816, generator=g)
    return tuple(t.to(device) for t in (x, sigma, context, adm))


def transformer_options(model: Any, cond_or_uncond: Sequence[int], sigmas: torch.Tensor) -> dict:
    """What comfy.samplers.calc_cond_batch hands the UNet: the model's options plus the batch layout."""
    import comfy.patcher_extension

    options = comfy.patcher_extension.merge_nested_dicts({}, model.model_options.get("transformer_options", {}))
    options["cond_or_uncond"] = list(cond_or_uncond)
    options["uuids"] = [None] * len(cond_or_uncond)
    options["sigmas"] = sigmas
    return options


def unet_step(model: Any, inputs: tuple, cond_or_uncond: Sequence[int] = (0, 1)) -> torch.Tensor:
    """One UNet evaluation of the batch through BaseModel.apply_model (the sampler's call); returns denoised."""
    x, sigma, context, adm = inputs
    with torch.inference_mode():
        return model.model.apply_model(x, sigma, c_crossattn=context, y=adm,
                                       transformer_options=transformer_options(model, cond_or_uncond, sigma))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device: torch.device) -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


# ------------------------------------------------------------------------------------------------
# Counting: FLOPs on meta, attention shapes, K~/V~ projections, peak memory


def _meta_evaluation(model: Any, resolution: int, cond_or_uncond: Sequence[int]) -> Callable[[], Any]:
    """A forward of the UNet on meta. apply_model's sigma -> timestep needs values, so the UNet is called directly."""
    dm = model.model.diffusion_model
    dtype = model.model.get_dtype()
    b, side = len(cond_or_uncond), resolution // 8
    x = torch.empty(b, 4, side, side, device="meta", dtype=dtype)
    t = torch.empty(b, device="meta")
    context = torch.empty(b, CHUNK, SDXL_CONTEXT_DIM, device="meta", dtype=dtype)
    y = torch.empty(b, 2816, device="meta", dtype=dtype)
    sigmas = torch.full((b,), SIGMA)

    def run():
        with torch.no_grad():
            return dm(x, t, context=context, y=y, transformer_options=transformer_options(model, cond_or_uncond, sigmas))

    return run


def count_flops(model: Any, resolution: int) -> dict:
    """FLOPs of one conditional UNet evaluation (batch 1) on the meta device, as torch's FlopCounterMode counts them.

    One pass runs first, uncounted, so that one-off work (K~/V~ projection into the cache) is not
    in the figure. Returns {"total": flops, "by_op": {op: flops}}. The nested patch picks its
    conditional rows with nonzero(), which meta can only answer by assuming every row is selected:
    exact here, since the single row is conditional (the unconditional evaluation runs the host
    attention alone, i.e. costs what plain SDXL costs; tests/test_benchmark.py checks that).
    """
    import torch.fx.experimental._config as fx_config
    from torch.utils.flop_counter import FlopCounterMode

    run = _meta_evaluation(model, resolution, (0,))
    with sdpa_attention(), fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        run()
        with FlopCounterMode(display=False) as counter:
            run()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"total": int(counter.get_total_flops()), "by_op": by_op}


@dataclass
class AttentionCall:
    """One cross-attention layer as the UNet calls it: N queries of width `dim` in `heads` heads."""

    key: tuple
    n: int
    dim: int
    heads: int
    activations_shape: Optional[list] = None


class _ShapeRecorder:
    def __init__(self, key: tuple, calls: list, host: Callable):
        self.key, self.calls, self.host = key, calls, host

    def __call__(self, q, k, v, extra_options):
        self.calls.append(AttentionCall(self.key, q.shape[1], q.shape[2], extra_options["n_heads"],
                                        extra_options.get("activations_shape")))
        return self.host(q, k, v, extra_options["n_heads"], extra_options)

    def __deepcopy__(self, memo):
        return self


def attention_calls(meta_model: Any, resolution: int, host: Callable) -> list[AttentionCall]:
    """The cross-attention calls of one evaluation at `resolution`, in order, read off a meta forward."""
    m = meta_model.clone()
    calls: list[AttentionCall] = []
    for layer in unet_layers(m.model.diffusion_model):
        m.set_model_attn2_replace(_ShapeRecorder(layer.key, calls, host), *layer.key)
    with sdpa_attention():
        _meta_evaluation(m, resolution, (0,))()
    return calls


def nested_floor(calls: Sequence[AttentionCall], num_tokens: int) -> int:
    """DESIGN 8's floor of nested attention per conditional evaluation: 4 N M D per layer (q K~^T and P V~)."""
    return sum(4 * c.n * num_tokens * c.dim for c in calls)


def ip_adapter_floor(calls: Sequence[AttentionCall], num_tokens: int = IP_TOKENS) -> int:
    """IP-Adapter's extra work per evaluation: 4 N T_ip D per layer plus projecting K_ip, V_ip (2 x 2 T_ip C D)."""
    return sum(4 * c.n * num_tokens * c.dim + 4 * num_tokens * SDXL_CONTEXT_DIM * c.dim for c in calls)


def projection_flops(layers: Sequence[LayerSpec], num_tokens: int) -> int:
    """K~ and V~ of every layer for one subject: 2 x 2 M C D, paid once per subject."""
    return sum(4 * num_tokens * SDXL_CONTEXT_DIM * layer.dim for layer in layers)


class _LinearCounter(TorchFunctionMode):
    def __init__(self, counts: dict):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            self.counts["linear"] += 1
        return func(*args, **(kwargs or {}))


def count_projections(binding: SubjectBinding) -> dict:
    """Count the F.linear calls inside `binding.layer_kv` from now on: {"linear": n}. Read it, then zero it."""
    counts = {"linear": 0}
    original = binding.layer_kv

    def layer_kv(*args, **kwargs):
        with _LinearCounter(counts):
            return original(*args, **kwargs)

    binding.layer_kv = layer_kv  # shadows the method on this instance only
    return counts


class PeakMemory:
    """Peak memory of a stretch of work: CUDA's allocator peak on a GPU, else the process's peak RSS.

    On Linux the RSS high-water mark is reset per stretch (/proc/self/clear_refs); where that is not
    possible the figure is the process's peak so far, and `resettable` says so.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.resettable = device.type == "cuda"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.resettable = True
        except OSError:
            self.resettable = False

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def cache_bytes(binding: SubjectBinding) -> int:
    return sum(t.numel() * t.element_size() for kv in binding._kv.values() for t in kv)


# ------------------------------------------------------------------------------------------------
# The cross-attention calls alone


def layer_inputs(call: AttentionCall, batch: int, device: torch.device, dtype: torch.dtype, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, call.n, call.dim, generator=g)
    k = torch.randn(batch, CHUNK, call.dim, generator=g)
    v = torch.randn(batch, CHUNK, call.dim, generator=g)
    block, number, index = call.key
    extra = {"cond_or_uncond": [0, 1][:batch], "sigmas": torch.full((batch,), SIGMA, device=device),
             "block": (block, number), "block_index": index, "n_heads": call.heads, "dim_head": call.dim // call.heads,
             "attn_precision": None, "activations_shape": call.activations_shape}
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), extra


def time_attention_calls(calls: Sequence[AttentionCall], patches: dict[str, dict], host: Callable,
                         device: torch.device, dtype: torch.dtype, reps: int, rounds: int = 3) -> dict[str, float]:
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


def patches_by_key(model: Any) -> dict:
    return dict(model.model_options["transformer_options"]["patches_replace"]["attn2"])


# Ops that only relabel a tensor's metadata (outside autograd these reach the dispatcher decomposed).
_NO_KERNEL = {"_unsafe_view", "alias", "lift_fresh", "detach", "detach_", "resolve_conj", "resolve_neg", "set_"}


class _HostSyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts what makes the host wait for a GPU, on meta tensors (where values do not exist).

    Reading a value back (item(), float(), nonzero()) waits for every queued kernel; so does a
    blocking copy from host memory (torch.tensor(..., device=gpu), .to(gpu) of a CPU tensor without
    non_blocking), as torch synchronizes the stream after it. Read-backs get a made-up value.
    """

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []
        self.kernels: list[str] = []  # ops that compute a new device tensor: at least one kernel launch each
        self.fused = 0  # > 0 inside an op counted as one fused kernel (SDPA), whose decomposition on meta is not

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = self._dispatch(func, args, kwargs or {})
        if self.fused:
            return out
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        inputs = {id(a) for a in args if isinstance(a, torch.Tensor)}
        name = func.overloadpacket.__name__
        if func.is_view or name in _NO_KERNEL:
            return out
        in_place = func._schema.is_mutable
        if any(isinstance(o, torch.Tensor) and o.device.type != "cpu" and (in_place or id(o) not in inputs)
               for o in outputs):
            self.kernels.append(name)
        return out

    def _dispatch(self, func, args, kwargs):
        import torch.fx.experimental._config as fx_config

        aten = torch.ops.aten
        on_device = bool(args) and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu"
        if func in (aten._local_scalar_dense.default, aten.item.default) and on_device:
            self.syncs.append("read back a value (item/float/bool)")
            return True if args[0].dtype == torch.bool else 1
        if func in (aten.nonzero.default, aten.nonzero_static.default) and on_device:
            self.syncs.append("nonzero")
            with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
                return func(*args, **kwargs)
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if func.overloadpacket in (aten._to_copy, aten.to) and source is not None and source.device.type == "cpu":
            target = kwargs.get("device") or next((a for a in args[1:] if isinstance(a, torch.device)), None)
            blocking = not kwargs.get("non_blocking", func is aten.to.device and len(args) > 3 and args[3])
            if target is not None and torch.device(target).type != "cpu" and blocking:
                self.syncs.append("blocking copy from host memory (.to)")
        if func is aten.copy_.default and args[1].device.type == "cpu" and args[0].device.type != "cpu":
            if not (kwargs.get("non_blocking") or (len(args) > 2 and args[2])):
                self.syncs.append("blocking copy from host memory (copy_)")
        return func(*args, **kwargs)


class _TensorFromHostCounter(TorchFunctionMode):
    """The Python-level half of _HostSyncCounter: tensors made from host data, and SDPA as one fused kernel."""

    def __init__(self, counter: _HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None:
            if torch.device(kwargs["device"]).type != "cpu":
                self.counter.syncs.append("blocking copy from host memory (torch.tensor)")
        if func is F.scaled_dot_product_attention and not self.counter.fused:
            self.counter.kernels.append("scaled_dot_product_attention")
            self.counter.fused += 1
            try:
                return func(*args, **kwargs)
            finally:
                self.counter.fused -= 1
        return func(*args, **kwargs)


def device_work_per_call(fn: Callable) -> dict[str, list[str]]:
    """What one warm call of `fn` (on meta tensors) would cost a GPU beyond FLOPs.

    {"syncs": host-device synchronizations, "kernels": ops that launch at least one kernel}. Views,
    and conversions that return their input, launch nothing and are not counted.
    """
    counter = _HostSyncCounter()
    # no_grad, not inference_mode: there, reshape and to() reach the dispatcher whole and may or may not copy.
    with torch.no_grad(), counter, _TensorFromHostCounter(counter):
        fn()
        counter.syncs.clear()
        counter.kernels.clear()
        fn()
    return {"syncs": list(counter.syncs), "kernels": list(counter.kernels)}


def host_syncs_per_call(fn: Callable) -> list[str]:
    """The host-device synchronizations one warm call of `fn` (on meta tensors) would cost on a GPU."""
    return device_work_per_call(fn)["syncs"]


def profile_attention(call: AttentionCall, patch: Callable, device: torch.device, dtype: torch.dtype,
                      rows: int = 18) -> str:
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


# ------------------------------------------------------------------------------------------------
# Encoding one subject


def clip_vision_h(device: torch.device, seed: int = 0):
    """comfy.clip_vision.ClipVisionModel with ComfyUI's ViT-H/14 config (clip_vision_config_h.json), random weights."""
    import comfy.clip_vision

    config = Path(comfy.clip_vision.__file__).with_name("clip_vision_config_h.json")
    clip_vision = comfy.clip_vision.ClipVisionModel(str(config))
    fill_parameters_(clip_vision.model, seed)
    return clip_vision


def benchmark_encoding(clip_vision: Any, encoders: dict[int, NestedEncoder], device: torch.device,
                       dtype: torch.dtype, reps: int = 2) -> tuple[dict, dict[int, torch.Tensor]]:
    """Seconds to encode one subject: CLIP (one 512x512 image), Q-Former, all layers' K~/V~; best of `reps` runs.

    Each piece runs once untimed first on a GPU (kernel selection, lazy loading); the CPU has no
    such one-off beyond ComfyUI loading CLIP, which the untimed first CLIP call pays.
    Returns (figures, {M: subject tokens (1, M, 2048)}).
    """
    warm = device.type == "cuda"
    image = torch.rand(1, 512, 512, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        clip_vision.encode_image(image)
        clip_s = min(timed(lambda: clip_vision.encode_image(image)["last_hidden_state"], device)[0]
                     for _ in range(reps))
        hidden = clip_vision.encode_image(image)["last_hidden_state"].to(device, dtype)  # (1, 257, 1280)
    figures = {"clip_vision_s": clip_s, "clip_vision_dtype": str(getattr(clip_vision, "dtype", "")),
               "clip_tokens": list(hidden.shape), "reps": reps, "by_num_tokens": {}}
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
            "qformer_s": qformer_s, "kv_projection_s": kv_s, "total_s": clip_s + qformer_s + kv_s,
            "kv_cache_bytes": cache_bytes(binding), "kv_projection_flops": projection_flops(encoder.layers, m),
        }
    return figures, tokens_by_m


# ------------------------------------------------------------------------------------------------
# Trainer throughput


def measure_trainer_steps(run_steps: Callable[[], None], unet_model: Any, encoder_cls: type,
                          device: torch.device) -> dict:
    """Time the training steps `run_steps` performs; split off the frozen UNet's forward and backward.

    Hooks, no change to the trainer: BaseModel.apply_model is timed for the UNet forward (nested
    patches included); a gradient hook on its output marks the start of the UNet's backward and one
    on the subject tokens (NestedEncoder.encode's output, whose gradient is complete when the
    backward leaves the UNet) marks its end. Steps are the intervals between backward ends.
    Returns per-step lists of seconds.
    """
    marks: dict[str, list] = {"fwd": [], "bwd_start": [], "bwd_end": []}
    original_apply = unet_model.apply_model
    original_encode = encoder_cls.encode

    def stamp(name):
        def hook(grad):
            synchronize(device)
            marks[name].append(time.perf_counter())
            return grad
        return hook

    def apply_model(self, *args, **kwargs):
        synchronize(device)
        start = time.perf_counter()
        out = original_apply(self, *args, **kwargs)
        synchronize(device)
        marks["fwd"].append(time.perf_counter() - start)
        if out.requires_grad:
            out.register_hook(stamp("bwd_start"))
        return out

    def encode(self, clip_tokens):
        tokens = original_encode(self, clip_tokens)
        if tokens.requires_grad:
            tokens.register_hook(stamp("bwd_end"))
        return tokens

    with _class_attribute(unet_model, "apply_model", apply_model), _class_attribute(encoder_cls, "encode", encode):
        run_steps()
    ends = marks["bwd_end"]
    steps = [b - a for a, b in zip(ends, ends[1:])]
    unet = [f + (e - s) for f, s, e in zip(marks["fwd"][1:], marks["bwd_start"][1:], ends[1:])]
    return {"step_s": steps, "unet_s": unet}


@contextlib.contextmanager
def _class_attribute(cls: type, name: str, value: Any):
    """Set a class attribute for a while; restore exactly what the class itself held (maybe nothing)."""
    missing = object()
    saved = cls.__dict__.get(name, missing)
    setattr(cls, name, value)
    try:
        yield
    finally:
        if saved is missing:
            delattr(cls, name)
        else:
            setattr(cls, name, saved)


def summarize_trainer(raw: dict, batch_size: int, warmup: int, **extra) -> dict:
    steps, unet = raw["step_s"][warmup:], raw["unet_s"][warmup:]
    if not steps:
        raise RuntimeError(f"the trainer ran too few steps to time (got {len(raw['step_s'])} intervals)")
    step = statistics.median(steps)
    unet_s = statistics.median(unet)
    return {"batch_size": batch_size, "steps_timed": len(steps), "step_s": step, "images_per_s": batch_size / step,
            "unet_fwd_bwd_s": unet_s, "outside_unet_share": max(0.0, 1.0 - unet_s / step), **extra}


def tiny_trainer_child(out_json: str, steps: int, warmup: int) -> None:
    """Run `training.run` with the tiny preset for warmup + steps + 1 steps and write its timing to `out_json`."""
    import comfy.model_base

    from . import run as run_lib

    with tempfile.TemporaryDirectory(prefix="nested-bench-") as tmp:
        total = warmup + steps + 1
        args = run_lib.parse_args(["--domain", "tiny", "--output_dir", tmp, "--max_train_steps", str(total),
                                   "--checkpointing_steps", str(10 * total), "--validation_steps", "0",
                                   "--report_to", "none", "--dataloader_num_workers", "0"])
        raw = measure_trainer_steps(lambda: run_lib.main(args), comfy.model_base.BaseModel, NestedEncoder,
                                    torch.device("cpu"))
        result = summarize_trainer(raw, args.train_batch_size, warmup, preset="tiny", device="cpu",
                                   resolution=args.resolution, num_tokens=args.num_tokens,
                                   mixed_precision=args.mixed_precision,
                                   what="python -m training.run --domain tiny: data, text, VAE, CLIP, Q-Former, "
                                        "UNet, optimizer")
    Path(out_json).write_text(json.dumps(result))


def tiny_trainer_throughput(steps: int = 8, warmup: int = 2) -> dict:
    """The tiny preset's throughput on the CPU, from a child process (its own accelerate state, no GPU)."""
    with tempfile.TemporaryDirectory(prefix="nested-bench-") as tmp:
        out = Path(tmp) / "trainer.json"
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        cmd = [sys.executable, "-m", "training.benchmark", "--trainer-child", str(out), "--steps", str(steps),
               "--trainer-warmup", str(warmup)]
        proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"the tiny trainer run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def synthetic_trainer_throughput(model: Any, encoder: NestedEncoder, resolution: int, batch_size: int, steps: int,
                                 warmup: int, device: torch.device, autocast: Optional[torch.dtype],
                                 checkpointing: bool = True) -> dict:
    """The trainer's step on a given UNet with a synthetic batch (cached latents and CLIP tokens, no data pipeline).

    The trainer's own module (`NestedTrainingModule`: Q-Former, patches on every layer, ComfyUI's
    apply_model), epsilon MSE, backward, AdamW on the encoder; the UNet's blocks checkpointed as the
    trainer does. `encoder` is trained in float32 (a copy is not made: it is changed).
    """
    from .models import NestedTrainingModule, enable_gradient_checkpointing

    base = model.model
    if checkpointing:
        enable_gradient_checkpointing(base.diffusion_model)
    encoder.float().train().requires_grad_(True)
    module = NestedTrainingModule(encoder, base)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    side = resolution // 8
    clip_dim = encoder.config.qformer.clip_dim
    batch = {
        "clip_tokens": torch.randn(batch_size, 257, clip_dim, generator=g),
        "x": torch.randn(batch_size, 4, side, side, generator=g),
        "noise": torch.randn(batch_size, 4, side, side, generator=g),
        "sigmas": torch.rand(batch_size, generator=g) * 10 + 0.1,
        "context": torch.randn(batch_size, CHUNK, SDXL_CONTEXT_DIM, generator=g),
        "adm": torch.randn(batch_size, 2816, generator=g),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    groups = [((SUBJECT_POSITION,), torch.ones(batch_size, dtype=torch.bool, device=device))]

    def run_steps():
        for _ in range(warmup + steps + 1):
            ctx = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
            with ctx:
                eps = module(batch["clip_tokens"], batch["x"], batch["sigmas"], batch["context"], batch["adm"], groups)
                loss = (eps.float() - batch["noise"]).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    raw = measure_trainer_steps(run_steps, type(base), NestedEncoder, device)
    return summarize_trainer(raw, batch_size, warmup, device=device.type, resolution=resolution,
                             num_tokens=encoder.config.num_tokens, autocast=str(autocast) if autocast else "no",
                             gradient_checkpointing=checkpointing,
                             what="NestedTrainingModule step, synthetic cached batch: Q-Former, UNet, AdamW")


# ------------------------------------------------------------------------------------------------
# The run


@dataclass
class Variant:
    name: str
    model: Any
    rows: int  # UNet rows per CFG step that carry the injection: 0 plain, 1 nested (cond only), 2 IP-Adapter
    num_tokens: int = 0
    binding: Optional[SubjectBinding] = None
    projections: Optional[dict] = None
    first_s: float = 0.0
    step_s: list = field(default_factory=list)
    peak_bytes: int = 0
    projections_first: int = 0
    projections_later: int = 0
    finite: bool = True


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
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
    import comfy.ldm.modules.attention

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    host = host_attention()
    started = time.perf_counter()
    result: dict = {"machine": machine_info(device), "config": {
        "device": device.type, "dtype": args.dtype, "resolution": args.resolution, "steps": args.steps,
        "batch": "cond + uncond (CFG), 2 rows", "host_attention": comfy.ldm.modules.attention.optimized_attention.__name__,
        "num_tokens": list(NUM_QUERIES), "ip_tokens": IP_TOKENS, "tiny_models": args.tiny}}

    # FLOPs and attention shapes on meta: free, and at 1024 whatever the run's resolution.
    log.info("%s counting FLOPs on the meta device", PREFIX)
    unet_config = sdxl_unet_config(tiny=args.tiny)
    qformer = tiny_qformer() if args.tiny else QFormerConfig()
    meta = build_unet(unet_config, torch.device("meta"), dtype)
    layers = unet_layers(meta.model.diffusion_model)
    meta_encoders = {m: build_encoder(m, layers, torch.device("meta"), dtype, qformer=qformer) for m in NUM_QUERIES}
    meta_tokens = {m: torch.empty(1, m, SDXL_CONTEXT_DIM, device="meta", dtype=dtype) for m in NUM_QUERIES}
    meta_variants = {f"nested M={m}": with_nested(meta, subject_binding(meta_encoders[m], meta_tokens[m]), layers, host)
                     for m in NUM_QUERIES}
    meta_variants[f"IP-Adapter {IP_TOKENS} tokens"] = with_ip_adapter(meta, layers, host, torch.device("meta"), dtype)
    flops: dict = {}
    for res in sorted({args.resolution, 1024}):
        calls = attention_calls(meta, res, host)
        plain = count_flops(meta, res)["total"]
        entry = {"plain_cond_eval": plain, "attention_calls": len(calls), "variants": {}}
        for name, variant in meta_variants.items():
            m = int(name.split("=")[1]) if name.startswith("nested") else IP_TOKENS
            floor = nested_floor(calls, m) if name.startswith("nested") else ip_adapter_floor(calls)
            entry["variants"][name] = {"floor": floor, "counted": count_flops(variant, res)["total"] - plain,
                                       "rows": 1 if name.startswith("nested") else 2}
        flops[res] = entry
    result["flops"] = {str(k): v for k, v in flops.items()}
    calls = attention_calls(meta, args.resolution, host)
    widest = max(calls, key=lambda c: c.n * c.dim)

    # What would make the host wait for a GPU in one attn2 call (sigmas live on the GPU, as in sampling).
    q, k, vv, extra = layer_inputs(widest, 2, torch.device("meta"), dtype, seed=0)
    with sdpa_attention():
        gpu_work = {"host": device_work_per_call(lambda: host(q, k, vv, widest.heads, extra))}
        for name, variant in meta_variants.items():
            patch = patches_by_key(variant)[widest.key]
            gpu_work[name] = device_work_per_call(lambda: patch(q, k, vv, extra))
    del meta, meta_encoders, meta_variants

    # The real models.
    log.info("%s building SDXL (random weights) on %s in %s", PREFIX, device, args.dtype)
    model = build_unet(unet_config, device, dtype)
    result["unet_parameters"] = sum(p.numel() for p in model.model.diffusion_model.parameters())
    first = build_encoder(NUM_QUERIES[0], layers, device, dtype, seed=1, qformer=qformer)
    encoders = {NUM_QUERIES[0]: first}
    for m in NUM_QUERIES[1:]:
        encoders[m] = build_encoder(m, layers, device, dtype, seed=1, qformer=qformer, projections=first.projections)

    log.info("%s encoding one subject", PREFIX)
    if args.tiny:
        from .tiny import tiny_clip_vision

        clip_vision = tiny_clip_vision(seed=0, hidden=qformer.clip_dim)
    else:
        clip_vision = clip_vision_h(device)
    result["encode"], tokens = benchmark_encoding(clip_vision, encoders, device, dtype,
                                                   reps=3 if device.type == "cuda" else 1)
    del clip_vision
    gc.collect()

    variants = [Variant("plain SDXL", model, rows=0)]
    for m in NUM_QUERIES:
        binding = subject_binding(encoders[m], tokens[m], name=f"benchmark M={m}")
        variant = Variant(f"nested M={m}", with_nested(model, binding, layers, host), rows=1, num_tokens=m,
                          binding=binding)
        variant.projections = count_projections(binding)
        variants.append(variant)
    variants.append(Variant(f"IP-Adapter {IP_TOKENS} tokens", with_ip_adapter(model, layers, host, device, dtype),
                            rows=2, num_tokens=IP_TOKENS))

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
    profile = None
    if args.profile:
        profile = profile_attention(widest, patch_sets[f"nested M={NUM_QUERIES[-1]}"][widest.key], device, dtype)

    # The fastest timed step: other load on the machine only ever slows a step down.
    plain = min(variants[0].step_s)
    plain_eval_flops = flops[args.resolution]["plain_cond_eval"]
    rows = []
    for v in variants:
        step = min(v.step_s)
        row = {"name": v.name, "rows": v.rows, "num_tokens": v.num_tokens, "first_step_s": v.first_s,
               "step_s": v.step_s, "step_best_s": step, "step_median_s": statistics.median(v.step_s),
               "peak_memory_bytes": v.peak_bytes,
               "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else
               ("peak RSS of the step" if memory.resettable else "process peak RSS so far"),
               "output_finite": v.finite}
        if v.rows:
            extra_s = step - plain
            fl = flops[args.resolution]["variants"][v.name]
            row.update({
                "overhead_step": extra_s / plain,
                # Per evaluation that carries the injection: nested only in the cond half, IP-Adapter in both.
                "overhead_eval": (extra_s / v.rows) / (plain / 2),
                "attention_s": attention[v.name], "attention_host_s": attention["host"],
                "attention_overhead_eval": ((attention[v.name] - attention["host"]) / v.rows) / (plain / 2),
                "floor_eval": fl["floor"] / plain_eval_flops, "counted_eval": fl["counted"] / plain_eval_flops,
            })
            row["ratio_to_floor"] = row["overhead_eval"] / row["floor_eval"]
            row["attention_ratio_to_floor"] = row["attention_overhead_eval"] / row["floor_eval"]
        if v.binding is not None:
            row["kv_projections_first_step"] = v.projections_first
            row["kv_projections_per_later_step"] = v.projections_later / max(1, args.steps)
            row["kv_cache_bytes"] = cache_bytes(v.binding)
        rows.append(row)
    result["variants"] = rows
    result["attention_calls"] = {"host_s": attention["host"], "reps": args.attention_reps, "count": len(calls),
                                 "widest_layer": list(widest.key), "gpu_work_per_call": gpu_work}
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
            encoder = build_encoder(NUM_QUERIES[0], layers, device, torch.float32, seed=1, qformer=qformer)
            result["trainer"]["sdxl_gpu"] = synthetic_trainer_throughput(
                model, encoder, args.resolution, args.trainer_batch_size, args.trainer_steps, 1, device,
                autocast=dtype)
    result["wall_s"] = time.perf_counter() - started
    return result


# ------------------------------------------------------------------------------------------------
# Output


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
        f"Python {machine['python']}" + (f"; load average at start {machine['load_average'][0]:.2f}"
                                        if "load_average" in machine else ""),
        "",
        "Per sampling step (one UNet evaluation of cond + uncond, batch 2); overheads vs plain, best of "
        f"{cfg['steps']} timed steps after a first one:",
    ]
    head = (f"{'variant':<22}{'first s':>9}{'step s':>9}{'+step':>9}{'+eval':>9}{'floor':>9}{'ratio':>7}"
            f"{'attn +eval':>11}{'ratio':>7}{'FLOP +eval':>11}{'peak GB':>9}")
    lines += [head, "-" * len(head)]
    for r in result["variants"]:
        line = f"{r['name']:<22}{r['first_step_s']:>9.2f}{r['step_best_s']:>9.2f}"
        if r["rows"]:
            line += (f"{_pct(r['overhead_step']):>9}{_pct(r['overhead_eval']):>9}{_pct(r['floor_eval']):>9}"
                     f"{r['ratio_to_floor']:>7.2f}{_pct(r['attention_overhead_eval']):>11}"
                     f"{r['attention_ratio_to_floor']:>7.2f}{_pct(r['counted_eval']):>11}")
        else:
            line += " " * 73
        line += f"{r['peak_memory_bytes'] / 1e9:>9.2f}"
        lines.append(line)
    lines += [
        "  +step: extra time per step. +eval: extra time per UNet evaluation that carries the injection (nested: the",
        "  cond half only; IP-Adapter: both halves), over plain/2. floor: DESIGN 8's 4*N*M*D per layer over one plain",
        "  evaluation's FLOPs (IP-Adapter: 4*N*16*D + its per-call K/V projection). ratio: +eval / floor (target on a",
        "  GPU: <= 1.5). attn +eval: the same from the 70 attn2 calls timed alone (host vs patch, less noisy).",
        "  FLOP +eval: the extra FLOPs torch's counter sees per evaluation. peak: "
        + result["variants"][0]["peak_memory_kind"] + ".",
    ]
    for r in result["variants"]:
        if "kv_projections_first_step" in r:
            lines.append(f"  {r['name']}: K~/V~ projections in the first step {r['kv_projections_first_step']}, "
                         f"per step after the first: {r['kv_projections_per_later_step']:g}; "
                         f"cache {r['kv_cache_bytes'] / 1e6:.0f} MB")
    ac = result["attention_calls"]
    work = ac["gpu_work_per_call"]
    layer = "/".join(map(str, ac["widest_layer"]))
    lines.append(f"  per attn2 call ({layer}, batch 2, counted on meta), GPU kernel launches: "
                 + ", ".join(f"{k} {len(v['kernels'])}" for k, v in work.items()))
    lines.append("  ... and host-GPU syncs (each drains the GPU's queue): "
                 + ", ".join(f"{k} {len(v['syncs'])}" for k, v in work.items()))

    lines += ["", "FLOPs per conditional UNet evaluation (torch FlopCounterMode, meta device):"]
    head = f"{'resolution':<12}{'plain TFLOP':>12}" + "".join(f"{name + ' floor / counted':>42}"
                                                          for name in next(iter(result['flops'].values()))['variants'])
    lines += [head, "-" * len(head)]
    for r, entry in result["flops"].items():
        plain = entry["plain_cond_eval"]
        line = f"{r + 'x' + r:<12}{plain / 1e12:>12.3f}"
        for v in entry["variants"].values():
            cell = (f"+{v['floor'] / 1e12:.3f} ({_pct(v['floor'] / plain)}) / "
                    f"+{v['counted'] / 1e12:.3f} ({_pct(v['counted'] / plain)})")
            line += f"{cell:>42}"
        lines.append(line)
    lines.append(f"  {entry['attention_calls']} cross-attention calls per evaluation. DESIGN 8: 6.76 TFLOP plain at 1024; "
                 "floors 1.6 % (M=256) and 6.4 % (M=1024) per conditional evaluation, half that per CFG step.")

    enc = result["encode"]
    lines += ["", f"Encoding one subject (best of {enc['reps']}): CLIP ViT-H/14 {enc['clip_vision_s']:.3f} s "
                  f"(weights {enc['clip_vision_dtype']})"]
    for m, e in enc["by_num_tokens"].items():
        lines.append(f"  M={m}: Q-Former {e['qformer_s']:.3f} s, K~/V~ of all layers {e['kv_projection_s']:.3f} s "
                     f"({e['kv_projection_flops'] / 1e9:.0f} GFLOP), total {e['total_s']:.3f} s; "
                     f"K~/V~ cache {e['kv_cache_bytes'] / 1e6:.0f} MB ({cfg['dtype']})")

    trainer = result.get("trainer") or {}
    if trainer:
        lines += ["", "Trainer throughput (median step after warm-up):"]
        for name, t in trainer.items():
            lines.append(f"  {name}: {t['images_per_s']:.2f} images/s (batch {t['batch_size']}, "
                         f"{t['resolution']}x{t['resolution']}, M={t['num_tokens']}, step {t['step_s']:.3f} s); "
                         f"outside the frozen UNet's forward+backward: {_pct(t['outside_unet_share'])}  [{t['what']}]")
    lines += ["", f"Wall time {result['wall_s']:.0f} s."]
    if "profile" in result:
        lines += ["", "Profile of one nested attn2 call (widest layer, batch 2, 3 calls):", result["profile"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# CLI


def parse_args(args: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training.benchmark",
        description="Measure nested attention's cost per SDXL sampling step next to plain SDXL and an IP-Adapter-style "
                    "injection, with FLOP floors, encoding time, memory and the trainer's throughput.")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="Where to run: 'auto' takes the GPU when torch sees one, else the CPU.")
    p.add_argument("--resolution", type=int, default=None,
                   help="Image side in pixels, a multiple of 64 (default: 512 on the CPU, 1024 on a GPU).")
    p.add_argument("--steps", type=int, default=None,
                   help="Timed UNet evaluations (CFG steps) per variant after one warm-up step each (default: 3 on "
                        "the CPU, where one full SDXL step at 512 takes 10 to 20 s on two cores; 10 on a GPU).")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="Weights and activations of the UNet and the encoder (default: fp32 on the CPU, fp16 on a GPU).")
    p.add_argument("--json", default=str(DEFAULT_JSON),
                   help=f"Where to write the results as JSON (default: {DEFAULT_JSON.relative_to(REPO)}).")
    p.add_argument("--attention-reps", type=int, default=None,
                   help="Back-to-back calls per timed block when timing the 70 cross-attention calls alone; each "
                        "layer is timed in 3 interleaved rounds (default: 1 on the CPU, 20 on a GPU).")
    p.add_argument("--skip-trainer", action="store_true",
                   help="Do not measure the trainer's throughput (tiny preset on the CPU; SDXL on a GPU).")
    p.add_argument("--trainer-steps", type=int, default=8,
                   help="Timed training steps for each trainer figure, after warm-up.")
    p.add_argument("--trainer-batch-size", type=int, default=1,
                   help="Batch size of the SDXL trainer figure on a GPU.")
    p.add_argument("--profile", action="store_true",
                   help="Also print torch.profiler's operator table for one nested attn2 call (M=1024, widest layer).")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke run on tiny models (tests)
    p.add_argument("--trainer-child", default=None, help=argparse.SUPPRESS)  # internal: the tiny trainer's process
    p.add_argument("--trainer-warmup", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args(args)

    if args.trainer_child:
        return args
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
        p.error(f"--resolution {args.resolution}: expected a positive multiple of 64 (SDXL's latent is 1/8 of it "
                "and the UNet halves that twice).")
    if args.steps < 1 or args.attention_reps < 1 or args.trainer_steps < 1 or args.trainer_batch_size < 1:
        p.error("--steps, --attention-reps, --trainer-steps and --trainer-batch-size must be at least 1.")
    if args.dtype == "fp16" and not gpu:
        p.error("--dtype fp16 on the CPU: ComfyUI computes float16 weights in float32 there; use fp32 or bf16.")
    return args


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    if args.trainer_child:
        from .comfy_env import setup_comfy

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


if __name__ == "__main__":
    main(parse_args())
