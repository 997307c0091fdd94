"""Helpers and fixtures for the node tests: the pack loaded as ComfyUI loads it, tiny encoder files, images.

Test modules import the fixtures they use from here (`from pack_helpers import ...`). Importing this module
loads no ComfyUI (conftest imports it for every test, core tests included): the functions that use ComfyUI's
modules import them through `comfyui`, which sets ComfyUI up first.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

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


def comfyui(name: str):
    """ComfyUI's module `name` (e.g. "execution", "folder_paths"), imported once ComfyUI is set up."""
    import tiny_models  # noqa: F401  (sets ComfyUI up before anything of it is imported)

    return importlib.import_module(name)


@pytest.fixture(scope="session")
def pack():
    """The pack's node modules, loaded from the root __init__.py under the name `nested_attention_pack`, and
    its nodes by id as ComfyUI registers them (from the node list its comfy_entrypoint gives)."""
    return pack_namespace()


def pack_namespace() -> SimpleNamespace:
    """What the `pack` fixture gives, for code outside pytest (tests/loader_fuzz.py's worker)."""
    module = comfyui("pack").load_pack()  # tests/pack.py, which needs ComfyUI set up
    nodes = module.nodes
    extension = run_async(module.comfy_entrypoint())
    schemas = {cls: cls.GET_SCHEMA() for cls in run_async(extension.get_node_list())}
    return SimpleNamespace(
        module=module,
        mappings={schema.node_id: cls for cls, schema in schemas.items()},
        display={schema.node_id: schema.display_name for schema in schemas.values()},
        apply=nodes.apply,
        loader=nodes.loader,
        subject=nodes.subject,
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
    """Temporary folders registered as ComfyUI's `nested_attention`, `ipadapter` and `clip_vision` models folders."""
    folder = tmp_path / "nested_attention"
    clip_folder = tmp_path / "clip_vision"
    ipadapter = tmp_path / "ipadapter"
    folder_paths = comfyui("folder_paths")
    for made in (folder, clip_folder, ipadapter):
        made.mkdir()
    monkeypatch.setitem(
        folder_paths.folder_names_and_paths, "nested_attention", ([str(folder)], {".safetensors"})
    )
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "ipadapter", ([str(ipadapter)], {".safetensors"}))
    monkeypatch.setitem(
        folder_paths.folder_names_and_paths, "clip_vision", ([str(clip_folder)], {".safetensors"})
    )
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return SimpleNamespace(encoders=folder, clip_vision=clip_folder, ipadapter=ipadapter)


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


def run_async(coroutine):
    """Run a coroutine (ComfyUI's loader and executor functions are coroutines) to its end; its result.

    On a thread of its own with a loop of its own, as ComfyUI's prompt worker runs nodes off the main
    thread: the e2e tests' browser driver (playwright's sync API) keeps an event loop running on the main
    thread for the rest of the session, where asyncio.run refuses to start another.
    """
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, coroutine).result()


def run_node(pack, node_id: str, **inputs):
    """Run the pack's node `node_id` with its inputs by name, as ComfyUI's executor runs it; what it returns
    (see execute_node). Tests run the pack's nodes only through this."""
    return execute_node(pack.mappings[node_id], node_id, **inputs)


def execute_node(node_class, node_id: str, **inputs):
    """Run a node class (V1 or V3, the pack's or ComfyUI's) as ComfyUI's executor runs it; what it returns.

    Through ComfyUI's own execution.get_input_data and get_output_data (what execution.execute calls for
    a node), so a V3 node is called as the server calls it (a class clone, its hidden inputs). Inputs are the
    values the node receives (what a link carries, or a widget value). Returns the node's outputs as a tuple
    in slot order; a node with a UI output returns {"ui": ...} (and "result": the tuple, if it has outputs).
    How a node class is called (its schema) lives here alone.
    """
    unknown = set(inputs) - set(input_specs(node_class))
    if unknown:  # ComfyUI drops an input a node does not declare: a misspelled name would pass unseen
        raise TypeError(f"{node_id} has no input {sorted(unknown)}; it has {list(input_specs(node_class))}")
    obj = node_class()
    # The third value is the V3 hidden inputs (0.3.75) or V3 data (0.33); get_output_data takes it 7th.
    execution = comfyui("execution")
    values, _, v3 = execution.get_input_data(inputs, node_class, node_id)

    async def execute():
        outputs, ui, _, pending = await execution.get_output_data(
            node_id, node_id, obj, values, None, None, v3
        )
        if pending:  # an async node: what execution.execute does once its tasks are done
            returned = await execution.resolve_map_node_over_list_results(outputs)
            outputs, ui, _ = execution.get_output_from_returns(returned, obj)
        return outputs, ui

    outputs, ui = run_async(execute())
    result = tuple(slot[0] for slot in outputs)  # one value per output: the node ran once
    if ui:
        return {"ui": ui, "result": result} if result else {"ui": ui}
    return result


