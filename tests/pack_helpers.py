"""Helpers and fixtures for the node tests: the pack loaded as ComfyUI loads it, tiny encoder files, images.

Test modules import the fixtures they use from here (`from pack_helpers import ...`).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import SimpleNamespace

import folder_paths
import pytest
import tiny_models  # noqa: F401  (ComfyUI set-up first)
import torch
from pack import load_pack

from nested_attention import (
    ClipVisionSpec,
    EncoderConfig,
    NestedEncoder,
    QFormerConfig,
    save_encoder,
    unet_layers,
)

# tiny_models.tiny_clip_vision(): 32 px, patch 8 -> 16 patches + CLS, width 64, two layers.
TINY_CLIP_VISION_SPEC = {
    "name": "tiny_clip_vision.safetensors",
    "hidden_size": 64,
    "num_tokens": 17,
    "num_layers": 2,
    "image_size": 32,
}


@pytest.fixture(scope="session")
def pack():
    """The pack's node modules, loaded from the root __init__.py under the name `nested_attention_pack`."""
    module = load_pack()
    nodes = module.nodes
    return SimpleNamespace(
        module=module,
        mappings=module.NODE_CLASS_MAPPINGS,
        display=module.NODE_DISPLAY_NAME_MAPPINGS,
        apply=nodes.apply,
        loader=nodes.loader,
        subject=nodes.subject,
        host=importlib.import_module("nested_attention.host"),  # the ComfyUI glue the nodes import
        wires=nodes.wires,
    )


def tiny_encoder(
    unet_patcher,
    *,
    seed: int = 0,
    domain: str = "pets",
    token: str = "pet",
    num_queries: int = 8,
    alpha: float = 2.0,
    layers=None,
    clip_vision: dict | None = None,
    face_align: str = "none",
    face_size: int = 512,
) -> NestedEncoder:
    """A small NestedEncoder for the tiny UNet's layer table and the tiny CLIP vision model, seeded."""
    config = EncoderConfig(
        domain=domain,
        token=token,
        alpha=alpha,
        qformer=QFormerConfig(
            clip_dim=64,
            dim=32,
            depth=1,
            heads=2,
            dim_head=16,
            num_queries=num_queries,
            output_dim=2048,
            ff_mult=2,
        ),
        clip_vision=ClipVisionSpec(**(clip_vision or TINY_CLIP_VISION_SPEC)),
        layers=tuple(layers if layers is not None else unet_layers(unet_patcher.model.diffusion_model)),
        face_align=face_align,
        face_size=face_size,
    )
    torch.manual_seed(seed)
    encoder = NestedEncoder(config).eval().requires_grad_(False)
    with torch.no_grad():  # K~ of the same scale as the UNet's keys, so the nested softmax is not flat
        for proj in encoder.projections:
            proj.to_k.weight.normal_(0, 2048**-0.5)
            proj.to_v.weight.normal_(0, 2048**-0.5)
    return encoder


@pytest.fixture
def models_folder(tmp_path, monkeypatch):
    """A temporary folder registered as ComfyUI's `nested_attention` (and `clip_vision`) models folders."""
    folder = tmp_path / "nested_attention"
    clip_folder = tmp_path / "clip_vision"
    folder.mkdir()
    clip_folder.mkdir()
    monkeypatch.setitem(
        folder_paths.folder_names_and_paths, "nested_attention", ([str(folder)], {".safetensors"})
    )
    monkeypatch.setitem(
        folder_paths.folder_names_and_paths, "clip_vision", ([str(clip_folder)], {".safetensors"})
    )
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return SimpleNamespace(encoders=folder, clip_vision=clip_folder)


@pytest.fixture
def save_tiny_encoder(models_folder, tiny_unet):
    """save_tiny_encoder(name, **tiny_encoder kwargs) -> file name in the registered models folder."""

    def save(name: str = "tiny_pets.safetensors", encoder: NestedEncoder | None = None, **kwargs) -> str:
        encoder = encoder if encoder is not None else tiny_encoder(tiny_unet, **kwargs)
        save_encoder(os.fspath(Path(models_folder.encoders) / name), encoder)
        return name

    return save


