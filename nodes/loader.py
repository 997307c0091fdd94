"""Load Nested Encoder: an encoder file (models/nested_attention, or an IP-Adapter Plus SDXL file from
models/ipadapter) plus the CLIP vision model it reads."""

from __future__ import annotations

import logging
from typing import Any

import comfy.model_management
import comfy.model_patcher
import folder_paths
import torch
from comfy_api.latest import io

from nested_attention import ClipVisionSpec, NestedEncoder, load_encoder, read_config
from nested_attention.logs import LOG_PREFIX
from nested_attention_comfy.clip_vision import NestedEncoderLoadError, check_clip_vision, load_clip_vision

from .wires import CATEGORY, EncoderHandle, NestedEncoderType, names_the_node

FOLDER = "nested_attention"
# IP-Adapter Plus SDXL files load as nested encoders (nested_attention.formats); users keep them here.
IPADAPTER_FOLDER = "ipadapter"
FOLDERS = (FOLDER, IPADAPTER_FOLDER)
log = logging.getLogger(__name__)


def searched_folders(folder: str) -> list[str]:
    try:
        return folder_paths.get_folder_paths(folder)
    except KeyError:
        return []


def encoder_files() -> list[str]:
    """Encoder files from models/nested_attention, then .safetensors files from models/ipadapter."""
    names: list[str] = []
    for folder in FOLDERS:
        try:
            found = folder_paths.get_filename_list(folder)
        except KeyError:  # folder not registered
            continue
        names += [n for n in found if n.lower().endswith(".safetensors") and n not in names]
    return names


def find_encoder(name: str) -> str | None:
    for folder in FOLDERS:
        try:
            path = folder_paths.get_full_path(folder, name)
        except KeyError:
            continue
        if path is not None:
            return path
    return None


def _load_named_clip_vision(expected: ClipVisionSpec, encoder_name: str) -> Any:
    path = folder_paths.get_full_path("clip_vision", expected.name)
    if path is None:
        folders = searched_folders("clip_vision")
        raise NestedEncoderLoadError(
            f"{encoder_name} needs the CLIP vision model {expected.name}, which is not in models/clip_vision "
            f"(searched: {', '.join(folders) or 'no folder registered'}). Download it into one of those "
            "folders, or connect a Load CLIP Vision node to this node's clip_vision input."
        )
    return load_clip_vision(path)


def encoder_dtype(load_device: torch.device, params: int) -> torch.dtype:
    """The dtype the UNet would get on this device (float32 on a CPU), so that the encoder costs no more."""
    return comfy.model_management.unet_dtype(
        load_device, model_params=params, supported_dtypes=[torch.bfloat16, torch.float16, torch.float32]
    )


def make_handle(encoder: NestedEncoder, clip_vision: Any, name: str) -> EncoderHandle:
    """Wrap an encoder in a ModelPatcher that ComfyUI loads and offloads with the UNet."""
    patcher = comfy.model_patcher.ModelPatcher(
        encoder,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )
    return EncoderHandle(encoder=encoder, patcher=patcher, clip_vision=clip_vision, name=name)


# Where each kind of encoder file comes from and goes, for the message a missing file gets. No file in this
# pack's own format is published; these are the trained weights that exist (their loading: formats.py).
IP_ADAPTER_URL = "https://huggingface.co/h94/IP-Adapter/resolve/main/sdxl_models/"
ENCODER_SOURCES = (
    (f"IP-Adapter Plus SDXL (Apache-2.0), into models/{IPADAPTER_FOLDER}: {IP_ADAPTER_URL}"
    "ip-adapter-plus-face_sdxl_vit-h.safetensors (faces) or ip-adapter-plus_sdxl_vit-h.safetensors"),
    (f"the Nested Attention authors' face encoder (CC BY-NC-SA 4.0, non-commercial), into models/{FOLDER}: "
    "https://huggingface.co/orpatashnik/NestedAttentionEncoder (personalization_encoder/model.safetensors; "
    "rename it, e.g. nested-attention-faces.safetensors)"),
    f"your own, into models/{FOLDER}: python -m training.run --domain faces|pets (training/README.md)",
)


def _listed(folder: str) -> str:
    try:
        names = [n for n in folder_paths.get_filename_list(folder) if n.lower().endswith(".safetensors")]
    except KeyError:
        return "not registered"
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    return f"found there: {shown or 'no .safetensors file'}"


