"""Models with random weights built with ComfyUI's own classes, and a generated data set.

The one home of the model builders: the trainer's `--domain tiny` preset, the test bed
(tests/tiny_models.py re-exports them) and the benchmark (`benchmark/`) all build from here.

Tiny models, for the tiny preset and for tests: everything runs on the CPU in seconds. A UNet with
SDXL's block structure and context width 2048 (docs/ARCHITECTURE.md §5.9), SDXL's two CLIP text
encoders with their real hidden sizes and tokenizer but three layers, a small CLIP vision tower,
and a small KL autoencoder with SDXL's 8x downscale and 4 latent channels. Builders are
deterministic given a seed: ComfyUI's ops skip weight initialization (parameters come from
torch.empty), so every parameter is initialized here from a seeded generator.

Full-size models, for the benchmark: any SDXL-shaped UNet config on a device or on the meta device,
ViT-H/14 CLIP vision and NestedEncoders, filled in seconds by tiling one seeded pool of normals
(`fill_parameters_`; drawing 2.6 B values one by one takes about a minute).

ComfyUI is set up and imported when a builder first needs it (`training.comfy_env.comfy_module`).
"""

from __future__ import annotations

import json
import math
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from nested_attention import ClipVisionSpec, EncoderConfig, LayerSpec, NestedEncoder, QFormerConfig
from training.comfy_env import comfy_module
from training.presets import PRESETS

comfy = comfy_module("comfy")  # imported on first use: importing this module loads no ComfyUI

# ------------------------------------------------------------------------------------------------
# Configs

# SDXL's block structure at 1/10 of the width: the same input/middle/output layout of transformer
# blocks (fewer per block), context 2048 and pooled+time ids 2816 exactly as SDXL. 15.7 M parameters.
TINY_SDXL_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "channel_mult": [1, 2, 4],
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 1, 1, 2, 2],
    "transformer_depth_middle": 2,
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2],
    "num_head_channels": 16,
    "num_heads": -1,
    "context_dim": 2048,
    "adm_in_channels": 2816,
    "use_linear_in_transformer": True,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

# The real SDXL base UNet (comfy/model_detection.py, unet_config_from_diffusers_unet's SDXL entry).
SDXL_UNET_CONFIG = {
    **TINY_SDXL_UNET_CONFIG,
    "model_channels": 320,
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_middle": 10,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "num_head_channels": 64,
}

# Overrides of ComfyUI's clip_l / clip_g JSON configs, applied by SDClipModel through
# model_options["clip_l_model_config"] / ["clip_g_model_config"]. Hidden sizes and the vocabulary
# stay real (768 + 1280 = 2048 context, 1280 pooled). Three layers because SDXL reads the
# penultimate layer and SDClipModel asserts abs(layer_idx) < num_layers.
TINY_CLIP_L_OVERRIDES = {"num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 64}
TINY_CLIP_G_OVERRIDES = {"num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 64}

# A small ViT in the format of ComfyUI's clip_vision_config_*.json files.
TINY_CLIP_VISION_CONFIG = {
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "hidden_act": "gelu",
    "hidden_size": 64,
    "image_size": 32,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model",
    "num_attention_heads": 4,
    "num_channels": 3,
    "num_hidden_layers": 2,
    "patch_size": 8,
    "projection_dim": 32,
    "torch_dtype": "float32",
}
TINY_CLIP_VISION_NAME = "tiny-clip-vision (built in)"

# SDXL's VAE layout (4 latent channels, 8x downscale: three downsamples) at a fraction of the width.
TINY_VAE_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 128,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}

# ------------------------------------------------------------------------------------------------
# Initialization

_NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm)
_PROJECTIONS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


@torch.no_grad()
def _initialize(module: torch.nn.Module, draw: Callable[[torch.Tensor, float], None]) -> None:
    """The one initialization rule of every builder here (ComfyUI's ops leave parameters empty); `draw(param,
    std)` fills a parameter with N(0, std^2) values.

    Norms: weight 1, bias 0. Linear/conv weights: N(0, 1/fan_in), so that activations keep unit scale
    through the stack (no overflow in float16, no denormals on the CPU) and every input (text, time, image)
    visibly moves the output; their biases N(0, 0.02). Embedding tables N(0, 1), anything else N(0, 0.02).
    """
    for sub in module.modules():
        for name, param in sub.named_parameters(recurse=False):
            if isinstance(sub, _NORMS):
                param.fill_(1.0 if name == "weight" else 0.0)
            elif isinstance(sub, _PROJECTIONS) and name == "weight":
                draw(param, param[0].numel() ** -0.5)
            else:
                draw(param, 1.0 if isinstance(sub, torch.nn.Embedding) else 0.02)


