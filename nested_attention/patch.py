"""The attn2 replacement patch: ComfyUI's `patch(q, k, v, extra_options) -> out` contract, for nested attention.

One `NestedAttentionPatch` per cross-attention layer key holds the list of subjects bound to that
model. ComfyUI up to 0.13 deep-copies model options on every `clone()`, so the patch copies only that
small list; encoders, subject tokens and K~/V~ caches are shared. From 0.14 on, `clone()` shares patch
objects by reference between a clone and its parent, so a patch is never changed once made: adding a
subject makes a new patch (`with_subjects`). What the patch does change in place, the caches of a
`SubjectBinding`, is derived data keyed by what it was made for, guarded by a lock: ComfyUI (0.23 on) may
call `.to(device)` on a patch shared by several models from worker threads, one per GPU.
The nodes and the trainer install this same class, so what is trained is what runs. No ComfyUI import:
the host's plain attention is passed in (ComfyUI's `optimized_attention`), which keeps rows without a
subject bit-identical.

Another pack's attn2 patch on the same layer (IPAdapter_plus, InstantID, PuLID: called `(q, k, v,
extra_options)`, they return the plain attention PV plus their own term X, which has its own softmax) is
wrapped, never changed: it computes the base and the nested terms are added to it, keeping X as it is at
every lambda (docs/ARCHITECTURE.md §3, "On top of another pack's patch"). Those packs add themselves to
whatever object holds a layer with `.add(...)`; ours refuses with `NestedOrderError`, since it never
changes once set.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .attention import NestedSubject, check_positions, nested_attention, sdpa_attention
from .capture import RUN_KEY, layer_grid
from .encoder import NestedEncoder
from .layers import LayerSpec

HostAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, dict], torch.Tensor]
_HOST = torch.device("cpu")


class NestedAttentionError(RuntimeError):
    """Raised inside sampling when the conditioning does not match what a subject was bound to."""


class NestedOrderError(ValueError):
    """Another pack's node tried to add itself to a nested attention patch (it must come before Apply)."""


def plain_host_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, extra_options: dict) -> torch.Tensor:
    return sdpa_attention(q, k, v, heads)


