"""One real ComfyUI server (and one headless Chromium on its frontend) for every test under tests/e2e.

The server runs with this pack, the test-only pack tests/e2e/tiny_pack and cubiq's ComfyUI_IPAdapter_plus
(unpacked from ../shared/packs for the compatibility test, never part of the repo), a throw-away
`--base-directory`, and real encoder files sized for the tiny UNet, in the pack's own format and in
IP-Adapter Plus's layout (so the real Load Nested Encoder node loads and validates them). Starting it once
saves each test module its own start-up.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import tiny_models
import torch
from harness import (
    ARTIFACTS_DIR,
    CHROMIUM,
    FACES_ENCODER,
    IPADAPTER_PLUS_ARCHIVE,
    PACK_NAME,
    PETS_ENCODER,
    REPO,
    TINY_PACK_DIR,
    TINY_PACK_NAME,
    ComfyServer,
    Frontend,
    install_pack_archive,
    pack_archive,
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
TINY_RESAMPLER = dict(dim=128, depth=2, inner=128, num_queries=4, clip_dim=64, ff_mult=2)


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


@pytest.fixture(scope="session")
def comfy(tmp_path_factory, _tiny_unet_shared):
    """The running server (harness.ComfyServer); its log is ARTIFACTS_DIR/server.log."""
    if ARTIFACTS_DIR.exists():
        shutil.rmtree(ARTIFACTS_DIR)
    ARTIFACTS_DIR.mkdir(parents=True)
    base = tmp_path_factory.mktemp("comfyui") / "base"
    prepare_base_dir(base, {PACK_NAME: REPO, TINY_PACK_NAME: TINY_PACK_DIR}, MODEL_FILES)
    ipadapter_plus = pack_archive(IPADAPTER_PLUS_ARCHIVE)
    if ipadapter_plus is not None:  # test_other_packs_e2e.py says what is missing when it is not
        install_pack_archive(ipadapter_plus, base / "custom_nodes")
    write_tiny_encoders(base / "models" / "nested_attention", _tiny_unet_shared)
    write_tiny_ip_adapter_files(base / "models" / "ipadapter", _tiny_unet_shared)
    server = ComfyServer(tiny_models.find_comfyui(), base, ARTIFACTS_DIR / "server.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def frontend(comfy):
    """The server's frontend in Debian's Chromium (harness.Frontend)."""
    if not CHROMIUM.exists():
        # In CI the browser test must run: `python3 dev.py test` installs Chromium there (as root).
        missing = pytest.fail if os.environ.get("CI") else pytest.skip
        missing(f"{CHROMIUM} is missing: install Debian's chromium (python3 dev.py test does, as root)")
    pytest.importorskip("playwright.sync_api", reason="the playwright package drives Chromium")
    with Frontend(comfy) as page:
        yield page
