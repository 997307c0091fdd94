"""Every weight layout the pack reads, planned from the safetensors header alone, then loaded exactly.

Supported layouts (detected by key groups and shapes, never by file name):

- ``nested-attention``: the pack's own files (metadata ``format`` = FORMAT, written by weights.py).
- ``ip-adapter-plus-sdxl``: IP-Adapter Plus for SDXL (``ip-adapter-plus_sdxl_vit-h.safetensors``,
  ``ip-adapter-plus-face_sdxl_vit-h.safetensors``): a perceiver Resampler under ``image_proj.`` and
  ``ip_adapter.{2k+1}.to_k_ip.weight`` / ``.to_v_ip.weight`` per cross-attention layer.
- ``ip-adapter-derived``: the layouts an IP-Adapter-derived trainer (the Nested Attention authors' release)
  can write: a Resampler group under any prefix, plus per-layer key/value weights either under numbered keys
  (``<prefix>.<n>.to_k_<x>.weight``) or under diffusers module paths (``...down_blocks.1.attentions.0.
  transformer_blocks.0.attn2[...].to_k_<x>.weight``).

IP-Adapter's Resampler is exactly the pack's Q-Former with no feed-forward biases (``ff_bias=False``); its
per-layer ``to_k_ip`` / ``to_v_ip`` are W_K~ / W_V~, so ``softmax(q to_k_ip(E)^T / sqrt(d)) to_v_ip(E)`` per
head is the nested value v*_q. Numbered keys index diffusers' ``unet.attn_processors``: down blocks, then up
blocks, then the mid block last, each transformer block giving attn1 (even) then attn2 (odd). That order is
a rule over any layer table (`diffusers_order`), so tiny test UNets map the same way as SDXL's 70 layers.

One thing shapes cannot settle: the Resampler's head count. ``to_q`` is (heads * dim_head, dim); every
IP-Adapter Resampler uses dim_head 64, so heads = rows / 64 unless the caller passes ``dim_head``.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from safetensors import SafetensorError, safe_open

from .encoder import ClipVisionSpec, EncoderConfig, NestedEncoder, QFormerConfig
from .layers import SDXL_CONTEXT_DIM, SDXL_LAYERS, LayerSpec

# The pack's own files (weights.py writes them): metadata "format" and "format_version".
FORMAT = "nested-attention"
FORMAT_VERSION = 1


class NestedWeightsError(ValueError):
    """A weight file that cannot be used; the message says what was expected, found, and what to do."""


def parse_config(name: str, metadata: dict[str, str]) -> EncoderConfig:
    """The EncoderConfig stored in a pack file's metadata, with a clear error when it is unusable."""
    try:
        return EncoderConfig.from_json(metadata["config"])
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise NestedWeightsError(f"{name} has a missing or malformed 'config' entry in its metadata ({e}); "
                                 "re-export the encoder.") from e


# The dtypes encoder weights may have (safetensors' names), and the torch dtype of each.
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
DEFAULT_DIM_HEAD = 64  # every IP-Adapter Resampler (SD1.5, SDXL, Plus, Plus Face) uses 64-wide heads

IP_ADAPTER_SOURCE = "IP-Adapter Plus SDXL (tencent-ailab/IP-Adapter; files from huggingface.co/h94/IP-Adapter)"
IP_ADAPTER_LICENCE = "Apache-2.0"
DERIVED_SOURCE = "IP-Adapter-derived layout (e.g. the authors' release huggingface.co/orpatashnik/NestedAttentionEncoder)"
DERIVED_LICENCE = "see the file's source (the authors' release is CC BY-NC-SA 4.0, non-commercial)"

# CLIP vision towers an IP-Adapter-style file can be told apart by (the width of the tokens it reads).
KNOWN_CLIP_VISION = {
    1280: ClipVisionSpec(name="CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", hidden_size=1280, num_tokens=257,
                         num_layers=32, image_size=224, hidden_layer="penultimate", crop="center"),
    1664: ClipVisionSpec(name="CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors", hidden_size=1664, num_tokens=257,
                         num_layers=48, image_size=224, hidden_layer="penultimate", crop="center"),
}
# UNets an IP-Adapter-style file can be told apart by (its number of cross-attention layers), for callers that
# pass no layer table (Load Nested Encoder does not know the model yet). Another host can register its table
# here, as the test-only node pack does for the tiny test UNet.
KNOWN_UNET_LAYERS: dict[int, tuple[LayerSpec, ...]] = {len(SDXL_LAYERS): SDXL_LAYERS}


# ------------------------------------------------------------------------------------------------
# The header


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: "F16", "F32", "BF16", ...


@dataclass
class Header:
    """Names, shapes and dtypes of a .safetensors file's tensors, and its metadata; no tensor loaded."""

    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def shape(self, key: str) -> tuple[int, ...] | None:
        info = self.tensors.get(key)
        return None if info is None else info.shape


_EXPECTED_FILES = ("Expected an encoder exported by `python -m training.run`, an IP-Adapter Plus SDXL .safetensors "
                   "file, or the Nested Attention authors' release.")
MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header (bytes)
# What a file that is not safetensors is, by its first bytes: (prefix, what it is, what to do).
_FOREIGN = (
    (b"\xff\xd8\xff", "a JPEG image", "images go into Load Image; pick a .safetensors weight file here"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image", "images go into Load Image; pick a .safetensors weight file here"),
    (b"GIF8", "a GIF image", "pick a .safetensors weight file here"),
    (b"PK\x03\x04", "a zip archive (what torch.save writes: a .pt/.ckpt/.bin checkpoint under another name)",
     "this pack reads .safetensors only (never pickle): get the file's .safetensors version"),
    (b"\x80", "a Python pickle (an old-style PyTorch .bin/.pt checkpoint)",
     "this pack reads .safetensors only (never pickle): get the file's .safetensors version"),
    (b"GGUF", "a GGUF file (a quantized model for llama.cpp-style loaders)", "pick a .safetensors encoder file"),
    (b"version https://git-lfs", "a Git LFS pointer (a small text file that names the real file)",
     "the repository was cloned without git-lfs: download the file itself (its 'download' link)"),
)


def _what_it_is(head: bytes, size: int) -> str | None:
    """What a file that is not safetensors is, told from its first bytes, and what to do; None if unknown."""
    if size == 0:
        return "is empty (0 bytes): an interrupted download or copy. Download it again"
    for prefix, kind, todo in _FOREIGN:
        if head.startswith(prefix):
            return f"is {kind}, not a .safetensors file: {todo}"
    text = head.lstrip()[:200].lower()
    if text.startswith((b"<!doctype html", b"<html")):
        return ("is a web page (HTML), not a .safetensors file: an error or log-in page was saved in place of the "
                "download. Download it again (on Hugging Face, accept the model's licence or log in first)")
    if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head[:512]):
        return "is a text file, not a .safetensors file: download the weight file itself"
    return None