def missing_encoder_message(encoder_name: str) -> str:
    """What a user reads when the encoder file a graph names is in neither models/nested_attention nor
    models/ipadapter: a first line saying what is missing, then the folders searched, which kind of file goes
    in which folder, and where to get each."""
    def where(folder: str) -> str:
        return ", ".join(searched_folders(folder)) or "not registered"

    return "\n".join([
        f"Load Nested Encoder: encoder file {encoder_name!r} not found.",
        "Folders searched:",
        *(f"  models/{folder}: {where(folder)} ({_listed(folder)})" for folder in FOLDERS),
        "Which file goes where:",
        (f"  the pack's encoders (from its trainer or nested_attention.convert) and the authors' encoder -> "
        f"models/{FOLDER}"),
        f"  IP-Adapter Plus SDXL files (ip-adapter-plus*_sdxl_vit-h.safetensors) -> models/{IPADAPTER_FOLDER}",
        "Where to get one:",
        *(f"  - {source}" for source in ENCODER_SOURCES),
        "Then press R in the graph to refresh the file lists and pick the file in Load Nested Encoder.",
    ])


def load_handle(encoder_name: str, clip_vision: Any | None = None) -> EncoderHandle:
    path = find_encoder(encoder_name)
    if path is None:
        raise NestedEncoderLoadError(missing_encoder_message(encoder_name))
    # Any supported layout (the pack's files, IP-Adapter Plus SDXL, IP-Adapter-derived), fully validated:
    # format, shapes, every tensor; a file of another kind is refused with what was found and expected.
    # The header alone says which CLIP vision model the file needs: check that before loading any tensor.
    expected = read_config(path).clip_vision
    if clip_vision is None:
        clip_vision = _load_named_clip_vision(expected, encoder_name)
        check_clip_vision(expected, clip_vision, expected.name, encoder_name)
    else:
        # ComfyUI does not keep a CLIP vision model's file name: a connected one is checked by architecture.
        check_clip_vision(expected, clip_vision, "", encoder_name)
    encoder = load_encoder(path)
    load_device = comfy.model_management.get_torch_device()
    dtype = encoder_dtype(load_device, sum(p.numel() for p in encoder.parameters()))
    if dtype != next(encoder.parameters()).dtype:
        encoder = encoder.to(dtype)
    log.info(
        "%s loaded %s (%s, token '%s', M=%d, %d layers, CLIP %s hidden layer%s)",
        LOG_PREFIX,
        encoder_name,
        encoder.config.domain,
        encoder.config.token,
        encoder.config.num_tokens,
        len(encoder.config.layers),
        encoder.config.clip_vision.hidden_layer,
        f"; source {encoder.config.source}, licence {encoder.config.licence}" if encoder.config.source else "",
    )
    return make_handle(encoder, clip_vision, encoder_name)


class NestedAttentionLoadEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NestedAttentionLoadEncoder",
            display_name="Load Nested Encoder",
            category=CATEGORY,
            description="Loads a nested attention subject encoder (.safetensors from "
            "models/nested_attention, or an IP-Adapter Plus SDXL file from models/ipadapter) and the CLIP "
            "vision model it reads images with.",
            inputs=[
                io.Combo.Input(
                    "encoder_name",
                    options=encoder_files(),
                    tooltip="An encoder file exported by this pack's trainer, from models/nested_attention "
                    "(or a folder registered as 'nested_attention' in extra_model_paths.yaml), or an "
                    "IP-Adapter Plus SDXL file (ViT-H) from models/ipadapter.",
                ),
                io.ClipVision.Input(
                    "clip_vision",
                    optional=True,
                    tooltip="The CLIP vision model the encoder was trained with. Leave unconnected to load "
                    "the file the encoder names from models/clip_vision.",
                ),
            ],
            outputs=[
                NestedEncoderType.Output(
                    "encoder", display_name="encoder", tooltip="The encoder, for Encode Subject Image(s)."
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, encoder_name: str) -> bool | str:
        # Naming encoder_name here makes ComfyUI skip its own "Value not in list" check for it (0.33; 0.3.75
        # checks no V3 combo), so a missing file gets this message (which folders, where to get one) before
        # anything runs. ComfyUI wants exactly True for a valid input.
        if find_encoder(encoder_name) is None:
            return missing_encoder_message(encoder_name)
        return True

    @classmethod
    @names_the_node("Load Nested Encoder")
    def execute(cls, encoder_name: str, clip_vision: Any | None = None) -> io.NodeOutput:
        return io.NodeOutput(load_handle(encoder_name, clip_vision))
