"""What nested attention did in one sampling run: where each subject went, what it read, regions from that.

Observed per sampling run, never on a patch: ComfyUI (0.14 on) shares patch objects between model clones,
so the glue (`host.add_capture`, `host.add_auto_regions`) makes a fresh `SamplingRun` for every run of the
sampler (an OUTER_SAMPLE wrapper) and hands it to the patches in `transformer_options[RUN_KEY]`. A patch that
finds none does what it did before: one dict lookup is the whole cost of the feature when it is off.

What a run keeps (running means, never every step x layer x head):
- placement: per subject and per layer grid (h, w), the subject word's attention probability P' (after λ
  and the region weight, summed over the word's positions) averaged over heads, over the layers of that grid
  and over the observed steps: (B, h*w) per image of the batch. That is the probe contract of
  `nested_attention(..., probe=)`; the probe itself does the math, so the maps are what sampling used.
- tokens (optional: they cost more than the nested attention itself): per subject, which of its encoder
  tokens the nested attention reads at each position, softmax(q K~^T / sqrt(d)) averaged over heads, layers
  and steps, pooled to one coarse grid (at most TOKEN_GRID cells a side): (B, gh*gw, M_total). Each cell is a
  distribution over the tokens (sums to 1).
- auto regions: the same placement means over the first steps of the run, then each position assigned to
  the auto subject whose word reads it most (relative to that word's own peak), used as region weights for
  the remaining steps.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from .logs import LOG_PREFIX

RUN_KEY = "nested_attention_run"  # transformer_options entry holding the run's SamplingRun
TOKEN_GRID = 32  # most cells on the long side of the grid the token weights are kept on
AUTO_MEASURE = (
    0.2  # region auto: fraction of the sampling steps (at least one) measured before regions are set
)
log = logging.getLogger(__name__)


def layer_grid(activations_shape: Sequence[int] | None, n: int, ratio: float) -> tuple[int, int]:
    """The (h, w) grid of a layer's n queries: from the host's activations shape (B, C, h, w) when it has one,
    else the one of aspect ratio h / w = `ratio` (the latent's, or a mask's)."""
    if activations_shape is not None and activations_shape[-1] * activations_shape[-2] == n:
        return int(activations_shape[-2]), int(activations_shape[-1])
    w = max(1, round(math.sqrt(n / ratio)))
    return n // w, w


def token_grid(latent: Sequence[int]) -> tuple[int, int]:
    """The grid token weights are pooled to for a latent (h, w): a quarter of it (SDXL's coarsest
    cross-attention grid), at most TOKEN_GRID cells on the long side."""
    h, w = int(latent[0]), int(latent[1])
    scale = min(0.25, TOKEN_GRID / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def nested_token_weights(
    q: torch.Tensor, key: torch.Tensor, heads: int, chunk_bytes: int = 32 << 20
) -> torch.Tensor:
    """The weights the nested attention mixes V~ with, averaged over heads: (B, N, M) float32.

    softmax(q K~^T / sqrt(d)) per head, as `nested_values` computes inside its fused kernel (a test holds
    the two together); q (B, N, D), key K~ (M, D) or (B, M, D). Computed for a chunk of queries at a time, so
    that no more than about `chunk_bytes` of (B, heads, chunk, M) logits exist at once.
    """
    b, n, width = q.shape
    dim_head = width // heads
    if key.dim() == 2:
        key = key.expand(b, -1, -1)
    m = key.shape[1]
    qh = q.float().reshape(b, n, heads, dim_head).transpose(1, 2)  # (B, h, N, d)
    kh = (
        (key.to(q.device).float() * dim_head**-0.5).reshape(b, m, heads, dim_head).permute(0, 2, 3, 1)
    )  # (B,h,d,M)
    out = torch.empty(b, n, m, device=q.device)
    chunk = max(1, chunk_bytes // (4 * b * heads * m))
    for i in range(0, n, chunk):
        torch.sum(torch.matmul(qh[:, :, i : i + chunk], kh).softmax(dim=-1), dim=1, out=out[:, i : i + chunk])
    return out.div_(heads)


def pool_cells(values: torch.Tensor, grid: tuple[int, int], cells: tuple[int, int]) -> torch.Tensor:
    """Per-query values (R, h*w, C) on a layer's grid (h, w) -> their means over the cells of a coarser grid
    (gh, gw): (R, gh*gw, C); a grid that does not divide evenly (or is coarser) is resized by area."""
    (h, w), (gh, gw) = grid, cells
    rows, _, c = values.shape
    if h % gh == 0 and w % gw == 0:  # a reshape, no copy of the (N, C) values
        return values.reshape(rows, gh, h // gh, gw, w // gw, c).mean(dim=(2, 4)).reshape(rows, gh * gw, c)
    planes = values.transpose(1, 2).reshape(rows, c, h, w)
    return F.adaptive_avg_pool2d(planes, cells).flatten(2).transpose(1, 2)


def combined_map(maps: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
    """Per-grid maps {(h, w): (B, h*w)} -> one (B, H, W) map on the finest grid: each upsampled (bilinear)
    and the grids averaged with equal weight."""
    size = max(maps, key=lambda hw: hw[0] * hw[1])
    planes = [
        F.interpolate(m.reshape(m.shape[0], 1, *hw).float(), size=size, mode="bilinear", align_corners=False)
        if hw != size
        else m.reshape(m.shape[0], 1, *hw).float()
        for hw, m in maps.items()
    ]
    return torch.stack(planes).mean(dim=0)[:, 0]


def decide_regions(maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Disjoint regions from the subjects' placement maps, each (B, H, W) on one grid: bool (B, H, W) each.

    Each map is divided by its own peak (per image), and every position goes to the subject with the
    highest value there; ties go to the earlier subject. So each position belongs to exactly one subject, and
    a subject's peak is its own unless another subject also peaks there.
    """
    stacked = torch.stack([m.float() for m in maps])  # (S, B, H, W)
    peak = stacked.flatten(2).amax(dim=-1)[..., None, None]  # (S, B, 1, 1)
    best = (stacked / peak.clamp_min(1e-12)).argmax(dim=0)  # (B, H, W); the first of equal maxima
    return [best == s for s in range(len(maps))]


