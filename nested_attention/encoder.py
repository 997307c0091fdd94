"""The subject encoder: a Q-Former over CLIP image tokens, and per-layer nested projections.

image -> CLIP ViT-H/14 tokens (B, 257, 1280) -> Q-Former -> E (B, M, 2048)
      (the last layer's tokens for the pack's own encoders, the penultimate layer's for IP-Adapter Plus:
      `ClipVisionSpec.hidden_layer` says which)
      -> per cross-attention layer l: K~_l = E W_K~_l^T, V~_l = E W_V~_l^T  (M, dim_l)

The Q-Former is a perceiver resampler: M learned queries that attend to the CLIP tokens (and to
themselves) through a few [attention, feed-forward] blocks with residuals, then a final norm and a
projection to the UNet's context width, so that W_K~ / W_V~ can start from the UNet's to_k / to_v.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .layers import SDXL_CONTEXT_DIM, SDXL_LAYERS, LayerSpec


def feed_forward(dim: int, mult: int, bias: bool = True) -> nn.Sequential:
    # IP-Adapter's Resampler has no feed-forward biases; the pack's own encoders have them.
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=bias), nn.GELU(), nn.Linear(dim * mult, dim, bias=bias))


class PerceiverAttention(nn.Module):
    """Latents attend to [image tokens, latents]; the resampler's cross-attention."""

    def __init__(self, *, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor, return_attention: bool = False):
        """(B, L, dim), (B, M, dim) -> (B, M, dim); with return_attention also the attention weights
        (B, heads, M, L + M) over [image tokens, latents], computed in the open (not by the fused kernel)."""
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        if return_attention:
            weights = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)  # (B, heads, M, L + M)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, M, dim_head)
        out = self.to_out(rearrange(out, "b h n d -> b n (h d)"))
        return (out, weights) if return_attention else out


@dataclass
class QFormerConfig:
    clip_dim: int = 1280  # width of the CLIP vision tokens (ViT-H/14: 1280)
    dim: int = 1024  # internal width of the resampler
    depth: int = 4  # number of [attention, feed-forward] blocks
    heads: int = 16  # attention heads in each block
    dim_head: int = 64  # width of one head
    num_queries: int = 256  # M, the number of subject tokens (paper: 256 pets, 1024 faces)
    output_dim: int = SDXL_CONTEXT_DIM  # width of E, the UNet's context width
    ff_mult: int = 4  # feed-forward expansion
    ff_bias: bool = True  # feed-forward linears have biases (IP-Adapter's Resampler: False)


class QFormer(nn.Module):
    """M learned queries cross-attending to CLIP tokens: (B, L, clip_dim) -> (B, M, output_dim)."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        c = config
        self.latents = nn.Parameter(torch.randn(c.num_queries, c.dim) / c.dim**0.5)
        self.proj_in = nn.Linear(c.clip_dim, c.dim)
        self.blocks = nn.ModuleList(
            nn.ModuleList([
                PerceiverAttention(dim=c.dim, heads=c.heads, dim_head=c.dim_head),
                feed_forward(c.dim, c.ff_mult, c.ff_bias),
            ])
            for _ in range(c.depth)
        )
        self.proj_out = nn.Linear(c.dim, c.output_dim)
        self.norm_out = nn.LayerNorm(c.output_dim)

    def forward(self, clip_tokens: torch.Tensor, return_attention: bool = False):
        """CLIP tokens (B, L, clip_dim) -> E (B, M, output_dim); with return_attention also each block's
        attention weights: `depth` tensors (B, heads, M, L + M), query j over [image tokens, latents]."""
        media = self.proj_in(clip_tokens)  # (B, L, dim)
        latents = self.latents.unsqueeze(0).expand(media.shape[0], -1, -1)  # (B, M, dim)
        maps = []
        for attn, ff in self.blocks:
            if return_attention:
                out, weights = attn(media, latents, return_attention=True)
                maps.append(weights)
            else:
                out = attn(media, latents)
            latents = latents + out
            latents = latents + ff(latents)
        tokens = self.norm_out(self.proj_out(latents))
        return (tokens, maps) if return_attention else tokens


# ClipVisionSpec.hidden_layer -> the key of ComfyUI's encode_image output holding those tokens.
HIDDEN_LAYERS = {"last": "last_hidden_state", "penultimate": "penultimate_hidden_states"}


@dataclass
class ClipVisionSpec:
    """Which CLIP vision model the encoder was trained on; a different one is refused."""

    name: str = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"  # the file users keep in models/clip_vision
    hidden_size: int = 1280  # width of last_hidden_state
    num_tokens: int = 257  # tokens of last_hidden_state (CLS + patches)
    num_layers: int = 32  # transformer layers of the tower
    image_size: int = 224  # input resolution
    # Which hidden state feeds the Q-Former: "last" (encode_image()["last_hidden_state"], the pack's own
    # encoders) or "penultimate" (["penultimate_hidden_states"], what IP-Adapter Plus was trained on).
    hidden_layer: str = "last"
    # Preprocessing the encoder was trained with: "center" (short side to image_size, centre crop, CLIP
    # mean/std: ComfyUI's clip_preprocess(crop=True), the same as transformers' CLIPImageProcessor) or
    # "none" (the whole photo squashed to a square).
    crop: str = "center"

    def __post_init__(self):
        if self.hidden_layer not in HIDDEN_LAYERS:
            raise ValueError(f"hidden_layer must be one of {sorted(HIDDEN_LAYERS)}, got {self.hidden_layer!r}")
        if self.crop not in ("center", "none"):
            raise ValueError(f"crop must be 'center' or 'none', got {self.crop!r}")

    @property
    def output_key(self) -> str:
        """The entry of ComfyUI's `ClipVisionModel.encode_image(...)` output the Q-Former reads."""
        return HIDDEN_LAYERS[self.hidden_layer]

    def describe(self) -> str:
        return f"{self.name} {self.architecture()}"

    def architecture(self) -> str:
        # The hidden layer is named only when it is not the last, so descriptions of the pack's own encoders
        # (and the trainer's latent-cache identities built from them) stay as they were.
        layer = "" if self.hidden_layer == "last" else f", {self.hidden_layer} hidden layer"
        return f"(width {self.hidden_size}, {self.num_tokens} tokens, {self.num_layers} layers, {self.image_size}px{layer})"

    def same_architecture(self, other: ClipVisionSpec) -> bool:
        return (self.hidden_size, self.num_tokens, self.num_layers, self.image_size) == (
            other.hidden_size, other.num_tokens, other.num_layers, other.image_size)


