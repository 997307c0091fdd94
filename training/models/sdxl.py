"""The frozen models (ComfyUI's own SDXL code) and the trainable module around the nested encoder.

Frozen: SDXL from a single-file checkpoint (`comfy.sd.load_checkpoint_guess_config`), CLIP vision
with `comfy.clip_vision.load` (what the nodes use), or the tiny models of `training.tiny.models`.
Trainable: `NestedEncoder` (Q-Former and per-layer projections).

The forward is the nodes' forward: the core's `NestedAttentionPatch` on every cross-attention layer,
fed by a `SubjectBinding` with per-row subject tokens (B, M, C), called by ComfyUI's own UNet
through `BaseModel.apply_model`, with ComfyUI's attention as the host attention.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from nested_attention import (
    ClipVisionSpec,
    EncoderConfig,
    LayerSpec,
    NestedEncoder,
    QFormerConfig,
    attn2_modules,
    unet_layers,
)
from nested_attention.layers import SDXL_LAYERS
from nested_attention.logs import LOG_PREFIX as PREFIX
from nested_attention.patch import SubjectBinding
from nested_attention.tokens import CHUNK
from training.comfy_env import comfy_module
from training.tiny import models as tiny_models

# Imported on first use (training.comfy_env): importing this module loads no ComfyUI.
comfy = comfy_module("comfy")
glue_clip_vision = comfy_module("nested_attention_comfy.clip_vision")  # the glue shared with the nodes, imported on first use
glue_model = comfy_module("nested_attention_comfy.model")  # the glue shared with the nodes, imported on first use
glue_words = comfy_module("nested_attention_comfy.words")  # the glue shared with the nodes, imported on first use

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Frozen models


@dataclass
class FrozenModels:
    unet: Any  # comfy.model_patcher.ModelPatcher around comfy.model_base.SDXL
    clip: Any  # comfy.sd.CLIP (SDXL's two text encoders and ComfyUI's tokenizer)
    vae: Any  # comfy.sd.VAE
    clip_vision: Any  # comfy.clip_vision.ClipVisionModel
    clip_vision_spec: ClipVisionSpec
    layers: tuple[LayerSpec, ...]  # the UNet's cross-attention layers, in the encoder's order

    @property
    def base(self):
        """ComfyUI's BaseModel (apply_model, encode_adm, model_sampling, latent format)."""
        return self.unet.model


def load_sdxl(path: str, weight_dtype: torch.dtype | None) -> tuple[Any, Any, Any]:
    """(UNet ModelPatcher, CLIP, VAE) from an SDXL single-file checkpoint, with ComfyUI's loader."""
    model_options = {"dtype": weight_dtype} if weight_dtype is not None else {}
    unet, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        path, output_vae=True, output_clip=True, model_options=model_options
    )
    if unet is None or clip is None or vae is None:
        raise ValueError(
            f"{path} is not a complete SDXL checkpoint (UNet, text encoders and VAE in one file); "
            "use the single-file sd_xl_base_1.0.safetensors."
        )
    layers = unet_layers(unet.model.diffusion_model)
    if layers != SDXL_LAYERS:
        raise ValueError(
            f"{os.path.basename(path)} is a {type(unet.model).__name__} with {len(layers)} cross-attention "
            f"layers; nested encoders are trained on SDXL base ({len(SDXL_LAYERS)} layers). Pass an "
            "SDXL base checkpoint with --pretrained_model."
        )
    return unet, clip, vae


def load_frozen(
    *,
    tiny: bool,
    checkpoint: str | None,
    clip_vision_path: str | None,
    weight_dtype: torch.dtype | None,
    seed: int = 0,
) -> FrozenModels:
    """The frozen models: SDXL + CLIP ViT-H/14 from files, or the tiny ones built in code."""
    if tiny:
        unet = tiny_models.tiny_sdxl_unet(seed=seed, dtype=weight_dtype)
        clip = tiny_models.tiny_sdxl_clip(seed=seed, dtype=torch.float32)  # float32: no per-call weight casts
        vae = tiny_models.tiny_vae(seed=seed)
        clip_vision = tiny_models.tiny_clip_vision(seed=seed)
        spec = glue_clip_vision.clip_vision_spec(clip_vision, tiny_models.TINY_CLIP_VISION_NAME)
    else:
        unet, clip, vae = load_sdxl(checkpoint, weight_dtype)
        clip_vision = glue_clip_vision.load_clip_vision(clip_vision_path)
        spec = glue_clip_vision.clip_vision_spec(clip_vision, os.path.basename(clip_vision_path))
    # The VAE works in float32 (docs/ARCHITECTURE.md §6): its latents are the targets.
    vae.first_stage_model.to(torch.float32)
    vae.vae_dtype = torch.float32
    for module in (unet.model, clip.cond_stage_model, vae.first_stage_model, clip_vision.model):
        module.requires_grad_(False).eval()
    return FrozenModels(
        unet=unet,
        clip=clip,
        vae=vae,
        clip_vision=clip_vision,
        clip_vision_spec=spec,
        layers=unet_layers(unet.model.diffusion_model),
    )