def input_specs(node_class) -> dict[str, tuple]:
    """A node's required and optional inputs, {name: (type, options)}, in their order, as INPUT_TYPES gives
    them (a V3 combo: ("COMBO", {"options": [...], ...}); a V1 combo: ([...], {...}))."""
    types = node_class.INPUT_TYPES()
    return {name: (spec[0], spec[1] if len(spec) > 1 else {})
            for section in ("required", "optional") for name, spec in types.get(section, {}).items()}


def combo_choices(spec: tuple) -> list | None:
    """The choices of a combo input's (type, options), either spelling; None for any other input."""
    kind, options = spec
    if isinstance(kind, (list, tuple)):
        return list(kind)
    return list(options["options"]) if kind == "COMBO" else None


def run_comfy_node(node_id: str, **inputs):
    """Run one of ComfyUI's own nodes (nodes.py: KSampler, InpaintModelConditioning, ...) by its id, with its
    inputs by name, as the executor calls it; what it returns (a tuple of its outputs)."""
    import nodes  # ComfyUI's own module (the pack is loaded under another name, tests/pack.py)

    return execute_node(nodes.NODE_CLASS_MAPPINGS[node_id], node_id, **inputs)


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
    region: str = "mask",
):
    return run_node(pack, "NestedAttentionApply", model=model, clip=clip, subject=subject, text=text, token=token,
                    start_percent=start, end_percent=end, mask=mask, region=region, λ=lambda_)


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


@contextlib.contextmanager
def registered(*node_classes):
    """`node_classes` known to ComfyUI for the duration, each under its class name (in its `nodes` module's
    NODE_CLASS_MAPPINGS, where execution looks node types up)."""
    with mock.patch.dict(comfyui("execution").nodes.NODE_CLASS_MAPPINGS, {c.__name__: c for c in node_classes}):
        yield


def _source_of(kind: str):
    """A stand-in node with one output of type `kind`, to link a node's required input to."""
    return type(f"TestSourceOf{kind}", (), {
        "RETURN_TYPES": (kind,), "FUNCTION": "run", "INPUT_TYPES": classmethod(lambda cls: {"required": {}}),
    })


def layer_inputs(patch, *, sigma=1.0, h=4, w=4, dtype=torch.float32, seed=0):
    """q, k, v and extra_options as BasicTransformerBlock passes them to attn2 patches (cond, uncond)."""
    g = torch.Generator().manual_seed(seed)
    dim = patch.layer.dim
    q = torch.randn(2, h * w, dim, generator=g).to(dtype)
    k = torch.randn(2, 77, dim, generator=g).to(dtype)
    v = torch.randn(2, 77, dim, generator=g).to(dtype)
    extra = {
        "n_heads": dim // 16,
        "dim_head": 16,
        "cond_or_uncond": [0, 1],
        "sigmas": torch.tensor([sigma]),
        "activations_shape": [2, dim, h, w],
        "attn_precision": None,
    }
    return q, k, v, extra


def validate_inputs(node_class, **values):
    """ComfyUI's own check of a node in a prompt (execution.validate_inputs, as the server runs it before
    anything runs): True when it finds nothing wrong, else its errors as one text (the node's own message
    in them, after "Custom validation failed for node: <input> - ").

    values: widget values by name. Every required input that is not a widget (a NESTED_ENCODER, an IMAGE)
    and not given is linked to a stand-in node of that type: validation never sees a linked input's value.
    """
    prompt, sources, inputs = {}, [], dict(values)
    for name, (kind, _) in input_specs(node_class).items():
        is_widget = isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES
        if name not in inputs and name in node_class.INPUT_TYPES().get("required", {}) and not is_widget:
            sources.append(_source_of(kind))
            source_id = str(len(sources) + 1)
            prompt[source_id] = {"class_type": sources[-1].__name__, "inputs": {}}
            inputs[name] = [source_id, 0]
    prompt["1"] = {"class_type": node_class.__name__, "inputs": inputs}
    with registered(node_class, *sources):
        valid, errors, _ = run_async(comfyui("execution").validate_inputs("validate", prompt, "1", {}))
    assert valid == (not errors), f"a stand-in source failed validation: {prompt}"
    return True if valid else "; ".join(f"{e['message']}: {e['details']}" for e in errors)


def assert_inputs_valid(node_class, **values) -> None:
    """ComfyUI accepts these inputs of `node_class` (validate_inputs above returns exactly True)."""
    result = validate_inputs(node_class, **values)
    assert result is True, f"ComfyUI refuses {node_class.__name__} with {values}: {result}"


def fingerprint(node_class, **values):
    """What ComfyUI compares with the last run to decide whether to run the node again (its IS_CHANGED /
    fingerprint_inputs, called by execution.IsChangedCache as the executor calls it): one value per call."""
    execution = comfyui("execution")
    prompt = comfyui("comfy_execution.graph").DynamicPrompt({"1": {"class_type": node_class.__name__, "inputs": dict(values)}})
    with registered(node_class):
        return run_async(execution.IsChangedCache("fingerprint", prompt, None).get("1"))


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
