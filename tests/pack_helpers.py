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
from comfy_api.latest import io
from pack import load_pack

from nested_attention import (
    ClipVisionSpec,
    EncoderConfig,
    LayerSpec,
    NestedEncoder,
    QFormerConfig,
    save_encoder,
    unet_layers,
)
from nested_attention.capture import RUN_KEY
from nested_attention.patch import SubjectBinding

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
        maps=nodes.maps,
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
    if issubclass(node_class, io.ComfyNode):  # V3 schema: as ComfyUI's executor runs it; its outputs
        return node_class.EXECUTE_NORMALIZED(**inputs).args
    return getattr(node_class(), node_class.FUNCTION)(**inputs)


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
    region: str = "mask",
):
    return run_node(pack, "NestedAttentionApply", model=model, clip=clip, subject=subject, text=text, token=token,
                    start_percent=start, end_percent=end, mask=mask, region=region, λ=lambda_)


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


# ------------------------------------------------------------------------------------------------
# One constructed cross-attention layer, called as ComfyUI calls an attn2 patch (tests of capture and region auto)

LAYER = LayerSpec("input", 1, 0, 8)  # one cross-attention layer, 8 wide, 2 heads of 4
HEADS, TEXT, GRID = 2, 6, 4  # a 4 x 4 query grid, a 6-token prompt


def direction(i: int, scale: float = 10.0) -> torch.Tensor:
    """A vector along unit i in both heads' slices (dims i and 4 + i)."""
    out = torch.zeros(8)
    out[i] = out[4 + i] = scale
    return out


def constructed_binding(source, **kwargs) -> SubjectBinding:
    """A subject of 4 tokens whose nested key i points along direction(i): K~ = E W_K~^T = 10 (e_i + e_4+i)."""
    config = EncoderConfig(
        domain="faces", token="person",
        qformer=QFormerConfig(clip_dim=64, dim=8, depth=1, heads=1, dim_head=8, num_queries=4, output_dim=8,
                              ff_mult=1),
        clip_vision=ClipVisionSpec(**TINY_CLIP_VISION_SPEC), layers=(LAYER,))
    encoder = NestedEncoder(config).requires_grad_(False)
    encoder.projections[0].to_k.weight.copy_(torch.eye(8))
    encoder.projections[0].to_v.weight.normal_(generator=torch.Generator().manual_seed(0))
    tokens = torch.stack([direction(i) for i in range(4)])[None]  # (1, 4, 8)
    return SubjectBinding(encoder=encoder, tokens=tokens, prompt_tokens=TEXT, source=source, **kwargs)


def call_patch(patch, q, k, v, run, sigma=1.0):
    """One call of an attn2 patch on LAYER's grid, conditional rows only, with this run's state (or None)."""
    return patch(q, k, v, {"n_heads": HEADS, "cond_or_uncond": [0], "sigmas": torch.tensor([sigma]),
                           "activations_shape": [1, 8, GRID, GRID], RUN_KEY: run})