def strongest_points(heat: torch.Tensor, count: int = 3) -> list[tuple[float, float]]:
    """The `count` strongest positions of a map (H, W) as (x, y) fractions of the image (cell centres), each
    at least an eighth of the map's short side from the others (so three points are three places)."""
    heat = heat.detach().float().clone()
    h, w = heat.shape
    radius = max(1, round(min(h, w) / 8))
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    points = []
    for _ in range(count):
        index = int(heat.flatten().argmax())
        y, x = divmod(index, w)
        if heat[y, x] == -math.inf:
            break
        points.append(((x + 0.5) / w, (y + 0.5) / h))
        heat[(ys - y).abs().maximum((xs - x).abs()) <= radius] = -math.inf
    return points


def weights_at(tokens: torch.Tensor, point: tuple[float, float]) -> torch.Tensor:
    """Token weights (gh, gw, M_total) at the cell holding an (x, y) fraction of the image: (M_total,)."""
    gh, gw, _ = tokens.shape
    x, y = point
    return tokens[min(gh - 1, max(0, int(y * gh))), min(gw - 1, max(0, int(x * gw)))]


def query_maps(attention: Sequence[torch.Tensor], image_tokens: int) -> torch.Tensor:
    """Where each Q-Former query looks in the photo: (B, M, s, s) from the attention weights per block
    [(B, heads, M, L + M)] of `NestedEncoder.encode(..., return_attention=True)`.

    The weights on the L image tokens, averaged over blocks and heads, without the first (CLIP's class
    token), on the patch grid s x s (s = sqrt(L - 1)): the share of the query's attention each patch gets.
    """
    mean = torch.stack([a.float() for a in attention]).mean(dim=(0, 2))  # (B, M, L + M)
    patches = mean[..., 1:image_tokens]  # (B, M, L - 1)
    side = math.isqrt(patches.shape[-1])
    if side * side != patches.shape[-1]:
        raise ValueError(f"{image_tokens} image tokens are not a class token and a square patch grid")
    return patches.reshape(*patches.shape[:2], side, side)


# ------------------------------------------------------------------------------------------------
# Running means