@pytest.fixture
def load_handle(pack, save_tiny_encoder, tiny_clip_vision):
    """load_handle(**tiny_encoder kwargs) -> EncoderHandle, through the Load Nested Encoder node."""
    counter = iter(range(1000))

    def load(name: str | None = None, **kwargs):
        name = save_tiny_encoder(name or f"tiny_{next(counter)}.safetensors", **kwargs)
        (handle,) = run_node(pack, "NestedAttentionLoadEncoder", encoder_name=name, clip_vision=tiny_clip_vision)
        return handle

    return load


@pytest.fixture
def pet(pack, load_handle):
    """A subject from a tiny 'pets' encoder (default word 'pet')."""
    return encode_subject(pack, load_handle(seed=1, domain="pets", token="pet"), seed=10)


@pytest.fixture
def person(pack, load_handle):
    """A subject from another tiny encoder, of another domain (default word 'person')."""
    return encode_subject(pack, load_handle(seed=2, domain="faces", token="person", num_queries=4), seed=20)


def run_node(pack, node_id: str, **inputs):
    """Run the pack's node `node_id` with its inputs by name, as ComfyUI's executor calls it; what it returns.

    Tests run nodes only through this, so that how a node class is called (its schema) lives in one place.
    """
    node_class = pack.mappings[node_id]
    return getattr(node_class(), node_class.FUNCTION)(**inputs)


PET_PHOTO = Path(__file__).resolve().parents[1] / "workflows" / "input" / "nested_attention_pet.jpg"  # Chelsea (CC0)


def cat_cutout_alpha(width: int, height: int):
    """The alpha channel of a cut-out of PET_PHOTO: a soft-edged ellipse around the cat's face, (H, W) uint8."""
    import numpy as np

    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = np.sqrt(((x - 240) / 150) ** 2 + ((y - 150) / 135) ** 2)
    return np.clip((1.05 - r) * 10 * 255, 0, 255).round().astype(np.uint8)


def photos(seed: int, n: int = 1, size: int = 32) -> torch.Tensor:
    """An IMAGE batch (n, size, size, 3) in [0, 1]."""
    return torch.rand(n, size, size, 3, generator=torch.Generator().manual_seed(seed))


def encode_subject(pack, handle, seed: int = 0, n: int = 1, mask=None):
    subject, _ = run_node(pack, "NestedAttentionEncodeSubject", encoder=handle, image=photos(seed, n),
                          crop="center", mask=mask)
    return subject


def apply(
    pack,
    model,
    clip,
    subject,
    text: str,
    token: str = "",
    lambda_: float = 1.0,
    start: float = 0.0,
    end: float = 1.0,
    mask=None,
):
    return run_node(pack, "NestedAttentionApply", model=model, clip=clip, subject=subject, text=text, token=token,
                    start_percent=start, end_percent=end, mask=mask, **{"λ": lambda_})


def validate_inputs(node_class, **values):
    """Call `node_class.VALIDATE_INPUTS` as ComfyUI's execution.validate_inputs does; return what it returns.

    ComfyUI passes only the inputs the method's signature names (all of them to a `**kwargs`), and
    `input_types` (the types of linked inputs; none here) when the signature asks for it.
    """
    import inspect

    method = node_class.VALIDATE_INPUTS
    spec = inspect.getfullargspec(method)
    if spec.varkw:
        arguments = dict(values)
    else:
        arguments = {k: v for k, v in values.items() if k in spec.args}
    if "input_types" in spec.args:
        arguments["input_types"] = {}
    return method(**arguments)


def assert_inputs_valid(node_class, **values) -> None:
    """VALIDATE_INPUTS must return exactly True for valid inputs: ComfyUI (`r is not True`, 0.3.75 and 0.33)
    shows anything else, 1 or "ok" or None included, as the reason the prompt was refused."""
    result = validate_inputs(node_class, **values)
    assert result is True, (
        f"{node_class.__name__}.VALIDATE_INPUTS returned {result!r} for valid inputs {values}; it must "
        "return "
        "exactly True (ComfyUI refuses the prompt with anything else as the error message)."
    )
