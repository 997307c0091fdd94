"""The encoder weight file: one .safetensors with the tensors and the config that built them.

Metadata (all strings, as safetensors requires):
    format          "nested-attention"
    format_version  "1"
    config          EncoderConfig as JSON (domain, token, alpha, Q-Former dims, CLIP vision, layers)

Files are read with safetensors only (never pickle) and validated in full before any tensor is used.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .encoder import EncoderConfig, NestedEncoder

FORMAT = "nested-attention"
FORMAT_VERSION = 1


class NestedWeightsError(ValueError):
    """A weight file that cannot be used; the message says what was expected, found, and what to do."""


def save_encoder(path: str, encoder: NestedEncoder, extra: Optional[dict[str, str]] = None) -> None:
    """Write the encoder's tensors and config to `path` (.safetensors), atomically."""
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": encoder.config.to_json()}
    metadata.update(extra or {})
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in encoder.state_dict().items()}
    tmp = f"{path}.tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def read_config(path: str) -> EncoderConfig:
    """Read and check only the metadata of an encoder file (cheap: no tensor is loaded)."""
    name = os.path.basename(path)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise NestedWeightsError(
            f"{name} is not a readable .safetensors file ({e}). Expected an encoder exported by "
            "`python -m training.run`; re-export or re-download it.") from e
    found = metadata.get("format")
    if found != FORMAT:
        raise NestedWeightsError(
            f"{name} is not a nested attention encoder: expected metadata format '{FORMAT}', found "
            f"{found!r}. Put only files exported by this pack's trainer in models/nested_attention.")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise NestedWeightsError(
            f"{name} has format version {version!r}; this version of the pack reads version {FORMAT_VERSION}. "
            "Update the pack, or re-export the encoder with the matching trainer.")
    try:
        return EncoderConfig.from_json(metadata["config"])
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise NestedWeightsError(f"{name} has a missing or malformed 'config' entry in its metadata ({e}); "
                                 "re-export the encoder.") from e


def load_encoder(path: str, device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None) -> NestedEncoder:
    """Load and fully validate an encoder file: format, version, config, every tensor's name and shape."""
    name = os.path.basename(path)
    config = read_config(path)
    with torch.device("meta"):
        encoder = NestedEncoder(config)
    expected = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}

    with safe_open(path, framework="pt") as f:
        found_keys = set(f.keys())
        missing = sorted(set(expected) - found_keys)
        unexpected = sorted(found_keys - set(expected))
        if missing or unexpected:
            raise NestedWeightsError(
                f"{name} does not match its own config (M={config.num_tokens}, {len(config.layers)} layers): "
                f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected tensors "
                f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. The file is damaged or was edited; re-export it.")
        state = {}
        for key, shape in expected.items():
            tensor = f.get_tensor(key)
            if tuple(tensor.shape) != shape:
                raise NestedWeightsError(
                    f"{name}: tensor '{key}' has shape {tuple(tensor.shape)}, expected {shape} from the file's config. "
                    "The file is damaged or was edited; re-export it.")
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise NestedWeightsError(f"{name}: tensor '{key}' holds non-finite or non-float values; re-export it.")
            state[key] = tensor.to(device=device, dtype=dtype or tensor.dtype)

    encoder.load_state_dict(state, strict=True, assign=True)  # the meta-device module takes the tensors
    return encoder.eval().requires_grad_(False)