def make_encoder(
    *,
    domain: str,
    token: str,
    qformer: QFormerConfig,
    frozen: FrozenModels,
    alpha: float,
    init_from_unet: bool,
    seed: int,
) -> NestedEncoder:
    """A fresh encoder for the frozen models' layers; W_K~ / W_V~ optionally from the UNet's to_k / to_v."""
    config = EncoderConfig(
        domain=domain,
        token=token,
        alpha=alpha,
        qformer=qformer,
        clip_vision=frozen.clip_vision_spec,
        layers=frozen.layers,
        # Face encoders train on aligned crops (training.prepare --domain faces), so the nodes align too.
        face_align="ffhq" if domain == "faces" else "none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = NestedEncoder(config)
    if init_from_unet:
        attn2 = attn2_modules(frozen.base.diffusion_model)
        encoder.init_from_unet(
            [attn2[layer.key].to_k.weight.float().cpu() for layer in frozen.layers],
            [attn2[layer.key].to_v.weight.float().cpu() for layer in frozen.layers],
        )
    return encoder


def enable_gradient_checkpointing(diffusion_model: nn.Module) -> int:
    """Recompute every ResBlock and SpatialTransformer of the frozen UNet in the backward pass.

    Non-reentrant torch checkpointing, so gradients reach the encoder through the attention patch
    (whose subject tokens are captured, not passed). ComfyUI mutates `transformer_options` while it
    walks the blocks ("block", "block_index"), so each call gets a snapshot of it: the recomputation
    must see the same layer keys as the forward. Returns the number of wrapped modules.
    """
    blocks = (comfy.ldm.modules.diffusionmodules.openaimodel.ResBlock, comfy.ldm.modules.attention.SpatialTransformer)
    wrapped = 0
    for module in diffusion_model.modules():
        if isinstance(module, blocks):
            if getattr(module, "_nested_checkpointed", False):
                continue
            original = module.forward

            def forward(*args, _original=original, **kwargs):
                if not torch.is_grad_enabled():
                    return _original(*args, **kwargs)
                args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
                kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
                return checkpoint(_original, *args, use_reentrant=False, **kwargs)

            module.forward = forward
            module._nested_checkpointed = True
            wrapped += 1
    return wrapped


# ------------------------------------------------------------------------------------------------
# Text: ComfyUI's tokenizer and text encoders, the subject word located as the nodes locate it


class TextEncoder:
    """Captions -> SDXL context (B, 77, 2048), pooled (B, 1280) and the subject token's positions.

    Each caption is encoded as ComfyUI's CLIPTextEncode does (clip.tokenize, encode_from_tokens),
    truncated to its first 77-token chunk so a batch shares one context length. With `cache`,
    each distinct caption is encoded once (for data sets with few distinct captions, e.g. templates).
    """

    MAX_CACHE = 50_000

    def __init__(self, clip: Any, token: str, cache: bool = False):
        self.clip, self.token, self.cache = clip, token, cache
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]] = {}
        self._warned: set[str] = set()
        self.stream = glue_words.subject_stream(clip.tokenize(token))  # the stream the nodes search
        self.word_ids = glue_words.word_token_ids(clip, token, self.stream)
        if not self.word_ids:
            raise ValueError(f"the subject token {token!r} encodes to no tokens; choose a plain word")

    def positions(self, tokens: dict) -> tuple[int, ...]:
        """The token's positions in `clip.tokenize(..., return_word_ids=True)` (chunks may be cut short):
        the nodes' rule and stream (`nested_attention_comfy.words`); () when the caption lacks the token."""
        return glue_words.word_positions(self.clip, tokens[self.stream], self.word_ids, self.stream)

    @torch.no_grad()
    def encode_one(self, caption: str) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        if caption in self._cache:
            return self._cache[caption]
        tokens = self.clip.tokenize(caption, return_word_ids=True)
        if any(len(chunks) > 1 for chunks in tokens.values()) and caption not in self._warned:
            self._warned.add(caption)
            log.warning("%s caption longer than 75 tokens, truncated for training: %r", PREFIX, caption[:120])
        tokens = {k: v[:1] for k, v in tokens.items()}
        cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
        out = (cond[0].float().cpu(), pooled[0].float().cpu(), self.positions(tokens))
        if self.cache and len(self._cache) < self.MAX_CACHE:
            self._cache[caption] = out
        return out

    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, ...]]]:
        encoded = {c: self.encode_one(c) for c in dict.fromkeys(captions)}  # each distinct caption once
        context = torch.stack([encoded[c][0] for c in captions])  # (B, 77, 2048)
        pooled = torch.stack([encoded[c][1] for c in captions])  # (B, 1280)
        return context, pooled, [encoded[c][2] for c in captions]