_POSITION = "embeddings.position_embedding.weight"  # (tokens incl. CLS, width) in ComfyUI's / HF's CLIP vision
_PATCH = "embeddings.patch_embedding.weight"  # (width, 3, patch, patch)
_LAYER = re.compile(r"encoder\.layers\.(\d+)\.")


def clip_vision_architecture(
    shapes: Mapping[str, Sequence[int]], name: str = "", image_size: int | None = None
) -> ClipVisionSpec:
    """The architecture of a CLIP vision tower from its parameter shapes by name (ComfyUI's / transformers'
    names, `vision_model.embeddings.position_embedding.weight` ...): a model's parameters or a file's header.

    width and tokens from the position embedding, layers from the `encoder.layers.N` indices; the input size is
    `image_size` when given (a loaded model knows it), else (tokens - 1) ** 0.5 patches of the patch
    embedding's size (CLS + a square grid, as CLIP ViTs have). Raises ValueError naming what is missing.
    """
    # A whole CLIP file also holds text_model.embeddings...: the vision tower's names sort last.
    key = max((k for k in shapes if k.endswith(_POSITION)), default=None)
    tower = "" if key is None else key[: -len(_POSITION)]  # "vision_model." for ComfyUI's and HF's names
    patch = shapes.get(tower + _PATCH)
    if key is None or (image_size is None and patch is None):
        raise ValueError(f"no {_POSITION}" + ("" if image_size is not None else f" / {_PATCH}") + " weights")
    num_tokens, hidden = (int(s) for s in shapes[key])
    layers = {int(m.group(1)) for k in shapes if k.startswith(tower) for m in [_LAYER.match(k[len(tower):])] if m}
    if image_size is None:
        image_size = round(math.sqrt(num_tokens - 1)) * int(patch[-1])  # 16 x 14 = 224 for ViT-H/14
    return ClipVisionSpec(
        name=name, hidden_size=hidden, num_tokens=num_tokens, num_layers=len(layers), image_size=int(image_size)
    )


