"""Tiny SDXL-shaped models built with ComfyUI's own classes, for tests (and the trainer's tiny preset).

Everything runs on the CPU in seconds: a UNet with SDXL's block structure and context width 2048,
SDXL's two CLIP text encoders with 768 + 1280 hidden sizes but three layers, and a small CLIP
vision tower. Builders are deterministic given a seed. ComfyUI's ops skip weight initialization
(parameters come from torch.empty), so every parameter is initialized from a seeded generator. The
builders live in training/tiny/models.py (the trainer's `--domain tiny` preset uses them) and are
re-exported here under the same names.

Importing this module makes ComfyUI importable (see `setup_comfy`); the pytest conftest imports it
first, before anything else can import `comfy`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

# One way to find and set up ComfyUI as a library, shared with the trainer.
from training.comfy_env import find_comfyui, setup_comfy  # noqa: F401

setup_comfy()

import comfy.clip_vision
import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.sd
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models
import comfy.supported_models_base

# ------------------------------------------------------------------------------------------------
# Configs and builders: shared with the trainer's `--domain tiny` preset, which lives in training/tiny/models.py
# (same names, same seeds, so a test can rebuild exactly the models a tiny training run used).
from training.tiny.models import (  # noqa: F401
    SDXL_UNET_CONFIG,
    TINY_CLIP_G_OVERRIDES,
    TINY_CLIP_L_OVERRIDES,
    TINY_CLIP_VISION_CONFIG,
    TINY_SDXL_UNET_CONFIG,
    TINY_VAE_DDCONFIG,
    full_sdxl_unet_meta,
    init_parameters,
    make_tiny_dataset,
    sdxl_model,
    tiny_clip_vision,
    tiny_sdxl_clip,
    tiny_sdxl_unet,
    tiny_vae,
)


def tiny_sd15_clip(seed: int = 0) -> comfy.sd.CLIP:
    """A comfy.sd.CLIP for SD1.5: ComfyUI's SD1 tokenizer and CLIP-L text model, three layers.

    Conditioning is (B, 77 * chunks, 768): what a user wires in by taking the CLIP of an SD1.5 checkpoint.
    """
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, model_options={"clip_l_model_config": dict(TINY_CLIP_L_OVERRIDES)})
    init_parameters(clip.cond_stage_model, seed)
    return clip


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


def accelerate_launch(module: str, args: list, processes: int = 2) -> subprocess.CompletedProcess:
    """`python -m module args` under `accelerate launch --multi_gpu` with `processes` CPU processes, from the
    repo root (so the repo's packages are imported), one thread each; returns the finished process."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(repo)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", module, *[str(a) for a in args]]
    return subprocess.run(command, check=False, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
