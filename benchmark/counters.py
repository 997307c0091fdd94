"""Counting without timing: FLOPs and attention shapes on the meta device, K~/V~ projections, device syncs
and kernel launches per attn2 call, the K~/V~ cache's size, peak memory.
"""

from __future__ import annotations

import resource
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._python_dispatch
from torch.overrides import TorchFunctionMode

from nested_attention import SDXL_CONTEXT_DIM, LayerSpec, unet_layers
from nested_attention.patch import SubjectBinding

from .workload import CHUNK, IP_TOKENS, SIGMA, _meta_evaluation, comfy_sdpa_attention


def count_flops(model: Any, resolution: int, one_off_work: bool = True) -> dict:
    """FLOPs of one conditional UNet evaluation (batch 1) on the meta device, as torch's FlopCounterMode counts them.

    With `one_off_work` (a model with patches that cache), one pass runs first, uncounted, so that one-off work
    (K~/V~ projection into the cache) is not in the figure; plain SDXL has none and is counted at once. Returns
    {"total": flops, "by_op": {op: flops}}. The nested patch picks its conditional rows with nonzero(), which
    meta can only answer by assuming every row is selected: exact here, since the single row is conditional (the
    unconditional evaluation runs the host attention alone, i.e. costs what plain SDXL costs;
    tests/test_benchmark.py checks that).
    """
    import torch.fx.experimental._config as fx_config
    from torch.utils.flop_counter import FlopCounterMode

    run = _meta_evaluation(model, resolution, (0,))
    with comfy_sdpa_attention(), fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        if one_off_work:
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
    activations_shape: list | None = None


class _ShapeRecorder:
    def __init__(self, key: tuple, calls: list, host: Callable):
        self.key, self.calls, self.host = key, calls, host

    def __call__(self, q, k, v, extra_options):
        self.calls.append(
            AttentionCall(
                self.key,
                q.shape[1],
                q.shape[2],
                extra_options["n_heads"],
                extra_options.get("activations_shape"),
            )
        )
        return self.host(q, k, v, extra_options["n_heads"], extra_options)

    def __deepcopy__(self, memo):
        return self


def layer_inputs(
    call: AttentionCall, batch: int, device: torch.device, dtype: torch.dtype, seed: int
) -> tuple:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, call.n, call.dim, generator=g)
    k = torch.randn(batch, CHUNK, call.dim, generator=g)
    v = torch.randn(batch, CHUNK, call.dim, generator=g)
    block, number, index = call.key
    extra = {
        "cond_or_uncond": [0, 1][:batch],
        "sigmas": torch.full((batch,), SIGMA, device=device),
        "block": (block, number),
        "block_index": index,
        "n_heads": call.heads,
        "dim_head": call.dim // call.heads,
        "attn_precision": None,
        "activations_shape": call.activations_shape,
    }
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), extra


def attention_calls(meta_model: Any, resolution: int, host: Callable) -> list[AttentionCall]:
    """The cross-attention calls of one evaluation at `resolution`, in order, read off a meta forward."""
    m = meta_model.clone()
    calls: list[AttentionCall] = []
    for layer in unet_layers(m.model.diffusion_model):
        m.set_model_attn2_replace(_ShapeRecorder(layer.key, calls, host), *layer.key)
    with comfy_sdpa_attention():
        _meta_evaluation(m, resolution, (0,))()
    return calls


def nested_floor(calls: Sequence[AttentionCall], num_tokens: int) -> int:
    """Nested attention's floor per conditional evaluation: 4 N M D per layer (q K~^T and P V~).

    See docs/ARCHITECTURE.md, Performance model.
    """
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


def cache_bytes(binding: SubjectBinding) -> int:
    return sum(t.numel() * t.element_size() for kv in binding._kv.values() for t in kv)


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


