"""Test-only ComfyUI node pack: tiny stand-ins for the heavy SDXL and CLIP vision loaders.

The end-to-end test links this folder into the test server's custom_nodes (never into a user's ComfyUI)
and swaps the shipped workflows' CheckpointLoaderSimple / CLIPVisionLoader / UNETLoader for these nodes in
the API prompt, so that the real graph runs on a CPU in seconds. Everything else in the graph stays real: the
pack's nodes, LoadImage, CLIPTextEncode, EmptyLatentImage, KSampler, VAEDecode and SaveImage.

It also serves GET /nested_attention_test/live_subjects (`live_subjects`), for the soak's count of the
subjects still alive in the server.

The models are the deterministic tiny builders of tests/tiny_models.py (ComfyUI's own classes), plus a
tiny comfy.sd.VAE built here. It also registers the tiny UNet and CLIP vision tower with the pack's weight
formats, so that tiny IP-Adapter Plus layout files load as they would for SDXL.
"""

from __future__ import annotations

import gc
import sys
from dataclasses import replace
from pathlib import Path

# resolve(): the server sees this folder through a symlink.
_TESTS_DIR = str(Path(__file__).resolve().parents[2])
if _TESTS_DIR not in sys.path:
    sys.path.append(_TESTS_DIR)

import comfy.ldm.models.autoencoder
import comfy.sd
import folder_paths
import tiny_models

from nested_attention import formats, unet_layers
from nested_attention.patch import SubjectBinding
from nested_attention_comfy.clip_vision import clip_vision_spec

CATEGORY = "nested_attention/testing"
SEED = 0

# A KL autoencoder with SD's layout (8x downscale, 4 latent channels), 32 channels wide at every level (the
# narrowest its GroupNorm(32) allows) and one res block per level.
TINY_VAE_PARAMS = {
    "embed_dim": 4,
    "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
        "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
    },
}

_cache: dict = {}


def tiny_vae(seed: int = SEED) -> comfy.sd.VAE:
    """A comfy.sd.VAE around a tiny AutoencoderKL with deterministic weights."""
    model = comfy.ldm.models.autoencoder.AutoencoderKL(**TINY_VAE_PARAMS)
    tiny_models.init_parameters(model, seed)
    return comfy.sd.VAE(sd=model.state_dict(), config={"params": TINY_VAE_PARAMS})


def _cached(key: str, build):
    if key not in _cache:
        _cache[key] = build()
    return _cache[key]


class NestedAttentionTestTinyCheckpoint:
    DESCRIPTION = "Test only: a tiny SDXL-shaped MODEL, CLIP and VAE in place of Load Checkpoint."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        unet = _cached("unet", lambda: tiny_models.tiny_sdxl_unet(seed=SEED))
        clip = _cached("clip", lambda: tiny_models.tiny_sdxl_clip(seed=SEED))
        vae = _cached("vae", tiny_vae)
        return (unet.clone(), clip.clone(), vae)


class NestedAttentionTestTinyInpaintUNet:
    DESCRIPTION = ("Test only: the tiny SDXL-shaped UNet with an inpainting checkpoint's 9 input channels, "
                   "in place of Load Diffusion Model.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        return (_cached("inpaint_unet", lambda: tiny_models.tiny_sdxl_unet(seed=SEED, inpaint=True)).clone(),)


class NestedAttentionTestTinyCLIPVision:
    DESCRIPTION = "Test only: a tiny CLIP vision transformer in place of Load CLIP Vision (same output)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        return (_cached("clip_vision", lambda: tiny_models.tiny_clip_vision(seed=SEED)),)


class NestedAttentionTestTinyCLIPVision224(NestedAttentionTestTinyCLIPVision):
    DESCRIPTION = ("Test only: a tiny CLIP vision transformer for 224-pixel inputs (patch 56, so 16 patches as the "
                   "32-pixel one has), for packs that resize images to 224 themselves (IPAdapter_plus).")

    def load(self):
        return (_cached("clip_vision_224", lambda: tiny_models.tiny_clip_vision(seed=SEED, image_size=224,
                                                                                patch_size=56)),)


# IP-Adapter-style files carry no layer table and no CLIP vision name: the loader recognises the UNet by the
# file's layer count and the CLIP vision tower by its token width (nested_attention.formats). Registering the
# tiny UNet's table and the tiny tower there lets the real Load Nested Encoder read the e2e server's tiny
# IP-Adapter Plus layout files (tests/e2e/conftest.py) through the IP-Adapter path, unchanged otherwise.
_tiny_unet = _cached("unet", lambda: tiny_models.tiny_sdxl_unet(seed=SEED))
_tiny_layers = tuple(unet_layers(_tiny_unet.model.diffusion_model))
formats.KNOWN_UNET_LAYERS.setdefault(len(_tiny_layers), _tiny_layers)
_tiny_tower = clip_vision_spec(_cached("clip_vision", lambda: tiny_models.tiny_clip_vision(seed=SEED)))
formats.KNOWN_CLIP_VISION.setdefault(
    _tiny_tower.hidden_size,
    replace(_tiny_tower, name="tiny CLIP vision (test only)", hidden_layer="penultimate"))

# The models/ipadapter folder, as IPAdapter_plus registers it (ComfyUI itself does not): the shipped
# workflows name a file there, which the frontend's Missing Models dialog looks up by folder name.
if "ipadapter" not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths["ipadapter"] = (
        [str(Path(folder_paths.models_dir) / "ipadapter")], folder_paths.supported_pt_extensions)


def live_subjects() -> dict:
    """What of the pack's subjects is alive in this process, after a full garbage collection: the
    SubjectBindings (one per Apply node run whose model is still referenced) and their cached K~/V~ entries.
    The soak (tests/e2e/soak.py) reads it at GET /nested_attention_test/live_subjects."""
    gc.collect()
    bindings = [o for o in gc.get_objects() if isinstance(o, SubjectBinding)]
    return {"bindings": len(bindings), "kv_entries": sum(len(b._kv) for b in bindings)}


def _add_routes() -> None:
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:  # imported outside a server (a library use): nothing to serve
        return
    if getattr(PromptServer, "instance", None) is None:
        return

    @PromptServer.instance.routes.get("/nested_attention_test/live_subjects")
    async def _live_subjects(request):
        return web.json_response(live_subjects())


_add_routes()

NODE_CLASS_MAPPINGS = {
    "NestedAttentionTestTinyCheckpoint": NestedAttentionTestTinyCheckpoint,
    "NestedAttentionTestTinyCLIPVision": NestedAttentionTestTinyCLIPVision,
    "NestedAttentionTestTinyCLIPVision224": NestedAttentionTestTinyCLIPVision224,
    "NestedAttentionTestTinyInpaintUNet": NestedAttentionTestTinyInpaintUNet,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "NestedAttentionTestTinyCheckpoint": "Tiny SDXL Checkpoint (test only)",
    "NestedAttentionTestTinyCLIPVision": "Tiny CLIP Vision (test only)",
    "NestedAttentionTestTinyCLIPVision224": "Tiny CLIP Vision 224 px (test only)",
    "NestedAttentionTestTinyInpaintUNet": "Tiny SDXL Inpainting UNet (test only)",
}
