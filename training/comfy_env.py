"""ComfyUI as a library for the trainer: find it, put it on sys.path, keep it off our argv.

The trainer uses ComfyUI's `comfy` package as its SDXL model library (UNet, VAE, text encoders,
CLIP vision loading, sampler). `setup_comfy()` must run before anything imports
`comfy.model_management`, which reads its arguments once at import: it turns argv parsing off
(ComfyUI would otherwise parse the trainer's flags) and selects the CPU when there is no GPU.

No training module imports ComfyUI when it is imported: `comfy_module(name)` stands for a module that needs
ComfyUI and imports it, after `setup_comfy()`, on its first use (`comfy = comfy_module("comfy")`, then
`comfy.sd.load_checkpoint_guess_config(...)` as usual). So `python -m training.run --help` works without
ComfyUI, and ComfyUI picks its device only after accelerate has given this process one.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

import torch

from nested_attention.logs import LOG_PREFIX

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger(__name__)


class ComfyNotFoundError(RuntimeError):
    pass


def comfyui_candidates() -> list[Path]:
    """Where ComfyUI is looked for: $COMFYUI_PATH, the ComfyUI this repo sits in, `.comfyui/ComfyUI`."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return [Path(env).expanduser()]
    candidates = []
    for here in (Path(os.path.abspath(__file__)).parents[1], REPO):  # the repo as linked, and as resolved
        if here.parent.name == "custom_nodes":
            candidates.append(here.parent.parent)
    candidates.append(REPO / ".comfyui" / "ComfyUI")
    return candidates


def find_comfyui() -> Path:
    candidates = comfyui_candidates()
    for path in candidates:
        if (path / "comfy" / "model_management.py").is_file():
            return path.resolve()
    raise ComfyNotFoundError(
        f"ComfyUI not found (looked in {', '.join(str(p) for p in candidates)}). "
        "The trainer uses ComfyUI's model "
        "code: set COMFYUI_PATH to a ComfyUI folder (the one with main.py), clone this repo into "
        "ComfyUI/custom_nodes/, or run `python3 dev.py test` once to install the pinned copy into .comfyui/."
    )


def has_accelerator() -> bool:
    """Whether torch sees a GPU-like device; without one ComfyUI must be told to use the CPU."""
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return True
    return torch.backends.mps.is_available()


def setup_comfy() -> Path:
    """Make `comfy` importable: ComfyUI first on sys.path, no argv parsing, `--cpu` without a GPU."""
    path = str(find_comfyui())
    # First on sys.path: ComfyUI's own top-level modules (nodes, folder_paths, ...) must win over
    # anything with the same name, e.g. this repo's `nodes/` package.
    while path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)

    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    if not has_accelerator():
        if "comfy.model_management" in sys.modules and not comfy.cli_args.args.cpu:
            log.warning(
                "%s comfy.model_management was imported before setup_comfy(); --cpu cannot take effect any more",
                LOG_PREFIX,
            )
        comfy.cli_args.args.cpu = True
    return Path(path)


class LazyModule:
    """A module that needs ComfyUI, imported (after `setup_comfy()`) on first attribute access.

    An attribute that is a submodule resolves to that submodule (itself lazy while it is a package), so
    `comfy.ldm.modules.attention.SpatialTransformer` works without importing each level by hand.
    """

    def __init__(self, name: str):
        self._name = name

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        setup_comfy_once()
        module = importlib.import_module(self._name)
        value = getattr(module, attr, None)
        if value is None or isinstance(value, type(module)):
            full = f"{self._name}.{attr}"
            try:
                submodule = importlib.import_module(full)
            except ModuleNotFoundError as e:
                if e.name != full:
                    raise
                value = getattr(module, attr)  # AttributeError names what is missing
            else:
                value = LazyModule(full) if hasattr(submodule, "__path__") else submodule
        setattr(self, attr, value)  # later look-ups skip __getattr__
        return value


def comfy_module(name: str) -> LazyModule:
    """`name` (a module that imports ComfyUI) as a `LazyModule`: imported on first use, never at import."""
    return LazyModule(name)


_SET_UP: list[Path] = []


def setup_comfy_once() -> Path:
    """`setup_comfy()` the first time; the path it found after that."""
    if not _SET_UP:
        _SET_UP.append(setup_comfy())
    return _SET_UP[0]