class RunningMaps:
    """Sums of per-image maps by key, and how many layer calls each holds; rows of the batch folded by image.

    A call's rows are whole copies of the batch (ComfyUI batches each conditioning over all B images), so row
    r belongs to image r % B. Sums stay on the device of their first call (no device sync while sampling).
    """

    def __init__(self, batch: int):
        self.batch = batch
        self.sums: dict[Any, torch.Tensor] = {}
        self.counts: dict[Any, int] = {}

    def add(self, key: Any, values: torch.Tensor) -> None:
        rows = values.shape[0]
        if rows % self.batch:  # not whole copies of the batch: cannot be told apart by image
            return
        folded = values.float().reshape(rows // self.batch, self.batch, *values.shape[1:]).sum(dim=0)
        found = self.sums.get(key)
        if found is None:
            self.sums[key] = folded
        else:
            found.add_(folded.to(found.device))
        self.counts[key] = self.counts.get(key, 0) + rows // self.batch

    def mean(self, key: Any) -> torch.Tensor | None:
        found = self.sums.get(key)
        return None if found is None else (found / self.counts[key]).to("cpu")


@dataclass(frozen=True)
class Window:
    """The part of sampling observed: sigma_end <= sigma <= sigma_start (from start/end percent)."""

    sigma_start: float = math.inf
    sigma_end: float = 0.0

    def contains(self, sigma: float | None) -> bool:
        return sigma is None or self.sigma_end <= sigma <= self.sigma_start


@dataclass
class SubjectCapture:
    """One subject's maps from one run (CPU, float32, means)."""

    name: str
    placement: dict[
        tuple[int, int], torch.Tensor
    ]  # (h, w) -> (B, h*w): P' averaged over heads, layers, steps
    tokens: torch.Tensor | None  # (B, gh, gw, M_total): token weights averaged over heads, layers, steps
    calls: int  # layer calls averaged (summed over the grids)
    num_tokens: int  # M per photo (M_total = photos * M)
    source: Any = None  # what the subject was bound from (`SubjectBinding.source`), for drawing on its photos
    region: torch.Tensor | None = None  # (B, H, W) bool: the region `region: auto` gave it, if it had one

    def placement_map(self) -> torch.Tensor:
        """(B, H, W) on the finest grid: the per-grid maps combined (`combined_map`)."""
        return combined_map(self.placement)


@dataclass
class CaptureResult:
    """What one capture saw in one sampling run."""

    subjects: list[SubjectCapture]
    batch: int  # images in the batch
    latent: tuple[int, int]  # the latent's (h, w)
    steps: int  # model evaluations observed (distinct noise levels)


class CaptureSink:
    """The capture node's output: each sampling run of a model carrying its capture publishes here.

    Holds the latest finished run (a second sampler on the same captured model replaces the first's).
    """

    def __init__(self) -> None:
        self.latest: CaptureResult | None = None
        self.runs = 0
        self._lock = threading.Lock()

    def publish(self, result: CaptureResult) -> None:
        with self._lock:
            self.latest = result
            self.runs += 1


@dataclass
class Capture:
    """One capture's running means during one run."""

    window: Window
    grid: tuple[int, int]  # token grid (gh, gw)
    batch: int
    sources: bool = True  # also record the token weights (the source map); the placement alone costs ~nothing
    placement: RunningMaps = field(init=False)
    tokens: RunningMaps = field(init=False)
    sigmas: set = field(default_factory=set)
    bindings: dict = field(default_factory=dict)  # binding -> None, in the order first seen

    def __post_init__(self) -> None:
        self.placement = RunningMaps(self.batch)
        self.tokens = RunningMaps(self.batch)

    def add_tokens(self, binding: Any, weights: torch.Tensor, grid: tuple[int, int]) -> None:
        """weights (R, N, M) of a layer of grid (h, w), pooled to the token grid: (R, gh*gw, M)."""
        self.tokens.add(binding, pool_cells(weights, grid, self.grid))

    def result(self, latent: tuple[int, int], regions: dict | None = None) -> CaptureResult:
        subjects = []
        for binding in sorted(self.bindings, key=lambda b: b.sort_key):
            tokens = self.tokens.mean(binding)  # (B, gh*gw, M) or None (tokens not recorded)
            grids = sorted(
                {hw for (b, hw) in self.placement.sums if b is binding}, key=lambda hw: -hw[0] * hw[1]
            )
            subjects.append(
                SubjectCapture(
                    name=binding.name,
                    placement={hw: self.placement.mean((binding, hw)) for hw in grids},
                    tokens=None if tokens is None else tokens.reshape(tokens.shape[0], *self.grid, -1),
                    calls=sum(self.placement.counts[(binding, hw)] for hw in grids),
                    num_tokens=binding.encoder.config.num_tokens,
                    source=binding.source,
                    region=None if regions is None else regions.get(binding),
                )
            )
        return CaptureResult(subjects, self.batch, latent, len(self.sigmas))


class AutoRegions:
    """`region: auto`: measure the auto subjects' placement while sigma > `until`, then fix their regions."""

    def __init__(self, until: float, batch: int):
        self.until = until
        self.batch = batch
        self.placement = RunningMaps(batch)
        self.regions: dict | None = None  # binding -> (B, H, W) bool, once decided
        self._resized: dict = {}

    def measuring(self, sigma: float | None) -> bool:
        return self.regions is None and (sigma is None or sigma > self.until)

    def decide(self, bindings: Sequence[Any]) -> None:
        """Regions for every auto subject measured, from its placement means (once; the caller holds the lock)

        bindings: the auto subjects of the layer call that decides; one of them that was not measured (active
        only later, by its start_percent) gets no region, i.e. the whole image, and a warning.
        """
        measured = sorted({key[0] for key in self.placement.sums}, key=lambda b: b.sort_key)
        missing = [b.name for b in bindings if b not in measured]
        if missing:
            log.warning(
                "%s region auto: %s was not active in the first steps; it gets no region (the whole image)",
                LOG_PREFIX, ", ".join(missing),
            )
        maps = [
            combined_map({key[1]: self.placement.mean(key) for key in self.placement.sums if key[0] is b})
            for b in measured
        ]
        self.regions = dict(zip(measured, decide_regions(maps))) if maps else {}

    def region_weight(
        self, binding: Any, grid: tuple[int, int], rows: int, device: torch.device
    ) -> torch.Tensor | None:
        """The decided region on a layer's grid (nearest, so regions stay disjoint), as NestedSubject.region_weight:
        (N,) for a batch of one, else (rows, N) with row r of image r % B; None for a subject without one."""
        region = self.regions.get(binding)
        if region is None:
            return None
        key = (binding, grid, rows, device)
        found = self._resized.get(key)
        if found is None:
            resized = F.interpolate(region[:, None].float(), size=grid, mode="nearest").flatten(1)  # (B, N)
            found = resized[0] if self.batch == 1 else resized.repeat(rows // self.batch, 1)
            found = self._resized.setdefault(key, found.to(device))
        return found


class SamplingRun:
    """Everything observed during one sampling run; made fresh per run by the glue's wrappers.

    batch: images in the batch; latent: the latent's (h, w). Patches call `layer` once per cross-attention
    call. Adds come from one thread per GPU at most (ComfyUI 0.33's multi-GPU sampling): under one lock.
    """

    def __init__(self, *, batch: int, latent: tuple[int, int]):
        self.batch = batch
        self.latent = (int(latent[0]), int(latent[1]))
        self.captures: list[Capture] = []
        self.auto: AutoRegions | None = None
        self._lock = threading.Lock()

    def layer(
        self,
        bindings: Sequence[Any],
        nested: Sequence[Any],
        q: torch.Tensor,
        rows: torch.Tensor,
        heads: int,
        extra_options: dict,
    ) -> tuple[list, Callable[[int, torch.Tensor], None] | None]:
        """One layer call: the NestedSubjects to use (auto subjects get their regions once decided) and the
        probe to pass `nested_attention` (None when nothing is observed at this step).

        bindings[i] made nested[i]; rows: bool (B,) on the CPU, the rows that get the subjects.
        """
        sigmas = extra_options.get("sigmas")
        # Read once per model evaluation: the bindings keep it for ComfyUI's one sigmas tensor per step.
        sigma = None if sigmas is None else bindings[0].current_sigma(sigmas)
        grid = layer_grid(extra_options.get("activations_shape"), q.shape[1], self.latent[0] / self.latent[1])
        nested = list(nested)
        sinks = []
        auto = self.auto
        if auto is not None and any(b.auto_region for b in bindings):
            if auto.measuring(sigma):
                sinks.append((auto.placement, lambda b: b.auto_region))
            else:
                if auto.regions is None:
                    with self._lock:
                        if auto.regions is None:
                            auto.decide([b for b in bindings if b.auto_region])
                nested = [
                    replace(s, region_weight=auto.region_weight(b, grid, q.shape[0], q.device)) if b.auto_region else s
                    for b, s in zip(bindings, nested)
                ]
        captures = [c for c in self.captures if c.window.contains(sigma)] if bool(rows.any()) else []
        with self._lock:
            for c in captures:
                c.sigmas.add(sigma)
                for b in bindings:
                    c.bindings.setdefault(b, None)
        if any(c.sources for c in captures):
            picked = rows.nonzero().flatten().to(q.device)
            q_rows = q.index_select(0, picked)
            for b, s in zip(bindings, nested):
                key = s.key if s.key.dim() == 2 else s.key.index_select(0, picked)
                weights = nested_token_weights(q_rows, key, heads)
                with self._lock:
                    for c in captures:
                        if c.sources:
                            c.add_tokens(b, weights, grid)
        sinks += [(c.placement, lambda b: True) for c in captures]
        if not sinks:
            return nested, None

        def probe(index: int, probs: torch.Tensor) -> None:
            heat = probs.mean(dim=1)  # (R, N): the mean over heads
            binding = bindings[index]
            with self._lock:
                for maps, wanted in sinks:
                    if wanted(binding):
                        maps.add((binding, grid), heat)

        return nested, probe
