"""Tiny SDXL-shaped models built with ComfyUI's own classes, for tests (and the trainer's tiny preset).

Everything runs on the CPU in seconds: a UNet with SDXL's block structure and context width 2048,
SDXL's two CLIP text encoders with 768 + 1280 hidden sizes but three layers, and a small CLIP
vision tower. Builders are deterministic given a seed. ComfyUI's ops skip weight initialization
(parameters come from torch.empty), so every parameter is initialized from a seeded generator. The
builders live in training/tiny.py (the trainer's `--domain tiny` preset uses them) and are
re-exported here under the same names.

Importing this module makes ComfyUI importable (see `setup_comfy`); the pytest conftest imports it
first, before anything else can import `comfy`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def find_comfyui() -> Path:
    """ComfyUI's folder: $COMFYUI_PATH, else the ComfyUI this repo sits in, else `.comfyui/ComfyUI`."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        candidates = [Path(env).expanduser()]
    else:
        candidates = [here.parent.parent for here in (Path(os.path.abspath(__file__)).parents[1], REPO)
                      if here.parent.name == "custom_nodes"]
        candidates.append(REPO / ".comfyui" / "ComfyUI")
    for path in candidates:
        if (path / "comfy" / "model_management.py").is_file():
            return path.resolve()
    raise RuntimeError(
        f"ComfyUI not found (looked in {', '.join(str(p) for p in candidates)}). "
        "Run the tests with `python3 dev.py test`, which installs it, or set COMFYUI_PATH to a ComfyUI."
    )


def setup_comfy() -> Path:
    """Make `comfy` importable as a library: ComfyUI first on sys.path, no argv parsing, CPU if no GPU.

    Must run before anything imports `comfy.model_management`, which reads the arguments once.
    Idempotent.
    """
    path = str(find_comfyui())
    # First on sys.path: ComfyUI's own top-level modules (nodes, folder_paths, ...) must win over
    # anything with the same name, e.g. this repo's `nodes/` package.
    while path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)

    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    if not torch.cuda.is_available():
        if "comfy.model_management" in sys.modules and not comfy.cli_args.args.cpu:
            logging.getLogger(__name__).warning(
                "[nested-attention] comfy.model_management was imported before setup_comfy(); "
                "--cpu cannot take effect any more"
            )
        comfy.cli_args.args.cpu = True
    return Path(path)


setup_comfy()

import comfy.clip_vision
import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.sd
import comfy.sdxl_clip
import comfy.supported_models
import comfy.supported_models_base

# ------------------------------------------------------------------------------------------------
# Configs and builders: shared with the trainer's `--domain tiny` preset, which lives in training/tiny.py
# (same names, same seeds, so a test can rebuild exactly the models a tiny training run used).

from training.tiny import (  # noqa: E402,F401
    SDXL_UNET_CONFIG,
    TINY_CLIP_G_OVERRIDES,
    TINY_CLIP_L_OVERRIDES,
    TINY_CLIP_VISION_CONFIG,
    TINY_SDXL_UNET_CONFIG,
    TINY_VAE_DDCONFIG,
    _sdxl_model_config,
    full_sdxl_unet_meta,
    init_parameters,
    make_tiny_dataset,
    tiny_clip_vision,
    tiny_sdxl_clip,
    tiny_sdxl_unet,
    tiny_vae,
)


# ------------------------------------------------------------------------------------------------
# Using them


def encode_text(clip: comfy.sd.CLIP, text: str) -> list:
    """Conditioning for `text`, exactly as ComfyUI's CLIPTextEncode node makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def sample(model, positive: list, negative: list, seed: int, steps: int = 4, size: int = 32,
           cfg: float = 5.0) -> torch.Tensor:
    """Run ComfyUI's real sampler (Euler, normal schedule) from an empty (1, 4, size, size) latent.

    Returns the denoised latent, as KSampler would pass it on.
    """
    latent = torch.zeros(1, 4, size, size)
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(
        model, noise, steps, cfg, "euler", "normal", positive, negative, latent, seed=seed, disable_pbar=True
    )