def init_parameters(module: torch.nn.Module, seed: int) -> None:
    """Initialize every parameter of `module` deterministically (`_initialize`), each value drawn: in float32
    on the CPU, then cast, so the result does not depend on the module's device or dtype."""
    generator = torch.Generator().manual_seed(seed)

    def draw(param: torch.Tensor, std: float) -> None:
        # In place, and copy_ casts: the same values as `(randn * std).to(param)`, without two more temporaries.
        param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32).mul_(std))

    _initialize(module, draw)


# ------------------------------------------------------------------------------------------------
# Builders


def _sdxl_model_config(unet_config: dict, dtype: torch.dtype | None, manual_cast_dtype: torch.dtype | None):
    model_config = comfy.supported_models.SDXL(unet_config)
    # BASE.__init__ overwrites num_heads / num_head_channels with SDXL's unet_extra_config (-1, 64);
    # put the requested ones back (a no-op for the real config).
    model_config.unet_config["num_heads"] = unet_config["num_heads"]
    model_config.unet_config["num_head_channels"] = unet_config["num_head_channels"]
    model_config.set_inference_dtype(dtype, manual_cast_dtype)
    return model_config


def sdxl_model(unet_config: dict, device: torch.device, dtype: torch.dtype | None,
               manual_cast_dtype: torch.dtype | None = None):
    """comfy.model_base.SDXL from a UNet config, with empty weights on `device` (meta: no memory), as
    comfy.sd.load_state_dict_guess_config builds it; every UNet builder here starts from it."""
    return _sdxl_model_config(unet_config, dtype, manual_cast_dtype).get_model({}, "", device=device)


