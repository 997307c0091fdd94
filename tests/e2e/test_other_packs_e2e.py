"""Apply Nested Attention with the real ComfyUI_IPAdapter_plus, through the real server, in both node orders.

The shared e2e server runs with cubiq's pack unpacked into its custom_nodes (tests/e2e/conftest.py; the
archive is in ../shared/packs, GPL-3.0, never copied into the repo). Its loader reads an IP-Adapter Plus
file whose shapes it hard-codes for SDXL (a Resampler of width 1280, depth 4, 20 heads of 64, 16 queries,
output 2048): the file is written here with those shapes, reading the tiny CLIP vision tower's 64-wide
tokens, and to_k_ip / to_v_ip sized for the tiny UNet's layers under IPAdapter_plus's numbering (its n-th
SDXL attn2 key gets number 2n + 1). It patches some keys the tiny UNet does not have and writes the
middle block as ("middle", 1, i): ComfyUI never calls those, and nothing here depends on them.
Graphs (API prompts, tiny models from tests/e2e/tiny_pack, 2 steps):
  - IPAdapter Advanced -> Apply Nested Attention -> KSampler runs, and its image differs from the nested-only
    and the IPAdapter-only images; with IPAdapter's weight at 0 (their term is zero, their patch still computes
    the base) it is the nested-only image;
  - Apply Nested Attention -> IPAdapter Advanced fails with the pack's NestedOrderError, saying to put
    IPAdapter first, through the server's error report.
"""

from __future__ import annotations

import os
import time
from io import BytesIO

import numpy as np
import pytest
import torch
from harness import IPADAPTER_PLUS_ARCHIVE, IPADAPTER_PLUS_NAME, PETS_ENCODER, pack_archive
from PIL import Image
from weight_layouts import ip_adapter_plus_keys, plausible_values, sdxl_ip_adapter_table, write_safetensors

from devtools.workflows import PET_IMAGE
from nested_attention import unet_layers

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

IPADAPTER_FILE = "tiny-ip-adapter-plus-for-ipadapter-plus.safetensors"
TEXT = "a photo of a pet"


@pytest.fixture(scope="module")
def ipadapter_server(comfy, _tiny_unet_shared):
    """The shared server, checked to have loaded IPAdapter_plus, with an IP-Adapter Plus file its loader reads."""
    if pack_archive(IPADAPTER_PLUS_ARCHIVE) is None:
        missing = pytest.fail if os.environ.get("CI") else pytest.skip
        missing(f"{IPADAPTER_PLUS_ARCHIVE} is not in ../shared/packs (or $NESTED_ATTENTION_PACKS): the test "
                "installs that pack into its ComfyUI")
    log = comfy.startup_log
    assert IPADAPTER_PLUS_NAME in log and "IMPORT FAILED" not in log, log[-4000:]
    assert "IPAdapterAdvanced" in comfy.get_json("/object_info/IPAdapterAdvanced")

    width = {layer.key: layer.dim for layer in unet_layers(_tiny_unet_shared.model.diffusion_model)}
    numbers = {number: width[key] for number, (key, _) in sdxl_ip_adapter_table().items() if key in width}
    keys = ip_adapter_plus_keys(numbers, output_dim=2048, dim=1280, depth=4, inner=20 * 64, num_queries=16,
                                clip_dim=64, ff_mult=4)
    path = comfy.base / "models" / "ipadapter" / IPADAPTER_FILE
    write_safetensors(path, [(key, shape, torch.float16) for key, shape in keys], plausible_values(7))
    yield comfy
    path.unlink()