@dataclass
class EncoderConfig:
    """Everything needed to rebuild an encoder and use it; stored in the weight file's metadata."""

    domain: str = "pets"  # what the encoder was trained on ("pets", "faces", ...)
    token: str = "pet"  # the default subject word s*
    alpha: float = 2.0  # norm regularization: |v*| = alpha |V[s*]|
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    clip_vision: ClipVisionSpec = field(default_factory=ClipVisionSpec)
    layers: tuple[LayerSpec, ...] = SDXL_LAYERS  # the cross-attention layers it projects for
    source: str = ""  # where the weights came from (a file converted from another format says which)
    licence: str = ""  # the weights' licence, when known (e.g. "CC BY-NC-SA 4.0 (non-commercial)")
    # Face alignment the encoder was trained with: "ffhq" (aligned crops, nested_attention.faces) or "none".
    face_align: str = "none"
    face_size: int = 512  # side of the aligned crop, before CLIP's own resize

    @property
    def num_tokens(self) -> int:
        return self.qformer.num_queries

    def to_json(self) -> str:
        data = asdict(self)
        data["layers"] = [layer.to_json() for layer in self.layers]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EncoderConfig:
        """The config `to_json` wrote; a value of the wrong type or out of range raises (`check`: a damaged
        or hand-edited file must not build a module of a billion blocks, or one that fails later)."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TypeError(f"the config is {type(data).__name__}, expected a JSON object")
        config = cls(
            domain=data["domain"],
            token=data["token"],
            alpha=data["alpha"],
            qformer=QFormerConfig(**data["qformer"]),
            clip_vision=ClipVisionSpec(**data["clip_vision"]),
            layers=tuple(LayerSpec.from_json(item) for item in data["layers"]),
            # Files written before these fields existed (format version 1 all the same) lack them.
            source=data.get("source", ""),
            licence=data.get("licence", ""),
            # Files written before these fields: face encoders read aligned faces (the paper's recipe).
            face_align=data.get("face_align", "ffhq" if data["domain"] == "faces" else "none"),
            face_size=data.get("face_size", 512),
        )
        config.check()
        config.alpha = float(config.alpha)
        return config

    def check(self) -> None:
        """Raise TypeError or ValueError naming the first field of the wrong type or out of range."""
        def positive(name: str, value) -> None:
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} is {value!r}, expected a whole number >= 1")

        for name in ("domain", "token", "source", "licence"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} is {getattr(self, name)!r}, expected a string")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < 1e6:
            raise ValueError(f"alpha is {self.alpha!r}, expected a positive number")
        q = self.qformer
        for name in ("clip_dim", "dim", "depth", "heads", "dim_head", "num_queries", "output_dim", "ff_mult"):
            positive(f"qformer.{name}", getattr(q, name))
        if type(q.ff_bias) is not bool:
            raise ValueError(f"qformer.ff_bias is {q.ff_bias!r}, expected true or false")
        c = self.clip_vision
        if not isinstance(c.name, str):
            raise TypeError(f"clip_vision.name is {c.name!r}, expected a file name")
        for name in ("hidden_size", "num_tokens", "num_layers", "image_size"):
            positive(f"clip_vision.{name}", getattr(c, name))
        if not self.layers or len({layer.key for layer in self.layers}) != len(self.layers):
            raise ValueError(f"layers: {len(self.layers)} entries, expected at least one and no key twice")
        if self.face_align not in ("none", "ffhq"):  # nested_attention.faces.ALIGN_MODES
            raise ValueError(f"face_align is {self.face_align!r}, expected 'none' or 'ffhq'")
        positive("face_size", self.face_size)


class NestedProjection(nn.Module):
    """W_K~ and W_V~ of one cross-attention layer: E (.., M, context) -> K~, V~ (.., M, dim)."""

    def __init__(self, *, context_dim: int, dim: int):
        super().__init__()
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.to_k(tokens), self.to_v(tokens)


class NestedEncoder(nn.Module):
    """The trainable part of nested attention: the Q-Former and one projection pair per layer."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.qformer = QFormer(config.qformer)
        out = config.qformer.output_dim
        self.projections = nn.ModuleList(NestedProjection(context_dim=out, dim=layer.dim) for layer in config.layers)

    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        return self.config.layers

    def encode(self, clip_tokens: torch.Tensor, return_attention: bool = False):
        """CLIP tokens (B, L, clip_dim) of `config.clip_vision.hidden_layer` -> subject tokens E (B, M, D).

        return_attention: also the Q-Former's attention weights per block (see `QFormer.forward`), for
        showing which part of the photo each query reads (nested_attention.capture.query_maps).
        """
        return self.qformer(clip_tokens, return_attention=return_attention)

    @torch.no_grad()
    def init_from_unet(self, to_k: Sequence[torch.Tensor], to_v: Sequence[torch.Tensor]) -> None:
        """Warm start: copy each layer's UNet to_k / to_v weights (dim, context) into W_K~ / W_V~."""
        if len(to_k) != len(self.projections) or len(to_v) != len(self.projections):
            raise ValueError(f"expected {len(self.projections)} to_k/to_v weights, got {len(to_k)}/{len(to_v)}")
        for proj, wk, wv in zip(self.projections, to_k, to_v):
            proj.to_k.weight.copy_(wk)
            proj.to_v.weight.copy_(wv)


@torch.no_grad()
def encode_clip_tokens(encoder: NestedEncoder, clip_tokens: torch.Tensor) -> torch.Tensor:
    """CLIP tokens (n, L, clip_dim) on any device and dtype -> subject tokens E (n, M, D), CPU float32: cast to
    the device and dtype of the encoder's weights, then `NestedEncoder.encode`. The nodes and the trainer both
    encode photos through this (and `nested_attention_comfy.clip_vision.photo_tokens`)."""
    weight = next(encoder.parameters())
    return encoder.encode(clip_tokens.to(weight.device, weight.dtype)).to("cpu", torch.float32)


def concat_subject_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Several photos of one subject: (n, M, D) -> (1, n*M, D), the paper's multi-image form."""
    return rearrange(tokens, "n m d -> 1 (n m) d")