def tiny_sdxl_unet(seed: int = 0, dtype: torch.dtype | None = None, *,
                   inpaint: bool = False) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher around a tiny SDXL-shaped UNet, built as comfy.sd.load_state_dict_guess_config does.

    `dtype=None` lets ComfyUI choose as for a checkpoint (float32 on the CPU). `inpaint`: the layout of an
    SDXL inpainting checkpoint, 9 input channels (the noisy latent, the mask, the masked image's latent);
    ComfyUI's SDXL class then concatenates the mask and masked image itself (`BaseModel.set_inpaint`).
    """
    load_device = comfy.model_management.get_torch_device()
    supported = comfy.supported_models.SDXL.supported_inference_dtypes
    if dtype is None:
        dtype = comfy.model_management.unet_dtype(model_params=15_700_000, supported_dtypes=supported)
    manual_cast_dtype = comfy.model_management.unet_manual_cast(dtype, load_device, supported)
    config = {**TINY_SDXL_UNET_CONFIG, "in_channels": 9} if inpaint else TINY_SDXL_UNET_CONFIG
    model = sdxl_model(config, torch.device("cpu"), dtype, manual_cast_dtype)
    init_parameters(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(
        model, load_device=load_device, offload_device=comfy.model_management.unet_offload_device()
    )


def full_sdxl_unet_meta(dtype: torch.dtype = torch.float16):
    """The full-size SDXL base model (comfy.model_base.SDXL, 2.567 B UNet parameters) on the meta device.

    For structure checks and FLOP counting only: no memory, no values. `.diffusion_model` is the UNet.
    """
    return sdxl_model(SDXL_UNET_CONFIG, torch.device("meta"), dtype)


def tiny_sdxl_clip(seed: int = 0, dtype: torch.dtype | None = None) -> comfy.sd.CLIP:
    """A comfy.sd.CLIP for SDXL: ComfyUI's SDXL tokenizer and text model classes, three-layer encoders.

    Conditioning is (B, 77 * chunks, 2048) with pooled_output (B, 1280), as for real SDXL.
    `dtype=None` lets ComfyUI choose (float16 weights on the CPU, computed in float32).
    """
    target = comfy.supported_models_base.ClipTarget(
        comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel
    )
    model_options = {
        "clip_l_model_config": dict(TINY_CLIP_L_OVERRIDES),
        "clip_g_model_config": dict(TINY_CLIP_G_OVERRIDES),
    }
    if dtype is not None:
        model_options["dtype"] = dtype
    clip = comfy.sd.CLIP(target, model_options=model_options)
    model = clip.cond_stage_model
    key = (seed, dtype)  # None: ComfyUI's choice, the same for the whole process
    if key not in _CLIP_STATES:
        init_parameters(model, seed)
        _CLIP_STATES[key] = {name: t.detach().clone() for name, t in model.state_dict().items()}
    else:
        model.load_state_dict(_CLIP_STATES[key])  # copies: the values init_parameters draws, bit for bit
    return clip


# The tiny text encoders' values per (seed, dtype asked for), kept for the process's later builds: their SDXL-sized token
# tables (49408 x 768 and x 1280) take most of a second to draw, and a test session or a forked trainer builds
# them again and again (every run of the tiny preset). 0.2 GB (float16) or 0.4 GB (float32) per entry.
_CLIP_STATES: dict[tuple[int, torch.dtype | None], dict[str, torch.Tensor]] = {}


def tiny_clip_vision(
    seed: int = 0,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    image_size: int = 32,
    patch_size: int = 8,
    projection_dim: int = 32,
) -> comfy.clip_vision.ClipVisionModel:
    """A comfy.clip_vision.ClipVisionModel with a tiny ViT.

    encode_image(images (B, H, W, 3) in [0, 1])["last_hidden_state"] is
    (B, 1 + (image_size // patch_size) ** 2, hidden). ComfyUI's file loader (comfy.clip_vision.load)
    picks its config from the layer count of known towers (ViT-L/H/bigG, SigLIP, DINOv2), so a tiny
    tower cannot round-trip through a file: use this object directly.
    """
    config = {
        **TINY_CLIP_VISION_CONFIG,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": 2 * hidden,
        "image_size": image_size,
        "patch_size": patch_size,
        "projection_dim": projection_dim,
    }
    with tempfile.TemporaryDirectory(prefix="nested-attention-") as tmp:
        path = Path(tmp) / "clip_vision_tiny.json"
        path.write_text(json.dumps(config))
        clip_vision = comfy.clip_vision.ClipVisionModel(str(path))
    init_parameters(clip_vision.model, seed)
    return clip_vision


def tiny_vae(seed: int = 0) -> comfy.sd.VAE:
    """A comfy.sd.VAE around a small KL autoencoder: 4 latent channels, 8x downscale, like SDXL's VAE."""
    params = {"ddconfig": dict(TINY_VAE_DDCONFIG), "embed_dim": 4}
    model = comfy.ldm.models.autoencoder.AutoencoderKL(**params)
    init_parameters(model, seed)
    state = {k: v.float() for k, v in model.state_dict().items()}
    return comfy.sd.VAE(sd=state, config={"params": params}, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# Random weights at full size (the benchmark): any SDXL-shaped config, on a device or on meta


POOL = 1_000_003  # prime length of the random pool weights are tiled from (see fill_parameters_)


def fill_parameters_(module: torch.nn.Module, seed: int) -> None:
    """Deterministic random weights in seconds for billions of parameters, by the same rule (`_initialize`).

    Drawing 2.6 B normals takes about a minute on two CPU cores; tiling one seeded pool of POOL
    normals is memory-speed. Parameters on the meta device are left alone.
    """
    pool, offset = None, 0

    def draw(param: torch.Tensor, std: float) -> None:
        nonlocal pool, offset
        if param.device.type == "meta":
            return
        if pool is None or pool.device != param.device:
            pool = torch.randn(POOL, generator=torch.Generator().manual_seed(seed)).to(param.device)
        flat = param.view(-1)
        done, start = 0, offset % POOL
        while done < flat.numel():
            take = min(flat.numel() - done, POOL - start)
            flat[done : done + take].copy_(pool[start : start + take]).mul_(std)
            done, start = done + take, 0
        offset += 7919  # every tensor starts elsewhere in the pool

    _initialize(module, draw)


def tiny_qformer() -> QFormerConfig:
    """The tiny preset's Q-Former (M = 16), for smoke runs of the benchmark on the tiny models."""
    return PRESETS["tiny"].qformer


def sdxl_unet_config(tiny: bool = False) -> dict:
    """The real SDXL base UNet config (ComfyUI's model_detection entry), or the tiny SDXL-shaped one."""
    return dict(TINY_SDXL_UNET_CONFIG if tiny else SDXL_UNET_CONFIG)


def build_unet(config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A ModelPatcher around comfy.model_base.SDXL built from `config`; random weights unless on meta."""
    model = sdxl_model(config, device, dtype)
    if device.type != "meta":
        fill_parameters_(model.diffusion_model, seed)
        model.model_sampling.to(device)
    model.eval().requires_grad_(False)
    home = torch.device("cpu") if device.type == "meta" else device
    return comfy.model_patcher.ModelPatcher(model, load_device=home, offload_device=home)


def build_encoder(
    num_tokens: int,
    layers: Sequence[LayerSpec],
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    qformer: QFormerConfig | None = None,
    projections: torch.nn.Module | None = None,
    clip_vision: ClipVisionSpec | None = None,
) -> NestedEncoder:
    """A NestedEncoder with random weights (QFormerConfig defaults: the real Q-Former), in eval mode.

    `projections`: share another encoder's per-layer W_K~/W_V~ (they do not depend on M), which saves
    1.4 GB of float32 when both M are benchmarked. `clip_vision`: the tower it reads (default ViT-H/14).
    """
    qformer = replace(qformer or QFormerConfig(), num_queries=num_tokens)
    config = EncoderConfig(qformer=qformer, layers=tuple(layers), clip_vision=clip_vision or ClipVisionSpec())
    with torch.device("meta"):
        encoder = NestedEncoder(config)
    if projections is not None:
        encoder.projections = projections
    encoder.qformer.to_empty(device=device).to(dtype)
    fill_parameters_(encoder.qformer, seed)
    if projections is None:
        encoder.projections.to_empty(device=device).to(dtype)
        fill_parameters_(encoder.projections, seed + 1)
    return encoder.eval().requires_grad_(False)


def clip_vision_h(device: torch.device, seed: int = 0):
    """A comfy.clip_vision.ClipVisionModel with ComfyUI's ViT-H/14 config, random weights."""
    config = Path(comfy.clip_vision.__file__).with_name("clip_vision_config_h.json")
    clip_vision = comfy.clip_vision.ClipVisionModel(str(config))
    fill_parameters_(clip_vision.model, seed)
    return clip_vision


# ------------------------------------------------------------------------------------------------
# Generated data: "pets" that are coloured shapes on white, input == target (the paper's pets setup)

_COLOURS = [
    (220, 40, 40),
    (40, 160, 60),
    (40, 80, 220),
    (230, 180, 20),
    (150, 60, 200),
    (20, 180, 190),
    (240, 120, 30),
    (90, 90, 90),
]
_SHAPES = ["circle", "square", "triangle", "diamond"]
_SCENES = ["", "on the beach", "in the snow", "on a sofa", "in a garden"]


def make_tiny_dataset(folder: str | Path, count: int = 16, size: int = 128, seed: int = 0) -> Path:
    """Write `count` PNG "pets" (a coloured shape on white) with sidecar captions into `folder`.

    Idempotent: an existing complete data set is kept. Returns the folder.
    """
    folder = Path(folder)
    done = folder / ".complete"
    if done.is_file() and done.read_text().strip() == f"{count} {size} {seed}":
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        image = Image.new("RGB", (size, size), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        colour = _COLOURS[i % len(_COLOURS)]
        shape = _SHAPES[(i // len(_COLOURS)) % len(_SHAPES)]
        r = size * rng.uniform(0.22, 0.32)
        cx, cy = size / 2 + rng.uniform(-0.1, 0.1) * size, size / 2 + rng.uniform(-0.1, 0.1) * size
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            turn = 0.0 if shape == "triangle" else math.pi / 4
            corners = 3 if shape == "triangle" else 4
            points = [
                (
                    cx + r * math.sin(turn + 2 * math.pi * k / corners),
                    cy - r * math.cos(turn + 2 * math.pi * k / corners),
                )
                for k in range(corners)
            ]
            draw.polygon(points, fill=colour)
        image.save(folder / f"pet-{i:03d}.png")
        scene = _SCENES[i % len(_SCENES)]
        (folder / f"pet-{i:03d}.txt").write_text(f"a photo of a {shape} pet {scene}".strip() + "\n")
    done.write_text(f"{count} {size} {seed}")
    return folder