def graph(order: str, *, weight: float = 1.0, lambda_: float = 1.0) -> dict:
    """An API prompt on the tiny models; order: the model's patch nodes, e.g. "ipadapter, nested" ("" for none)."""
    prompt = {
        "checkpoint": {"class_type": "NestedAttentionTestTinyCheckpoint", "inputs": {}},
        "vision": {"class_type": "NestedAttentionTestTinyCLIPVision", "inputs": {}},
        "vision224": {"class_type": "NestedAttentionTestTinyCLIPVision224", "inputs": {}},
        "image": {"class_type": "LoadImage", "inputs": {"image": PET_IMAGE}},
        "encoder": {"class_type": "NestedAttentionLoadEncoder",
                    "inputs": {"encoder_name": PETS_ENCODER, "clip_vision": ["vision", 0]}},
        "subject": {"class_type": "NestedAttentionEncodeSubject",
                    "inputs": {"encoder": ["encoder", 0], "image": ["image", 0], "crop": "center"}},
        "ipadapter": {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": IPADAPTER_FILE}},
        "text": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["checkpoint", 1], "text": TEXT}},
        "negative": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["checkpoint", 1], "text": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["checkpoint", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "other_packs"}},
    }
    model, positive = ["checkpoint", 0], ["text", 0]
    for step in order.split(", ") if order else ():
        if step == "ipadapter":
            prompt["apply_ipadapter"] = {"class_type": "IPAdapterAdvanced", "inputs": {
                "model": model, "ipadapter": ["ipadapter", 0], "image": ["image", 0], "clip_vision": ["vision224", 0],
                "weight": weight, "weight_type": "linear", "combine_embeds": "concat", "start_at": 0.0,
                "end_at": 1.0, "embeds_scaling": "V only"}}
            model = ["apply_ipadapter", 0]
        else:
            prompt["apply_nested"] = {"class_type": "NestedAttentionApply", "inputs": {
                "model": model, "clip": ["checkpoint", 1], "subject": ["subject", 0], "text": TEXT, "token": "",
                "λ": lambda_, "start_percent": 0.0, "end_percent": 1.0}}
            model, positive = ["apply_nested", 0], ["apply_nested", 1]
    prompt["sampler"] = {"class_type": "KSampler", "inputs": {
        "model": model, "positive": positive, "negative": ["negative", 0], "latent_image": ["latent", 0], "seed": 3,
        "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    return prompt


def image(server, prompt: dict) -> np.ndarray:
    (png,) = server.run_prompt(prompt)["save"]
    return np.asarray(Image.open(BytesIO(png)).convert("RGB"), dtype=np.float64)


@pytest.mark.parametrize("lambda_", [1.0, 2.0])
def test_ipadapter_then_apply_runs_with_both_effects(ipadapter_server, lambda_):
    both = image(ipadapter_server, graph("ipadapter, nested", lambda_=lambda_))
    nested_only = image(ipadapter_server, graph("nested", lambda_=lambda_))
    ipadapter_only = image(ipadapter_server, graph("ipadapter"))
    plain = image(ipadapter_server, graph(""))
    assert np.abs(ipadapter_only - plain).mean() > 0.5  # IPAdapter does act on the tiny UNet
    assert np.abs(both - nested_only).mean() > 0.5 and np.abs(both - ipadapter_only).mean() > 0.5
    # Their term at weight 0 is zero while their patch still computes the attention nested attention builds on.
    silent = image(ipadapter_server, graph("ipadapter, nested", weight=0.0, lambda_=lambda_))
    assert np.abs(silent - nested_only).max() <= 1.0, np.abs(silent - nested_only).max()


def test_apply_then_ipadapter_is_our_error_saying_to_put_ipadapter_first(ipadapter_server):
    server = ipadapter_server
    prompt_id = server.queue_prompt(graph("nested, ipadapter"))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        entry = server.get_json(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the prompt did not finish:\n{server.log_tail()}")
    status = entry["status"]
    assert status["status_str"] == "error", status
    [error] = [data for kind, data in status["messages"] if kind == "execution_error"]
    assert error["node_type"] == "IPAdapterAdvanced", error
    assert error["exception_type"].endswith("NestedOrderError"), error
    message = error["exception_message"]
    assert "Put IPAdapter, InstantID and PuLID nodes before Apply Nested Attention" in message
    assert f"({IPADAPTER_PLUS_NAME}.CrossAttentionPatch.ipadapter_attention)" in message, message
