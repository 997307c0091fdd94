"""Test bed: ComfyUI as a library on the CPU, and tiny SDXL-shaped models built with its own classes.

Importing tiny_models first puts ComfyUI ($COMFYUI_PATH, else .comfyui/ComfyUI) at the front of
sys.path, turns off its argv parsing and selects the CPU when there is no CUDA GPU, before anything
imports comfy.model_management.
"""

from __future__ import annotations

import tiny_models  # isort: skip  (must stay the first import: it sets ComfyUI up)
import os

import pytest
import torch

# The tiny models gain little from intra-op threads, and OpenMP threads that spin for a busy CPU make
# them many times slower on a shared machine (4 Euler steps: 69 s with 2 threads, 13 s with 1, measured
# on a loaded 2-core box). Set OMP_NUM_THREADS to choose otherwise.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def _tiny_unet_shared():
    return tiny_models.tiny_sdxl_unet(seed=0)


@pytest.fixture
def tiny_unet(_tiny_unet_shared):
    """A fresh clone of the tiny SDXL UNet's ModelPatcher (weights shared, patches and options not)."""
    return _tiny_unet_shared.clone()


@pytest.fixture(scope="session")
def _tiny_clip_shared():
    return tiny_models.tiny_sdxl_clip(seed=0)


@pytest.fixture
def tiny_clip(_tiny_clip_shared):
    """A fresh clone of the tiny SDXL comfy.sd.CLIP (real tokenizer; context 2048, pooled 1280)."""
    return _tiny_clip_shared.clone()


@pytest.fixture(scope="session")
def tiny_clip_vision():
    """A tiny comfy.clip_vision.ClipVisionModel: last_hidden_state (B, 17, 64) for 32x32 inputs."""
    return tiny_models.tiny_clip_vision(seed=0)


@pytest.fixture
def sample():
    """tiny_models.sample: ComfyUI's real sampler (Euler, normal, cfg 5) from an empty latent."""
    return tiny_models.sample


@pytest.fixture
def encode():
    """tiny_models.encode_text: conditioning as the CLIPTextEncode node makes it."""
    return tiny_models.encode_text


# Fixtures of the node tests (the pack loaded as ComfyUI loads it, tiny encoder files).
from pack_helpers import load_handle, models_folder, pack, person, pet, save_tiny_encoder  # noqa: F401