@dataclass(eq=False)
class SubjectBinding:
    """One subject bound to one prompt on one model: everything a layer needs to build its NestedSubject.

    tokens: subject tokens E, (1, M*n, C) for inference or (B, M, C) per batch row for training.
    positions: the subject word's token positions in the prompt (chunks of 77 concatenated).
    prompt_tokens: length of the prompt's token sequence (77 * chunks), to follow ComfyUI's repetition.
    lam, alpha: as in NestedSubject (lambda; the norm factor, None = the encoder's config.alpha).
    sigma_start / sigma_end: active while sigma_end <= sigma <= sigma_start (from start/end percent).
    mask: optional (H, W) region in [0, 1] in latent-image proportions; resized to each layer.
    rows: optional bool (B,) of batch rows that get the subject (training's subject dropout).
    cache: whether K~/V~ are kept per (layer, device, dtype); off when tokens carry gradients.
    auto_region: the region is found during sampling from the word's own attention (`region: auto`,
        nested_attention.capture); needs the per-run state of `host.add_auto_regions` (which
        `host.install_subject` adds). Never with a mask.
    source: what the binding was made from (the nodes' Subject), opaque here; kept so that the attention
        maps can be drawn on the subject's photos.

    One binding is shared by every model it was applied to (a chained model and its parent), possibly
    sampling on different GPUs at once. Its caches only ever hold values computed from the fields above
    for their key, so any model may read them; entries are added and dropped under `_lock`, and readers
    take an entry with one `dict.get`, so a drop from another thread costs a recomputation, never an error.
    """

    encoder: NestedEncoder
    tokens: torch.Tensor
    positions: tuple[int, ...]
    prompt_tokens: int
    lam: float = 1.0
    alpha: float | None = None
    sigma_start: float = math.inf
    sigma_end: float = 0.0
    mask: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    cache: bool = True
    name: str = "subject"
    auto_region: bool = False
    source: Any = field(default=None, repr=False)
    _kv: dict = field(default_factory=dict, repr=False)
    _masks: dict = field(default_factory=dict, repr=False)
    _positions: dict = field(default_factory=dict, repr=False)
    _sigma: tuple = field(default=(None, None, 0.0), repr=False)  # (sigmas tensor, its version, its max)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        check_positions(self.positions)
        outside = [p for p in self.positions if not 0 <= p < self.prompt_tokens]
        if outside:  # would also collide with the repeats that context_positions adds
            raise ValueError(
                f"subject positions {outside} lie outside the prompt's {self.prompt_tokens} tokens; locate the "
                "word in the same tokenized prompt whose length is given.")
        if self.auto_region and self.mask is not None:
            raise ValueError(f"'{self.name}' has both a mask and region auto; give one or the other.")

    @property
    def sort_key(self) -> tuple:
        return (self.positions, self.name)

    def active(self, sigmas: torch.Tensor | None) -> bool:
        if sigmas is None or (self.sigma_start == math.inf and self.sigma_end <= 0.0):
            return True
        return self.sigma_end <= self.current_sigma(sigmas) <= self.sigma_start

    def current_sigma(self, sigmas: torch.Tensor) -> float:
        """max(sigmas) as a float, read back once per model evaluation instead of once per layer.

        ComfyUI hands the same `sigmas` tensor to every attn2 call of one evaluation, and reading a
        GPU value waits for the GPU; so the value is kept for that tensor object (and its version,
        where the tensor has one: inference tensors do not).
        """
        seen, version, value = self._sigma
        now = None if sigmas.is_inference() else sigmas._version
        if seen is not sigmas or version != now:
            value = float(sigmas.max())
            self._sigma = (sigmas, now, value)
        return value

    def context_positions(self, context_tokens: int, device: torch.device) -> torch.Tensor:
        """Positions in a context of `context_tokens`, following ComfyUI's repetition of shorter contexts."""
        if context_tokens % self.prompt_tokens:
            raise NestedAttentionError(
                f"nested attention: '{self.name}' was located in a prompt of {self.prompt_tokens} tokens, but the "
                f"sampler's conditioning has {context_tokens}. Use the CONDITIONING from the Apply Nested Attention "
                "node (or encode exactly the same prompt), and do not concatenate other conditioning onto it.")
        key = (context_tokens, device)
        found = self._positions.get(key)
        if found is None:  # made once per device: a copy from host memory waits for a GPU
            repeats = context_tokens // self.prompt_tokens
            pos = torch.tensor(self.positions, dtype=torch.long)
            found = (pos[None, :] + self.prompt_tokens * torch.arange(repeats)[:, None]).flatten().to(device)
            self._store(self._positions, key, found)
        return found

    def layer_kv(self, layer: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K~ and V~ of one layer, projected once per (layer, device, dtype) when caching."""
        key = (layer, device, dtype)
        found = self._kv.get(key) if self.cache else None
        if found is not None:
            return found
        proj = self.encoder.projections[layer]
        tokens = self.tokens.to(device=device, dtype=dtype)
        wk = proj.to_k.weight.to(device=device, dtype=dtype)
        wv = proj.to_v.weight.to(device=device, dtype=dtype)
        if self.cache:
            with torch.no_grad():
                kv = (F.linear(tokens, wk), F.linear(tokens, wv))
            if kv[0].shape[0] == 1:  # one subject for every row: (M, D), expanded at use
                kv = (kv[0][0], kv[1][0])
            self._store(self._kv, key, kv)
            return kv
        return F.linear(tokens, wk), F.linear(tokens, wv)

    def _store(self, cache: dict, key: tuple, value: Any) -> None:
        with self._lock:
            cache.setdefault(key, value)  # two threads may make the same entry; both values are equal

    def drop_cache(self, keep_device: torch.device | None = None) -> None:
        """Forget what was made for devices of another type: K~/V~, resized masks, positions.

        Only another *type* is dropped (a move to the CPU frees the GPU's entries): the GPUs of a
        multi-GPU run keep each other's, since each of their models may still be sampling. A model that
        is sampling never loses a tensor it holds; at worst it recomputes an entry on its next call.
        """
        keep = None if keep_device is None else torch.device(keep_device).type
        with self._lock:
            for cache in (self._kv, self._masks, self._positions):
                for key in [k for k in cache if next(d for d in k if isinstance(d, torch.device)).type != keep]:
                    del cache[key]

    def forget_sigma(self) -> None:
        """Drop the reference to the last sampling's sigmas tensor (it would keep it alive)."""
        self._sigma = (None, None, 0.0)

    def region(self, activations_shape: Sequence[int] | None, n: int, device: torch.device) -> torch.Tensor | None:
        """The mask resized to the layer's (h, w) grid, flattened to (N,)."""
        if self.mask is None:
            return None
        # Without a shape from the host: assume the mask's aspect ratio.
        h, w = layer_grid(activations_shape, n, self.mask.shape[-2] / self.mask.shape[-1])
        key = (h, w, device)
        found = self._masks.get(key)
        if found is None:
            resized = F.interpolate(self.mask[None, None].float(), size=(h, w), mode="area")
            found = resized.flatten().clamp(0, 1).to(device)
            self._store(self._masks, key, found)
        return found

    def nested_subject(self, layer: int, q: torch.Tensor, context_tokens: int, extra_options: dict) -> NestedSubject:
        k, v = self.layer_kv(layer, q.device, q.dtype)
        alpha = self.encoder.config.alpha if self.alpha is None else self.alpha
        weight = self.region(extra_options.get("activations_shape"), q.shape[1], q.device)
        if self.rows is not None:  # a weight of 0 leaves a row exactly as without the subject
            per_row = self.rows.to(q.device, torch.float32)[:, None].expand(-1, q.shape[1])  # (B, N)
            weight = per_row if weight is None else weight[None, :] * per_row
        # Positions in host memory: nested_attention reads them as ints, without waiting for a device.
        return NestedSubject(k, v, self.context_positions(context_tokens, _HOST), lam=self.lam, alpha=alpha,
                             region_weight=weight)


def conditional_rows(batch: int, cond_or_uncond: Sequence[int] | None) -> torch.Tensor:
    """Bool (B,) of the rows in chunks marked conditional (0) by ComfyUI's sampler; all rows when unknown.

    On the CPU, whatever device the model runs on: `nested_attention` reads CPU rows without a device sync.
    """
    if not cond_or_uncond:
        return torch.ones(batch, dtype=torch.bool)
    chunk = batch // len(cond_or_uncond)
    return torch.tensor([c == 0 for c in cond_or_uncond for _ in range(chunk)], dtype=torch.bool)


class NestedAttentionPatch:
    """ComfyUI attn2 replace patch for one layer; holds the subjects bound to this model.

    wrapped: another pack's attn2 patch that held the layer before (None when there was none). It is
    called for the base attention and kept as it is: this patch never changes or copies it.
    """

    def __init__(self, layer: LayerSpec, index: int, subjects: Sequence[SubjectBinding] = (),
                 host_attention: HostAttention = plain_host_attention, models: Sequence[Any] = (),
                 wrapped: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor] | None = None):
        self.layer = layer
        self.index = index  # position of this layer in the encoders' layer tables
        self.subjects = tuple(sorted(subjects, key=lambda s: s.sort_key))  # never changed: see the module doc
        self.host_attention = host_attention
        self._models = tuple(models)  # ModelPatchers ComfyUI should load with the UNet
        self.wrapped = wrapped
        self._auto = any(s.auto_region for s in self.subjects)

    def _remade(self, subjects: Sequence[SubjectBinding], models: Sequence[Any], wrapped: Any) -> NestedAttentionPatch:
        return NestedAttentionPatch(self.layer, self.index, subjects, self.host_attention, models, wrapped)

    def with_subjects(self, subjects: Sequence[SubjectBinding], models: Sequence[Any] = ()) -> NestedAttentionPatch:
        """A new patch with `subjects` added (chaining); this one is left as it is, for the upstream model."""
        models = (*self._models, *(m for m in models if m not in self._models))
        return self._remade([*self.subjects, *subjects], models, self.wrapped)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        sigmas = extra_options.get("sigmas")
        active = [s for s in self.subjects if s.active(sigmas)]
        theirs = None if self.wrapped is None else self.wrapped(q, k, v, extra_options)

        def attention(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor, heads_: int) -> torch.Tensor:
            return self.host_attention(q_, k_, v_, heads_, extra_options)

        if not active:
            return attention(q, k, v, heads) if theirs is None else theirs
        rows = conditional_rows(q.shape[0], extra_options.get("cond_or_uncond"))  # on the CPU: no device sync
        if theirs is not None and not rows.any():
            return theirs
        nested = [s.nested_subject(self.index, q, k.shape[1], extra_options) for s in active]
        run = extra_options.get(RUN_KEY)  # this sampling run's observers (nested_attention.capture), or None
        if self._auto and (run is None or run.auto is None):
            raise NestedAttentionError(
                "nested attention: a subject has region auto, which is found while ComfyUI's sampler runs, "
                "but this call comes without the sampler's per-run state. Sample with a KSampler or a "
                "SamplerCustom node (or, in code, install the subject with host.install_subject).")
        probe = None
        if run is not None:
            nested, probe = run.layer(active, nested, q, rows, heads, extra_options)
        # Another pack's output PV + X is built on, never rescaled: X has its own softmax and passes through
        # at every lambda, and rows without the subject keep it bit for bit.
        return nested_attention(q, k, v, nested, heads=heads, rows=rows, attention=attention, over=theirs,
                                probe=probe)

    def add(self, callback: Any, **kwargs: Any) -> None:
        """What IPAdapter_plus, InstantID and PuLID call on a layer's patch when their node comes after ours."""
        # ComfyUI names a custom node pack's modules by their path: keep only the pack's folder on.
        module = str(getattr(callback, "__module__", "?")).replace("\\", "/").rsplit("/", 1)[-1]
        name = f"{module}.{getattr(callback, '__qualname__', type(callback).__name__)}"
        raise NestedOrderError(
            f"a node applied after Apply Nested Attention tried to add its attention ({name}) to the nested "
            f"attention patch on cross-attention layer {self.layer.key}. Nested attention patches never change "
            "once set, so they cannot take it. Put IPAdapter, InstantID and PuLID nodes before Apply Nested "
            "Attention (Load Checkpoint -> IPAdapter -> Apply Nested Attention -> KSampler): nested attention "
            "then builds on their patch and keeps their effect."
        )

    # ComfyUI protocol. Up to 0.13, clone() deep-copies model_options: share everything heavy. From 0.14
    # on, clone() shares this object instead, which is why nothing here changes after __init__.
    def __deepcopy__(self, memo: dict) -> NestedAttentionPatch:
        """A new patch with the same subjects and the same wrapped patch.

        The wrapped patch is shared, not deep-copied: that is what ComfyUI from 0.14 on does with every patch,
        so both hosts run the same objects; nothing reaches it through this patch to change it (`add` is
        refused); and a deep copy would copy the other pack's model and embeddings on every clone
        (IPAdapter_plus keeps them in its patch).
        """
        return self._remade(list(self.subjects), self._models, self.wrapped)

    def to(self, device: torch.device | torch.dtype) -> NestedAttentionPatch:
        """Called by ComfyUI when the UNet moves; caches for other devices are dropped to free memory.

        ComfyUI's model_load also calls it with the model's dtype (model_patches_to(model_dtype())):
        caches are kept per dtype already, so a dtype needs nothing here. The wrapped patch gets both calls;
        ComfyUI puts what `to` returns in place of the patch, so where the wrapped one returns another object,
        so does this one (a new patch around it).
        """
        wrapped = self.wrapped.to(device) if hasattr(self.wrapped, "to") else self.wrapped
        if not isinstance(device, torch.dtype):
            for s in self.subjects:
                s.drop_cache(keep_device=device)
        return self if wrapped is self.wrapped else self._remade(self.subjects, self._models, wrapped)

    def cleanup(self) -> None:
        """Called by ComfyUI (0.17 on) on each patch after sampling with a model that carries it.

        The patch may be shared with other models, which may be sampling now, so only what belongs to
        the run that ended is let go: the memo of its sigmas tensor. The K~/V~ caches stay: they are
        valid for as long as the subject is, serve the next run, and follow the model's device via `to`.
        The wrapped patch's own cleanup runs too, where it has one.
        """
        for s in self.subjects:
            s.forget_sigma()
        if hasattr(self.wrapped, "cleanup"):
            self.wrapped.cleanup()

    def models(self) -> list:
        """The ModelPatchers ComfyUI loads with the UNet: the encoders', then the wrapped patch's."""
        return [*self._models, *(self.wrapped.models() if hasattr(self.wrapped, "models") else ())]