# Ops that only relabel a tensor's metadata (outside autograd these reach the dispatcher decomposed), and
# allocations, which launch nothing.
_NO_KERNEL = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "_unsafe_view",
    "alias",
    "lift_fresh",
    "detach",
    "detach_",
    "resolve_conj",
    "resolve_neg",
    "set_",
}


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
        self.fused = (
            0  # > 0 inside an op counted as one fused kernel (SDPA), whose decomposition on meta is not
        )
        # Device memory: bytes of the storages made since the last reset that are still alive, and their peak.
        self.live_bytes = 0
        self.peak_bytes = 0
        self._known: weakref.WeakSet = weakref.WeakSet()  # storages seen (made here or before)

    def reset_memory(self) -> None:
        self.live_bytes = self.peak_bytes = 0

    def account(self, args, outputs) -> None:
        """Count the device storages among `outputs` that are new (not among `args` or seen before)."""
        for a in args:
            if isinstance(a, torch.Tensor) and a.device.type != "cpu":
                self._known.add(a.untyped_storage())
        for o in outputs:
            if not isinstance(o, torch.Tensor) or o.device.type == "cpu":
                continue
            storage = o.untyped_storage()
            if storage in self._known:
                continue
            self._known.add(storage)
            size = storage.nbytes()
            self.live_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live_bytes -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = self._dispatch(func, args, kwargs or {})
        if self.fused:
            return out
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        self.account([*args, *(kwargs or {}).values()], outputs)
        inputs = {id(a) for a in args if isinstance(a, torch.Tensor)}
        name = func.overloadpacket.__name__
        if func.is_view or name in _NO_KERNEL:
            return out
        in_place = func._schema.is_mutable
        if any(
            isinstance(o, torch.Tensor) and o.device.type != "cpu" and (in_place or id(o) not in inputs)
            for o in outputs
        ):
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
        if (
            func.overloadpacket in (aten._to_copy, aten.to)
            and source is not None
            and source.device.type == "cpu"
        ):
            target = kwargs.get("device") or next((a for a in args[1:] if isinstance(a, torch.device)), None)
            blocking = not kwargs.get("non_blocking", func is aten.to.device and len(args) > 3 and args[3])
            if target is not None and torch.device(target).type != "cpu" and blocking:
                self.syncs.append("blocking copy from host memory (.to)")
        if (func is aten.copy_.default and args[1].device.type == "cpu" and args[0].device.type != "cpu"
                and not (kwargs.get("non_blocking") or (len(args) > 2 and args[2]))):
            self.syncs.append("blocking copy from host memory (copy_)")
        return func(*args, **kwargs)


class _TensorFromHostCounter(TorchFunctionMode):
    """The Python-level half of _HostSyncCounter: tensors made from host data, and SDPA as one fused kernel."""

    def __init__(self, counter: _HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None
                and torch.device(kwargs["device"]).type != "cpu"):
            self.counter.syncs.append("blocking copy from host memory (torch.tensor)")
        if func is F.scaled_dot_product_attention and not self.counter.fused:
            self.counter.kernels.append("scaled_dot_product_attention")
            self.counter.fused += 1
            try:
                out = func(*args, **kwargs)
                # The fused kernels (CPU flash, CUDA flash and memory-efficient) write (B, N, h, d) and return
                # it as (B, h, N, d); meta's decomposition writes (B, h, N, d), whose reshape back to
                # (B, N, h d) would count a copy that never runs.
                out = out.transpose(1, 2).contiguous().transpose(1, 2) if out.dim() == 4 else out
            finally:
                self.counter.fused -= 1
            self.counter.account(args, [out])  # its output only: a fused kernel keeps no (N x T) matrix
            return out
        return func(*args, **kwargs)


def device_work_per_call(fn: Callable) -> dict:
    """What one warm call of `fn` (on meta tensors) would cost a GPU beyond FLOPs.

    {"syncs": device syncs (waits for the GPU), "kernels": ops that launch at least one kernel,
    "peak_bytes": the most device memory the call's own tensors hold at once}. Views, and conversions
    that return their input, launch nothing and are not counted; allocations are not launches. The
    memory counts every tensor an op returns (the call's output included) while it is alive, and for
    an SDPA only its output (the fused kernels' small workspaces are not seen).
    """
    counter = _HostSyncCounter()
    # no_grad, not inference_mode: there, reshape and to() reach the dispatcher whole and may or may not copy.
    with torch.no_grad(), counter, _TensorFromHostCounter(counter):
        fn()
        counter.syncs.clear()
        counter.kernels.clear()
        counter.reset_memory()
        out = fn()  # noqa: F841 (held until counted: the output is part of the call's memory)
    return {"syncs": list(counter.syncs), "kernels": list(counter.kernels), "peak_bytes": counter.peak_bytes}


def device_syncs_per_call(fn: Callable) -> list[str]:
    """The device syncs (waits for the GPU) one warm call of `fn` (on meta tensors) would cost on a GPU."""
    return device_work_per_call(fn)["syncs"]
