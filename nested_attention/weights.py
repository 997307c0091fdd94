"""The encoder weight file: one .safetensors with the tensors and the config that built them.

Metadata (all strings, as safetensors requires):
    format          "nested-attention"
    format_version  "1"
    config          EncoderConfig as JSON (domain, token, alpha, Q-Former dims, CLIP vision, layers, and since
                    the IP-Adapter loader also ff_bias, hidden_layer, crop, source, licence: files written
                    before lack them and read with the old meaning, so the version stays 1)

`load_encoder` also reads IP-Adapter Plus SDXL files and IP-Adapter-derived layouts: every file is planned
from its header (names and shapes, no tensor loaded), then loaded, by formats.py, which also holds the
format's name and version and its error (this module imports formats.py, never the other way round). Files are read with
safetensors only (never pickle) and validated in full before any tensor is used.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import torch
from safetensors.torch import save_file

from .encoder import ClipVisionSpec, EncoderConfig, NestedEncoder
from .formats import FORMAT, FORMAT_VERSION, load_planned, plan_encoder, read_header
from .layers import LayerSpec


def _umask() -> int:
    """The process's umask, read without changing it (Linux: /proc), else by setting and restoring it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 (64 hex digits) of a module's parameters: each name, then its values as float32 bytes, in name
    order. The same weights give the same fingerprint on any device and process. The one definition of "these
    exact weights": the trainer's checkpoints, the evaluation's settings.json and saved subjects record it."""
    digest = hashlib.sha256()
    for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a .safetensors file atomically: into a temporary file beside `path`, flushed to disk, then
    renamed over it, so `path` is always either the old file or the whole new one (never a truncated one,
    whatever kills the process). The file gets the mode any new file gets (0666 less the umask; safetensors
    alone writes 0600). A failed write removes the temporary file and raises."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    try:  # the rename itself, on disk (not possible on every platform / file system)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_encoder(path: str, encoder: NestedEncoder, extra: dict[str, str] | None = None) -> None:
    """Write the encoder's tensors and config to `path` (.safetensors), atomically (`write_safetensors`)."""
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": encoder.config.to_json()}
    metadata.update(extra or {})
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in encoder.state_dict().items()}
    write_safetensors(path, tensors, metadata)


def read_config(path: str, **overrides) -> EncoderConfig:
    """The config of any supported file, from its header alone (cheap: no tensor is loaded).

    For the pack's own files it is the stored config; for IP-Adapter-style files the one the loader derives
    (overrides as for `load_encoder`).
    """
    return plan_encoder(read_header(path), **overrides).config


def load_encoder(
    path: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    *,
    layers: Sequence[LayerSpec] | None = None,
    dim_head: int | None = None,
    hidden_layer: str | None = None,
    clip_vision: ClipVisionSpec | None = None,
) -> NestedEncoder:
    """Load and fully validate an encoder file of any supported format into a NestedEncoder.

    The pack's own files, IP-Adapter Plus SDXL files and IP-Adapter-derived layouts (the authors' release) are
    told apart by their key groups and shapes. The conversion is planned from the header, then each tensor is
    read and checked. For other-than-own files: `layers` is the UNet's cross-attention table (default SDXL's
    70), `dim_head` the Resampler's head width (default 64), `hidden_layer` / `clip_vision` override the CLIP
    tokens the file is taken to read. Raises NestedWeightsError with what was expected, found, and what to do.
    """
    plan = plan_encoder(read_header(path), layers=layers, dim_head=dim_head, hidden_layer=hidden_layer,
                        clip_vision=clip_vision)
    return load_planned(path, plan, device=device, dtype=dtype)
