"""A ComfyUI base directory for the tiny models: this pack, the test-only pack, and real encoder files.

The encoder files are sized for the tiny UNet, in the pack's own format and in IP-Adapter Plus's layout, so
the real Load Nested Encoder node loads and validates them. Shared by the e2e suite's server
(tests/e2e/conftest.py) and the soak (tests/e2e/soak.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from harness import (
    FACES_ENCODER,
    PACK_NAME,
    PETS_ENCODER,
    REPO,
    TINY_PACK_DIR,
    TINY_PACK_NAME,
    prepare_base_dir,
)
from pack_helpers import TINY_CLIP_VISION_SPEC, tiny_encoder
from weight_layouts import TINY_IP_ADAPTER_NUMBERS, ip_adapter_plus_keys, plausible_values, write_safetensors

from nested_attention import save_encoder, unet_layers

# The workflow tool beside dev.py (devtools/workflows.py) names the files the shipped workflows use. Appended,
# so that ComfyUI's own top-level modules (its `nodes`) keep priority over the repo's folders.
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))
from devtools.workflows import CLIP_VISION, IPADAPTER_FACE, IPADAPTER_PLUS, MODEL_FILES

ENCODERS = [(FACES_ENCODER, "faces", "person"), (PETS_ENCODER, "pets", "pet")]
IP_ADAPTER_FILES = [IPADAPTER_FACE, IPADAPTER_PLUS]
# IP-Adapter Plus's Resampler shrunk for the tiny models: it reads the tiny CLIP vision tower's 64-wide
# tokens and writes 4 tokens as wide as the tiny UNet's context (2048, as SDXL's); 2 heads of 64 (as in
# IP-Adapter).
TINY_RESAMPLER = {"dim": 128, "depth": 2, "inner": 128, "num_queries": 4, "clip_dim": 64, "ff_mult": 2}


def write_tiny_encoders(folder: Path, unet) -> None:
    """Real encoder files in the weight format, sized for the tiny UNet and the tiny CLIP vision tower.

    They name the standard CLIP vision file, as the trained ones do; the graph connects the (tiny) CLIP
    vision model explicitly, which the loader checks by architecture.
    """
    folder.mkdir(parents=True, exist_ok=True)
    clip_vision = {**TINY_CLIP_VISION_SPEC, "name": CLIP_VISION}
    for seed, (name, domain, token) in enumerate(ENCODERS):
        encoder = tiny_encoder(unet, seed=seed, domain=domain, token=token, clip_vision=clip_vision)
        save_encoder(str(folder / name), encoder)


def write_tiny_ip_adapter_files(folder: Path, unet) -> None:
    """Files in IP-Adapter Plus SDXL's layout (its key names, no metadata), sized for the tiny UNet and CLIP
    vision tower: the real Load Nested Encoder reads them as it reads the real files, by their keys and shapes
    (the test-only pack registers the tiny UNet's layer table and tower with the loader)."""
    folder.mkdir(parents=True, exist_ok=True)
    width = {layer.key: layer.dim for layer in unet_layers(unet.model.diffusion_model)}
    widths = {number: width[key] for key, number in TINY_IP_ADAPTER_NUMBERS.items()}
    for seed, name in enumerate(IP_ADAPTER_FILES, start=len(ENCODERS)):
        keys = ip_adapter_plus_keys(widths, output_dim=2048, **TINY_RESAMPLER)
        write_safetensors(folder / name, [(key, shape, torch.float16) for key, shape in keys],
                          plausible_values(seed))


def prepare_tiny_base(base: Path, unet) -> None:
    """`prepare_base_dir` with this pack, the test-only pack and stand-ins for the files the workflows' loaders
    name, plus the tiny encoder files."""
    prepare_base_dir(base, {PACK_NAME: REPO, TINY_PACK_NAME: TINY_PACK_DIR}, MODEL_FILES)
    write_tiny_encoders(base / "models" / "nested_attention", unet)
    write_tiny_ip_adapter_files(base / "models" / "ipadapter", unet)