def sdxl_adm(base: Any, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """SDXL's vector conditioning y (B, 2816) per row: ComfyUI's encode_adm with each row's time ids."""
    rows = []
    for p, t in zip(pooled, time_ids.tolist()):
        height, width, top, left, target_h, target_w = t
        rows.append(
            base.encode_adm(
                pooled_output=p[None],
                height=height,
                width=width,
                crop_h=top,
                crop_w=left,
                target_height=target_h,
                target_width=target_w,
            )
        )
    return torch.cat(rows)


# ------------------------------------------------------------------------------------------------
# The trainable module


def align_subjects(
    context: torch.Tensor, positions: Sequence[tuple[int, ...]], keep: torch.Tensor
) -> tuple[torch.Tensor, list[tuple[tuple[int, ...], torch.Tensor]]]:
    """Move each row's subject token(s) to shared positions; returns (context, [(positions, rows (B,))]).

    A SubjectBinding has one positions tuple, but captions place the token differently. The UNet's
    cross-attention is invariant to a permutation of the text tokens (keys and values are per-token
    projections, with no positional term), so permuting a row's context so that its subject sits at
    the batch's shared position changes nothing but which index the patch reads: one binding (one
    K~/V~ projection per layer) serves the whole batch. Rows whose captions hold the token a
    different number of times get a binding of their own. Rows with the subject dropped, or whose
    caption lacks the token, are in no binding. With no binding at all, one with no rows (weight 0,
    bit-identical to no subject) keeps the graph connected, so every rank of a distributed run
    produces (zero) gradients for every parameter.
    """
    context = context.clone()
    canonical: dict[int, tuple[int, ...]] = {}  # occurrence count -> shared positions
    rows: dict[int, torch.Tensor] = {}
    for row, pos in enumerate(positions):
        if not pos or not bool(keep[row]):
            continue
        pos = tuple(sorted(pos))
        target = canonical.setdefault(len(pos), pos)
        rows.setdefault(len(pos), torch.zeros(len(positions), dtype=torch.bool))[row] = True
        if pos != target:
            perm = list(range(context.shape[1]))  # new index -> old index
            for p, c in zip(pos, target):
                a = perm.index(p)
                perm[a], perm[c] = perm[c], perm[a]
            context[row] = context[row, perm]
    groups = [(canonical[k], rows[k]) for k in sorted(canonical)]
    if not groups:
        groups = [((1,), torch.zeros(len(positions), dtype=torch.bool))]
    return context, groups


class NestedTrainingModule(nn.Module):
    """What accelerate wraps: the encoder (the only parameters) and a forward through the frozen UNet.

    The whole prediction happens inside forward, so distributed data parallel sees every use of
    the encoder's parameters. The UNet is held outside the module tree: it is neither trained,
    synchronized, nor saved with the training state.
    """

    def __init__(self, encoder: NestedEncoder, base: Any):
        super().__init__()
        self.encoder = encoder
        self.__dict__["base"] = base  # comfy.model_base.SDXL, deliberately not a submodule

    def forward(
        self,
        clip_tokens: torch.Tensor,
        x_noisy: torch.Tensor,
        sigmas: torch.Tensor,
        context: torch.Tensor,
        adm: torch.Tensor,
        groups: Sequence[tuple[tuple[int, ...], torch.Tensor]],
    ) -> torch.Tensor:
        """The UNet's noise prediction eps (B, 4, h, w) for x_noisy = x0 + sigma * noise, with subjects."""
        tokens = self.encoder.encode(clip_tokens)  # (B, M, C), with gradients
        bindings = [
            SubjectBinding(
                encoder=self.encoder,
                tokens=tokens,
                positions=tuple(pos),
                prompt_tokens=CHUNK,
                rows=rows.to(tokens.device),
                cache=False,
                name=f"train{pos}",
            )
            for pos, rows in groups
        ]
        patches = glue_model.attn2_patches(self.encoder.layers, bindings)  # as the nodes install them
        denoised = self.base.apply_model(
            x_noisy,
            sigmas,
            c_crossattn=context,
            y=adm,
            transformer_options={"patches_replace": {"attn2": patches}},
        )
        # ComfyUI's EPS parameterization: denoised = x_noisy - sigma * eps.
        return (x_noisy - denoised) / sigmas.view(-1, 1, 1, 1)


# ------------------------------------------------------------------------------------------------
# EMA of the encoder's weights


class EMA:
    """Exponential moving average of parameters, registered with accelerate so save_state keeps it."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().clone().float() for name, p in module.named_parameters()}
        self.num_updates = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.num_updates += 1
        decay = min(
            self.decay, (1 + self.num_updates) / (10 + self.num_updates)
        )  # warm-up, as diffusers' EMAModel
        for name, p in module.named_parameters():
            shadow = self.shadow[name]
            if shadow.device != p.device:
                self.shadow[name] = shadow = shadow.to(p.device)
            shadow.lerp_(p.detach().float(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for name, p in module.named_parameters():
            p.copy_(self.shadow[name].to(p.device, p.dtype))

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow": {k: v.cpu() for k, v in self.shadow.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        self.shadow = {k: v.clone().float() for k, v in state["shadow"].items()}
