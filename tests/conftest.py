"""Test bed: ComfyUI as a library on the CPU, and tiny SDXL-shaped models built with its own classes.

ComfyUI is set up (tiny_models: $COMFYUI_PATH, else .comfyui/ComfyUI, put at the front of sys.path, its
argv parsing off, the CPU selected when there is no CUDA GPU) only for the tests that need it, before
anything imports comfy.model_management:

- before a test module is imported, when its own import statements reach beyond the core (`needs_comfyui`);
- by the fixtures that build ComfyUI models (tiny_unet, tiny_clip, ...), whoever asks for them.

A core test module (test_attention, test_tokens, test_encoder_weights, ...) imports only the core, the standard
library and third-party libraries, and runs without ComfyUI imported (tests/test_layers.py proves it).
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import pytest
import torch

# Fixtures of the node tests (the pack loaded as ComfyUI loads it, tiny encoder files); importing them loads no
# ComfyUI (pack_helpers imports ComfyUI's modules when a fixture runs).
from pack_helpers import load_handle, models_folder, pack, person, pet, save_tiny_encoder  # noqa: F401

# The tiny models gain little from intra-op threads, and OpenMP threads that spin for a busy CPU make
# them many times slower on a shared machine (4 Euler steps: 69 s with 2 threads, 13 s with 1, measured
# on a loaded 2-core box). Set OMP_NUM_THREADS to choose otherwise.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

# What a core test module may import and still run without ComfyUI: the core, the standard library, these
# libraries, and the tests' helpers that need no ComfyUI.
WITHOUT_COMFYUI = {"nested_attention", "torch", "numpy", "PIL", "pytest", "safetensors", "einops", "weight_layouts"}
WITHOUT_COMFYUI |= set(sys.stdlib_module_names)


def needs_comfyui(path: Path) -> bool:
    """Whether the test module at `path` imports anything beyond WITHOUT_COMFYUI (read with ast, not run)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if not node.level else ["."]
        else:
            continue
        if any(name.split(".")[0] not in WITHOUT_COMFYUI for name in names):
            return True
    return False


def pytest_collectstart(collector):
    """Set ComfyUI up before a test module that needs it is imported (its imports may import comfy at once).
    Called just before a collector collects, which for a module is when it is imported: modules that are not
    run are never imported."""
    if isinstance(collector, pytest.Module) and needs_comfyui(collector.path):
        import tiny_models  # noqa: F401  (puts ComfyUI on sys.path and sets it up, once)


def pytest_collection_modifyitems(session, config, items):
    """Do not import the repo root's __init__.py as a test package. The repo root is the ComfyUI pack: its
    __init__.py registers models folders with ComfyUI and imports the nodes, which is ComfyUI's job (the
    node tests load it as ComfyUI does, tests/pack.py); it holds no test set-up. pytest would import it
    before every test because the repo root, which holds it, is pytest's rootdir."""
    for item in items:
        for node in item.listchain():
            if isinstance(node, pytest.Package) and node.path == config.rootpath:
                node.setup = lambda: None


@pytest.fixture(scope="session")
def _tiny_unet_shared():
    import tiny_models  # sets ComfyUI up, as every fixture's import of it does

    return tiny_models.tiny_sdxl_unet(seed=0)


@pytest.fixture
def tiny_unet(_tiny_unet_shared):
    """A fresh clone of the tiny SDXL UNet's ModelPatcher (weights shared, patches and options not)."""
    return _tiny_unet_shared.clone()


@pytest.fixture(scope="session")
def _tiny_clip_shared():
    import tiny_models

    return tiny_models.tiny_sdxl_clip(seed=0)


@pytest.fixture
def tiny_clip(_tiny_clip_shared):
    """A fresh clone of the tiny SDXL comfy.sd.CLIP (real tokenizer; context 2048, pooled 1280)."""
    return _tiny_clip_shared.clone()


@pytest.fixture(scope="session")
def tiny_clip_vision():
    """A tiny comfy.clip_vision.ClipVisionModel: last_hidden_state (B, 17, 64) for 32x32 inputs."""
    import tiny_models

    return tiny_models.tiny_clip_vision(seed=0)


@pytest.fixture
def sample():
    """tiny_models.sample: ComfyUI's real sampler (Euler, normal, cfg 5) from an empty latent."""
    import tiny_models

    return tiny_models.sample


@pytest.fixture
def encode():
    """tiny_models.encode_text: conditioning as the CLIPTextEncode node makes it."""
    import tiny_models

    return tiny_models.encode_text