def file_problem(path: str) -> str | None:
    """Why the file at `path` cannot be a whole .safetensors file, from its first bytes and its header alone
    (what it is instead, a header that is cut or longer than the file, a tensor named twice, tensor data
    that ends past the file's end), worded to follow the file's name; None when nothing is wrong there."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        start = f.read(512)
        length = struct.unpack("<Q", start[:8])[0] if size >= 8 else 0
        f.seek(8)
        body = f.read(length) if 2 <= length <= MAX_HEADER else b""
    if not body.startswith(b"{"):  # not a safetensors header: say what the file is, when it can be told
        foreign = _what_it_is(start, size)
        if foreign:
            return foreign
        if size < 8:
            return f"is {size} bytes long, less than a .safetensors header: a truncated file. Download it again"
        return (f"is not a .safetensors file (its first 8 bytes give a header length of {length} for a file of "
                f"{size} bytes). If it is meant to be one, it is damaged: download it again")
    if len(body) < length:
        return (f"is truncated: its header alone needs {length + 8} bytes and the file has {size} (an interrupted "
                "download). Download it again")

    def no_duplicates(pairs):
        counts = Counter(k for k, _ in pairs)
        twice = sorted(k for k, n in counts.items() if n > 1)
        if twice:  # safetensors would silently take one of them
            raise ValueError(f"'{twice[0]}' appears {counts[twice[0]]} times in the header")
        return dict(pairs)

    try:
        header = json.loads(body, object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as e:  # JSONDecodeError included
        return f"has a damaged header ({e}): download or export it again"
    if not isinstance(header, dict):
        return "has a damaged header (not a JSON object): download or export it again"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"
            and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2 and isinstance(entry["data_offsets"][1], int)]
    if ends and 8 + length + max(ends) > size:
        return (f"is truncated: its tensors need {8 + length + max(ends)} bytes and the file has {size} (an "
                "interrupted download). Download it again")
    return None


def read_header(path: str) -> Header:
    """Read a file's header (safe_open keys + get_slice shapes). Truncated or foreign files raise clearly."""
    name = os.path.basename(path)
    problem = file_problem(path)
    if problem:
        raise NestedWeightsError(f"{name} {problem}. {_EXPECTED_FILES}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {}
            for key in f.keys():  # noqa: SIM118  (safe_open is not iterable)
                piece = f.get_slice(key)
                tensors[key] = TensorInfo(tuple(int(s) for s in piece.get_shape()), str(piece.get_dtype()))
    except (SafetensorError, OSError, ValueError) as e:
        raise NestedWeightsError(
            f"{name} is not a readable .safetensors file ({e}); it is damaged: download or export it again. "
            f"{_EXPECTED_FILES}") from e
    return Header(path=path, tensors=tensors, metadata=metadata)


def summarize_groups(header: Header, limit: int = 30) -> list[str]:
    """Key groups (digits folded to '#') with their count and shapes, for messages and `describe`."""
    groups: OrderedDict[str, list[tuple[int, ...]]] = OrderedDict()
    for key in sorted(header.tensors, key=_natural):
        groups.setdefault(re.sub(r"\d+", "#", key), []).append(header.tensors[key].shape)
    lines = []
    for group, shapes in groups.items():
        distinct = sorted(set(shapes))
        shown = ", ".join(str(list(s)) for s in distinct[:4]) + (" ..." if len(distinct) > 4 else "")
        lines.append(f"{group}  x{len(shapes)}  {shown}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more groups"]
    return lines


def _natural(key: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


# ------------------------------------------------------------------------------------------------
# The layer order of IP-Adapter-style files


def diffusers_order(layers: Sequence[LayerSpec]) -> list[LayerSpec]:
    """The layers in diffusers' `unet.attn_processors` order: down (input) blocks, up (output), mid last.

    diffusers' UNet2DConditionModel registers down_blocks and up_blocks before mid_block, and its
    attn_processors walks children in registration order; inside a stage, blocks and transformer blocks
    keep ComfyUI's (number, index) order.
    """
    rank = {"input": 0, "output": 1, "middle": 2}
    for layer in layers:
        if layer.block not in rank:
            raise ValueError(f"unknown UNet block {layer.block!r} in the layer table")
    return sorted(layers, key=lambda layer: (rank[layer.block], layer.number, layer.index))


def ip_adapter_numbers(layers: Sequence[LayerSpec]) -> dict[tuple[str, int, int], int]:
    """ComfyUI layer key -> the number of its `ip_adapter.<n>.to_k_ip.weight` key (2 * position + 1)."""
    return {layer.key: 2 * position + 1 for position, layer in enumerate(diffusers_order(layers))}


# ------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Plan:
    """How to build a NestedEncoder from a file: its config and, per encoder tensor, where it comes from."""

    format: str  # "nested-attention", "ip-adapter-plus-sdxl" or "ip-adapter-derived"
    config: EncoderConfig
    sources: dict[str, str] = field(default_factory=dict)  # encoder state-dict key -> file tensor name
    notes: list[str] = field(default_factory=list)  # assumptions made, for `describe` and logs


_LAYER_NUMBERED = re.compile(r"^(?P<prefix>(?:[A-Za-z_][\w]*\.)*)(?P<n>\d+)\.(?P<kind>to_[kv])_(?P<suffix>\w+)\.weight$")
_LAYER_DIFFUSERS = re.compile(
    r"^(?P<prefix>.*?)(?P<stage>down_blocks|up_blocks|mid_block)\.(?:(?P<b>\d+)\.)?attentions\.(?P<a>\d+)\."
    r"transformer_blocks\.(?P<t>\d+)\.attn2\.(?:[\w.]*?\.)?(?P<kind>to_[kv])_(?P<suffix>\w+)\.weight$")
_RESAMPLER_PARTS = ("latents", "proj_in.weight")
_EXPECTED_TEXT = (
    "Expected one of: a nested attention encoder exported by this pack (metadata format 'nested-attention'); "
    "an IP-Adapter Plus SDXL file (image_proj.latents [1, M, 1280], image_proj.layers.#.0.to_q.weight ..., "
    "ip_adapter.#.to_k_ip.weight / to_v_ip.weight [640|1280, 2048] for 70 layers); or an IP-Adapter-derived "
    "layout (a Resampler group with latents/proj_in/layers/proj_out/norm_out plus per-layer to_k_*/to_v_* "
    "weights under numbered keys or diffusers attn2 module paths)."
)


def _plan_layers(
    header: Header, layer_keys: dict, layers: Sequence[LayerSpec] | None, context: int, sources: dict[str, str]
) -> tuple[tuple[LayerSpec, ...], str]:
    """Map the file's per-layer key/value weights onto the UNet's layer table (`layers`, else the known UNet
    with as many layers), checking every shape; adds W_K~ / W_V~'s sources to `sources`. Returns the table
    and how the file numbers its layers."""
    table = tuple(layers) if layers is not None else None
    pairs = len(layer_keys) // 2
    # Default table: a known UNet's (SDXL's), used for ordering checks as soon as the file has its layer
    # count.
    ordered, numbering = _order_layer_keys(
        header, layer_keys, table if table is not None else KNOWN_UNET_LAYERS.get(pairs))
    if table is None:
        if len(ordered) not in KNOWN_UNET_LAYERS:
            raise NestedWeightsError(
                f"{header.name} has per-layer weights for {len(ordered)} cross-attention layers; SDXL has "
                f"{len(SDXL_LAYERS)}. {_model_hint(context)} (For another UNet, pass its layer table.)")
        table = KNOWN_UNET_LAYERS[len(ordered)]
    table_order = diffusers_order(table)
    if len(ordered) != len(table_order):
        raise NestedWeightsError(
            f"{header.name} has per-layer weights for {len(ordered)} cross-attention layers; the model has "
            f"{len(table_order)}. Use a file made for this model.")

    position = {layer.key: i for i, layer in enumerate(table)}
    for layer, (k_key, v_key) in zip(table_order, ordered):
        expected = (layer.dim, context)
        for key in (k_key, v_key):
            if header.shape(key) != expected:
                raise NestedWeightsError(
                    f"{header.name}: '{key}' has shape {list(header.shape(key))}, but it is the weight of layer "
                    f"{layer.key} (width {layer.dim}) by the diffusers layer order, so it must be {list(expected)}. "
                    "The file is not for this UNet, or its layers are in another order.")
        i = position[layer.key]
        sources[f"projections.{i}.to_k.weight"] = k_key
        sources[f"projections.{i}.to_v.weight"] = v_key
    return tuple(table), numbering


def plan_encoder(
    header: Header,
    *,
    layers: Sequence[LayerSpec] | None = None,
    context_dim: int = SDXL_CONTEXT_DIM,
    dim_head: int | None = None,
    hidden_layer: str | None = None,
    clip_vision: ClipVisionSpec | None = None,
    config: EncoderConfig | None = None,
) -> Plan:
    """Decide from the header alone what the file is and how each encoder tensor is filled.

    layers: the UNet's cross-attention table (default: SDXL's 70 layers). dim_head: the Resampler's head
    width (default 64, see the module docstring). hidden_layer / clip_vision: override what the file implies
    about the CLIP vision tokens it reads. config: the config of a file in the pack's own layout whose
    metadata was dropped (`convert --config-from`). Raises NestedWeightsError naming what was found and
    expected.
    """
    if header.metadata.get("format") == FORMAT:
        return _plan_native(header)
    if _has_own_layout(header):
        if config is None:
            raise NestedWeightsError(_metadata_dropped(header))
        plan = _plan_own(header, config, "its config (taken from another file)")
        plan.notes.append("config not in the file's metadata: given with it (convert --config-from)")
        return plan
    _diagnose_other_models(header)
    resampler = _find_resampler(header)
    layer_keys = {k: m for k in header.tensors if (m := _LAYER_DIFFUSERS.match(k) or _LAYER_NUMBERED.match(k))}
    rest = sorted(set(header.tensors) - set(layer_keys) - set(resampler.keys if resampler else ()), key=_natural)
    if resampler is None or not layer_keys:
        found = header.metadata.get("format")
        raise NestedWeightsError(
            f"{header.name} is not a weight layout this pack reads (expected metadata format '{FORMAT}', found "
            f"{found!r}; " + ("no Resampler group found" if resampler is None else "no per-layer to_k_*/to_v_* weights found")
            + "). Key groups found:\n  " + "\n  ".join(summarize_groups(header) or ["(no tensors)"])
            + f"\n{_EXPECTED_TEXT} Run `python -m nested_attention.describe {header.name}` and report its output if "
            "this is a nested attention encoder the pack should read.")
    if rest:
        raise NestedWeightsError(
            f"{header.name}: besides the Resampler under '{resampler.prefix}' and the per-layer weights, the file "
            f"holds tensors this pack does not know how to use: {rest[:6]}{' ...' if len(rest) > 6 else ''}. "
            "Loading it without them would not compute what the file's model computes, so it is refused. "
            f"{_EXPECTED_TEXT}")

    qformer = resampler.config(dim_head or DEFAULT_DIM_HEAD, header.name)
    context = qformer.output_dim
    if context != context_dim:
        raise NestedWeightsError(
            f"{header.name}: its Resampler writes tokens {context} wide, but the model's cross-attention reads a "
            f"{context_dim}-wide context (SDXL). {_model_hint(context)}")

    sources = resampler.sources()
    table, numbering = _plan_layers(header, layer_keys, layers, context, sources)

    exact_ip_adapter = (
        resampler.prefix == "image_proj." and numbering.startswith("attn_processors")
        and all(re.fullmatch(r"ip_adapter\.\d+\.to_[kv]_ip\.weight", k) for k in layer_keys))
    spec = clip_vision or KNOWN_CLIP_VISION.get(qformer.clip_dim)
    if spec is None:
        raise NestedWeightsError(
            f"{header.name}: its Resampler reads CLIP tokens {qformer.clip_dim} wide; the pack knows the CLIP "
            f"vision models of widths {sorted(KNOWN_CLIP_VISION)} (ViT-H/14, ViT-bigG/14). Say which CLIP vision "
            "model it reads (clip_vision=ClipVisionSpec(...)).")
    # IP-Adapter Plus reads hidden_states[-2]; a given clip_vision describes the tower, not the layer read.
    spec = replace(spec, hidden_layer=hidden_layer or "penultimate")
    notes = [f"Resampler heads = {qformer.heads} from to_q rows {qformer.heads * qformer.dim_head} / dim_head "
             f"{qformer.dim_head}" + ("" if dim_head else " (assumed; override with dim_head / --dim-head)"),
             f"per-layer weights numbered by {numbering}, mapped in diffusers order (down, up, mid)"]
    if exact_ip_adapter:
        fmt, domain, source, licence = "ip-adapter-plus-sdxl", "ip-adapter-plus", IP_ADAPTER_SOURCE, IP_ADAPTER_LICENCE
        notes.append(f"CLIP tokens: {spec.hidden_layer} hidden layer (IP-Adapter Plus reads hidden_states[-2])")
    else:
        fmt, domain, source, licence = "ip-adapter-derived", "faces", DERIVED_SOURCE, DERIVED_LICENCE
        notes.append(f"CLIP tokens: {spec.hidden_layer} hidden layer"
                     + ("" if hidden_layer else " (assumed from IP-Adapter Plus, which this layout derives from; "
                        "override with hidden_layer / --hidden-layer)"))
    config = EncoderConfig(domain=domain, token="person", alpha=2.0, qformer=qformer, clip_vision=spec,
                           layers=tuple(table), source=source, licence=licence)
    return Plan(format=fmt, config=config, sources=sources, notes=notes)


def _plan_native(header: Header) -> Plan:
    version = header.metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise NestedWeightsError(
            f"{header.name} has format version {version!r}; this version of the pack reads version {FORMAT_VERSION}. "
            "Update the pack, or re-export the encoder with the matching trainer.")
    return _plan_own(header, parse_config(header.name, header.metadata), "its own config")


def _has_own_layout(header: Header) -> bool:
    """Tensors named as the pack's NestedEncoder names them (qformer.*, projections.#.to_k/to_v)."""
    return "qformer.latents" in header.tensors and any(k.startswith("projections.") for k in header.tensors)


def _metadata_dropped(header: Header) -> str:
    """The message for a file in the pack's own layout without the metadata that says how to use it."""
    t = header.tensors
    latents, to_q = header.shape("qformer.latents"), header.shape("qformer.blocks.0.0.to_q.weight")
    proj_in = header.shape("qformer.proj_in.weight")
    blocks = {m.group(1) for k in t if (m := re.match(r"qformer\.blocks\.(\d+)\.", k))}
    layers = {m.group(1) for k in t if (m := re.match(r"projections\.(\d+)\.", k))}
    shapes = []
    if latents and len(latents) == 2:
        shapes.append(f"M={latents[0]} subject tokens, a Q-Former {latents[1]} wide and {len(blocks)} blocks deep")
    if proj_in and len(proj_in) == 2:
        shapes.append(f"reading CLIP tokens {proj_in[1]} wide")
    shapes.append(f"{len(layers)} cross-attention layers")
    heads = f" (to_q has {to_q[0]} rows: heads x head width)" if to_q else ""
    missing = sorted({"format", "format_version", "config"} - set(header.metadata))
    return (
        f"{header.name} holds this pack's own encoder tensors (qformer.*, projections.*) but its metadata lacks "
        f"{', '.join(repr(m) for m in missing)}: a tool that merges or converts .safetensors files dropped it. Its "
        f"shapes give {', '.join(shapes)}; they cannot give the head count{heads}, which CLIP hidden layer and crop "
        "it reads, alpha, the subject word or the face alignment, and a guess at any of them would encode "
        "differently without a word. Restore the metadata from a file of the same training run (its export, or "
        f"checkpoint-N/<domain>-encoder.safetensors): python -m nested_attention.convert {header.name} "
        f"FIXED.safetensors --config-from ORIGINAL.safetensors")


def _plan_own(header: Header, config: EncoderConfig, whose: str) -> Plan:
    """The plan of a file in the pack's own layout, checked tensor by tensor against `config`."""
    # Counts first, from the header's names: a config claiming a billion blocks or layers is refused before a
    # module of that size is built (even on the meta device that would take hours).
    blocks = {m.group(1) for k in header.tensors if (m := re.match(r"qformer\.blocks\.(\d+)\.", k))}
    projections = {m.group(1) for k in header.tensors if (m := re.match(r"projections\.(\d+)\.", k))}
    if (config.qformer.depth, len(config.layers)) != (len(blocks), len(projections)):
        raise NestedWeightsError(
            f"{header.name} does not match {whose}: the config has {config.qformer.depth} Q-Former blocks "
            f"and {len(config.layers)} layers, the file's tensors {len(blocks)} blocks and {len(projections)} "
            "layers. The file is damaged or was edited, or the config is another encoder's.")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in NestedEncoder(config).state_dict().items()}
    found = set(header.tensors)
    missing, unexpected = sorted(set(expected) - found), sorted(found - set(expected))
    if missing or unexpected:
        raise NestedWeightsError(
            f"{header.name} does not match {whose} (M={config.num_tokens}, {len(config.layers)} layers): "
            f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected tensors "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. The file is damaged or was edited; re-export it.")
    for key, shape in expected.items():
        if header.shape(key) != shape:
            raise NestedWeightsError(
                f"{header.name}: tensor '{key}' has shape {header.shape(key)}, expected {shape} from {whose}. "
                "The file is damaged or was edited; re-export it.")
    return Plan(format=FORMAT, config=config, sources={k: k for k in expected})


def _model_hint(context: int) -> str:
    if context == 768:
        return ("A 768-wide context is Stable Diffusion 1.5's: this looks like an SD1.5 IP-Adapter. Nested attention "
                "here is for SDXL: use ip-adapter-plus_sdxl_vit-h.safetensors or ip-adapter-plus-face_sdxl_vit-h.safetensors.")
    if context == 1024:
        return "A 1024-wide context is Stable Diffusion 2.x's; use an SDXL IP-Adapter Plus file."
    return "Use an SDXL IP-Adapter Plus file (ip-adapter-plus_sdxl_vit-h.safetensors) or an encoder made by the trainer."


def _diagnose_other_models(header: Header) -> None:
    """Clear messages for IP-Adapter files that are not Plus (no Resampler over CLIP tokens)."""
    keys = set(header.tensors)
    faceid_lora = re.compile(r"(?:^|\.)\d+\.to_(?:q|k|v|out)_lora\.")
    if any(faceid_lora.search(k) for k in keys) or any(k.startswith("image_proj.perceiver_resampler.") for k in keys):
        raise NestedWeightsError(
            f"{header.name} is an IP-Adapter FaceID file (its image projection reads an insightface identity "
            "embedding, and it carries LoRA weights), not a Resampler over CLIP image tokens. Nested attention "
            "cannot use it; use ip-adapter-plus-face_sdxl_vit-h.safetensors or the Nested Attention authors' encoder.")
    if "image_proj.proj.weight" in keys and "image_proj.norm.weight" in keys:
        raise NestedWeightsError(
            f"{header.name} is a plain IP-Adapter (its image projection maps CLIP's pooled embedding to 4 tokens), "
            "not IP-Adapter Plus (a Resampler over CLIP image tokens). Use ip-adapter-plus_sdxl_vit-h.safetensors.")
    if any(k.startswith("image_proj.proj.") for k in keys) and "image_proj.latents" not in keys:
        raise NestedWeightsError(
            f"{header.name} has an MLP image projection (IP-Adapter Full Face or FaceID), not a Resampler over "
            "CLIP image tokens; nested attention cannot use it. Use an IP-Adapter Plus SDXL file.")


# ------------------------------------------------------------------------------------------------
# The Resampler group


@dataclass
class _Resampler:
    prefix: str
    depth: int
    num_queries: int
    dim: int
    clip_dim: int
    inner: int
    ff_inner: int
    output_dim: int
    ff_bias: bool
    latents_key: str
    keys: list[str]

    def config(self, dim_head: int, name: str) -> QFormerConfig:
        if self.inner % dim_head:
            raise NestedWeightsError(
                f"{name}: the Resampler's to_q has {self.inner} rows, not a multiple of dim_head {dim_head}; "
                "give the right head width (dim_head / --dim-head).")
        if self.ff_inner % self.dim:
            raise NestedWeightsError(f"{name}: feed-forward width {self.ff_inner} is not a multiple of {self.dim}.")
        return QFormerConfig(clip_dim=self.clip_dim, dim=self.dim, depth=self.depth, heads=self.inner // dim_head,
                             dim_head=dim_head, num_queries=self.num_queries, output_dim=self.output_dim,
                             ff_mult=self.ff_inner // self.dim, ff_bias=self.ff_bias)

    def sources(self) -> dict[str, str]:
        p = self.prefix
        out = {"qformer.latents": self.latents_key}
        for part in ("proj_in", "proj_out", "norm_out"):
            out[f"qformer.{part}.weight"], out[f"qformer.{part}.bias"] = f"{p}{part}.weight", f"{p}{part}.bias"
        for n in range(self.depth):
            src, dst = f"{p}layers.{n}.", f"qformer.blocks.{n}."
            for ours, theirs in (("0.norm_media", "0.norm1"), ("0.norm_latents", "0.norm2"), ("1.0", "1.0")):
                for kind in ("weight", "bias"):
                    out[f"{dst}{ours}.{kind}"] = f"{src}{theirs}.{kind}"
            for part in ("0.to_q", "0.to_kv", "0.to_out", "1.1", "1.3"):
                out[f"{dst}{part}.weight"] = f"{src}{part}.weight"
            if self.ff_bias:
                out[f"{dst}1.1.bias"], out[f"{dst}1.3.bias"] = f"{src}1.1.bias", f"{src}1.3.bias"
        return out


def _find_resampler(header: Header) -> _Resampler | None:
    prefixes = [k[: -len("latents")] for k in header.tensors if k.endswith("latents")
                and (k == "latents" or k.endswith(".latents")) and f"{k[:-len('latents')]}proj_in.weight" in header.tensors]
    if not prefixes:
        return None
    if len(prefixes) > 1:
        raise NestedWeightsError(f"{header.name} holds several Resampler groups ({prefixes}); expected one.")
    p = prefixes[0]
    name = header.name
    keys = [k for k in header.tensors if k.startswith(p) and not (_LAYER_DIFFUSERS.match(k) or _LAYER_NUMBERED.match(k))]

    def shape(key: str) -> tuple[int, ...]:
        s = header.shape(p + key)
        if s is None:
            raise NestedWeightsError(
                f"{name}: the Resampler under '{p}' has no '{p}{key}' (found: "
                f"{summarize_groups(Header(header.path, {k: header.tensors[k] for k in keys}, {}), 12)}). "
                "The file is incomplete or not an IP-Adapter Plus-style Resampler.")
        return s

    latents = shape("latents")
    if len(latents) == 3 and latents[0] == 1:
        latents = latents[1:]
    if len(latents) != 2:
        raise NestedWeightsError(f"{name}: '{p}latents' has shape {list(shape('latents'))}; expected [1, M, dim].")
    num_queries, dim = latents
    dim_in, clip_dim = _matrix(name, p + "proj_in.weight", shape("proj_in.weight"))
    output_dim, _ = _matrix(name, p + "proj_out.weight", shape("proj_out.weight"))
    depths = {int(m.group(1)) for k in keys if (m := re.match(re.escape(p) + r"layers\.(\d+)\.", k))}
    depth = len(depths)
    if depth == 0 or depths != set(range(depth)):
        raise NestedWeightsError(f"{name}: Resampler layers {sorted(depths)} under '{p}layers.'; expected 0..N-1.")
    inner = shape("layers.0.0.to_q.weight")[0]
    ff_inner = shape("layers.0.1.1.weight")[0]
    ff_bias = f"{p}layers.0.1.1.bias" in header.tensors
    expected = {
        "latents": shape("latents"), "proj_in.weight": (dim, clip_dim), "proj_in.bias": (dim,),
        "proj_out.weight": (output_dim, dim), "proj_out.bias": (output_dim,),
        "norm_out.weight": (output_dim,), "norm_out.bias": (output_dim,),
    }
    for n in range(depth):
        q = f"layers.{n}."
        expected.update({
            q + "0.norm1.weight": (dim,), q + "0.norm1.bias": (dim,), q + "0.norm2.weight": (dim,), q + "0.norm2.bias": (dim,),
            q + "0.to_q.weight": (inner, dim), q + "0.to_kv.weight": (2 * inner, dim), q + "0.to_out.weight": (dim, inner),
            q + "1.0.weight": (dim,), q + "1.0.bias": (dim,), q + "1.1.weight": (ff_inner, dim), q + "1.3.weight": (dim, ff_inner),
        })
        if ff_bias:
            expected.update({q + "1.1.bias": (ff_inner,), q + "1.3.bias": (dim,)})
    if dim_in != dim:
        raise NestedWeightsError(f"{name}: '{p}proj_in.weight' maps to {dim_in}, but the latents are {dim} wide.")
    found = {k[len(p):]: header.tensors[k].shape for k in keys}
    missing = sorted(set(expected) - set(found), key=_natural)
    unexpected = sorted(set(found) - set(expected), key=_natural)
    wrong = [f"{p}{k}: {list(found[k])}, expected {list(s)}" for k, s in expected.items() if k in found and found[k] != s]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {[p + k for k in missing[:6]]}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"unexpected {[p + k for k in unexpected[:6]]}{' ...' if len(unexpected) > 6 else ''} "
                         "(a Resampler with a positional embedding or mean-pooled latents is not supported)")
        if wrong:
            parts.append("wrong shapes: " + "; ".join(wrong[:4]))
        raise NestedWeightsError(
            f"{name}: the Resampler under '{p}' (M={num_queries}, width {dim}, depth {depth}) is not the "
            f"IP-Adapter Plus Resampler: {', '.join(parts)}. The file is damaged or of another model.")
    return _Resampler(prefix=p, depth=depth, num_queries=num_queries, dim=dim, clip_dim=clip_dim, inner=inner,
                      ff_inner=ff_inner, output_dim=output_dim, ff_bias=ff_bias, latents_key=p + "latents", keys=keys)


def _matrix(name: str, key: str, shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) != 2:
        raise NestedWeightsError(f"{name}: '{key}' has shape {list(shape)}; expected a 2-D weight.")
    return shape[0], shape[1]


# ------------------------------------------------------------------------------------------------
# Per-layer key/value weights


def _order_layer_keys(header: Header, matches: dict, table: Sequence[LayerSpec] | None) -> tuple[list[tuple[str, str]], str]:
    """(k key, v key) per layer in diffusers order, and how the file numbers its layers."""
    name = header.name
    diffusers = {k: m for k, m in matches.items() if m.re is _LAYER_DIFFUSERS}
    if diffusers and len(diffusers) != len(matches):
        raise NestedWeightsError(f"{name} mixes numbered and diffusers-path layer keys; expected one layout.")
    pairs: dict[tuple, dict[str, str]] = {}
    suffixes, prefixes = set(), set()
    for key, m in matches.items():
        if m.re is _LAYER_DIFFUSERS:
            stage = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}[m["stage"]]
            slot = (stage, int(m["b"] or 0), int(m["a"]), int(m["t"]))
        else:
            slot = (int(m["n"]),)
        prefixes.add(m["prefix"])
        suffixes.add(m["suffix"])
        entry = pairs.setdefault(slot, {})
        if m["kind"] in entry:
            raise NestedWeightsError(
                f"{name}: layer {slot} has two {m['kind']}_* weights ('{entry[m['kind']]}', '{key}'); expected one key "
                "and one value weight per layer.")
        entry[m["kind"]] = key
    if len(prefixes) > 1 or len(suffixes) > 1:
        raise NestedWeightsError(
            f"{name}: per-layer weights under several prefixes/suffixes ({sorted(prefixes)}, {sorted(suffixes)}); "
            "expected one group (e.g. ip_adapter.#.to_k_ip.weight).")
    for slot, entry in pairs.items():
        if set(entry) != {"to_k", "to_v"}:
            have = next(iter(entry.values()))
            raise NestedWeightsError(
                f"{name}: layer {slot} has only '{have}'; every layer needs both a to_k_* and a to_v_* weight. "
                "The file is incomplete: download it again.")
    if diffusers:
        return _order_diffusers(name, pairs, table), "diffusers module paths"
    numbers = sorted(slot[0] for slot in pairs)
    count = len(table) if table is not None else None
    odd = [2 * i + 1 for i in range(count if count is not None else (max(numbers) + 1) // 2)]
    if all(n % 2 == 1 for n in numbers):
        missing = sorted(set(odd) - set(numbers))
        extra = sorted(set(numbers) - set(odd))
        if missing or extra:
            k_name = pairs[(numbers[0],)]["to_k"]
            pattern = re.sub(r"\.\d+\.", ".{n}.", k_name, count=1)
            raise NestedWeightsError(
                f"{name}: per-layer weights {pattern} for n = {_ranges(numbers)}; expected n = 1, 3, ..., "
                f"{odd[-1] if odd else 1} ({len(odd)} layers)"
                + (f": missing n = {missing[:8]}{' ...' if len(missing) > 8 else ''}" if missing else "")
                + (f", unexpected n = {extra[:8]}" if extra else "") + ". The file is incomplete or for another UNet.")
        return [(pairs[(n,)]["to_k"], pairs[(n,)]["to_v"]) for n in odd], "attn_processors (odd numbers = attn2)"
    consecutive = list(range(count if count is not None else max(numbers) + 1))
    if numbers == consecutive:
        return [(pairs[(n,)]["to_k"], pairs[(n,)]["to_v"]) for n in consecutive], "cross-attention position (0..L-1)"
    if 0 in numbers and set(numbers) < set(consecutive):
        missing = sorted(set(consecutive) - set(numbers))
        raise NestedWeightsError(
            f"{name}: per-layer weights numbered {_ranges(numbers)}; expected 0, 1, ..., {consecutive[-1]} "
            f"({len(consecutive)} layers): missing n = {missing[:8]}{' ...' if len(missing) > 8 else ''}. The file is "
            "incomplete or for another UNet.")
    raise NestedWeightsError(
        f"{name}: per-layer weights numbered {_ranges(numbers)}; expected 1, 3, 5, ... (IP-Adapter's attention-processor "
        f"numbering) or 0, 1, 2, ... (one entry per cross-attention layer)"
        + (f" for {count} layers" if count is not None else "") + ". The file is incomplete or for another UNet.")


def _order_diffusers(name: str, pairs: dict, table: Sequence[LayerSpec] | None) -> list[tuple[str, str]]:
    """Diffusers paths in attn_processors order; each stage's (block, attention) groups match the table's."""
    slots = sorted(pairs)  # (stage, block, attention, transformer) sorts exactly as attn_processors walks
    if table is not None:
        # Same number of transformer blocks per (stage, group) as the table, group by group.
        by_stage: dict[int, dict] = {}
        for stage, b, a, t in slots:
            by_stage.setdefault(stage, {}).setdefault((b, a), []).append(t)
        rank = {"input": 0, "output": 1, "middle": 2}
        table_groups: dict[int, dict] = {}
        for layer in table:
            table_groups.setdefault(rank[layer.block], {}).setdefault(layer.number, []).append(layer.index)
        for stage in range(3):
            mine = [sorted(v) for _, v in sorted(by_stage.get(stage, {}).items())]
            theirs = [sorted(v) for _, v in sorted(table_groups.get(stage, {}).items())]
            if mine != theirs:
                label = ("down_blocks", "up_blocks", "mid_block")[stage]
                raise NestedWeightsError(
                    f"{name}: the {label} attn2 layers of the file (transformer blocks per attention: "
                    f"{[len(v) for v in mine]}) do not match the model's ({[len(v) for v in theirs]}). The file is "
                    "incomplete or for another UNet.")
    return [(pairs[s]["to_k"], pairs[s]["to_v"]) for s in slots]


def _ranges(numbers: Sequence[int]) -> str:
    if len(numbers) <= 8:
        return ", ".join(map(str, numbers))
    return f"{numbers[0]}, {numbers[1]}, ..., {numbers[-1]} ({len(numbers)} numbers)"


# ------------------------------------------------------------------------------------------------
# Loading


def count_non_finite(tensor: torch.Tensor) -> int:
    """How many values of `tensor` (one of FLOAT_DTYPES) are NaN or infinite. One min/max pass proves there
    are none (aminmax propagates NaN, and an infinite value is the min or the max); only a tensor that has
    some is counted value by value. isfinite().sum() alone copies the tensor to bools and sums them: about
    18x the time, 1.6 s of the 1.8 s a full-size IP-Adapter Plus file took to load on one thread."""
    if tensor.numel() == 0:
        return 0
    low, high = torch.aminmax(tensor.detach())
    if torch.isfinite(low) and torch.isfinite(high):
        return 0
    return tensor.numel() - int(torch.isfinite(tensor).sum())


def load_planned(path: str, plan: Plan, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None) -> NestedEncoder:
    """Build the planned encoder and fill every tensor from its source key (shapes checked, values finite)."""
    name = os.path.basename(path)
    with torch.device("meta"):
        encoder = NestedEncoder(plan.config)
    expected = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    if set(expected) != set(plan.sources):
        raise NestedWeightsError(f"{name}: internal plan mismatch ({sorted(set(expected) ^ set(plan.sources))[:4]}).")
    state = {}
    with safe_open(path, framework="pt") as f:
        file_dtypes = {src: f.get_slice(src).get_dtype() for src in plan.sources.values()}
        for src, found in file_dtypes.items():
            if found not in FLOAT_DTYPES:
                raise NestedWeightsError(
                    f"{name}: tensor '{src}' is {found}; encoder weights are {'/'.join(FLOAT_DTYPES)}. The file is "
                    "damaged or not an encoder: download or export it again.")
        # One dtype for the whole module: the file's, or float32 where the file mixes dtypes.
        kinds = set(file_dtypes.values())
        target = dtype or (FLOAT_DTYPES[kinds.pop()] if len(kinds) == 1 else torch.float32)
        for key, shape in expected.items():
            src = plan.sources[key]
            tensor = f.get_tensor(src)
            if tensor.numel() != torch.Size(shape).numel():
                raise NestedWeightsError(f"{name}: '{src}' has shape {list(tensor.shape)}, expected {list(shape)}.")
            bad = count_non_finite(tensor)
            if bad:  # NaN weights would give NaN subject values: black images, with no error anywhere
                raise NestedWeightsError(
                    f"{name}: tensor '{src}' holds {bad} NaN or infinite value(s) of {tensor.numel()}; an encoder "
                    "with them gives black images. The file is damaged (or the training run diverged): download "
                    "it again, or export it from an earlier checkpoint.")
            state[key] = tensor.reshape(shape).to(device=device, dtype=target)
    encoder.load_state_dict(state, strict=True, assign=True)  # the meta-device module takes the tensors
    return encoder.eval().requires_grad_(False)
