"""Nested Attention for ComfyUI: personalize SDXL with a subject encoder (arXiv 2501.01407).

ComfyUI loads this folder as a package from custom_nodes/. It registers the `nested_attention` models
folder and exports the node mappings, nothing else.
"""

import os
import sys

import folder_paths

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    # Appended, not inserted: ComfyUI's own top-level modules (its `nodes`) keep priority; this only makes
    # the core package `nested_attention` importable.
    sys.path.append(_PACK_DIR)

_MODELS = os.path.join(folder_paths.models_dir, "nested_attention")
if (
    "nested_attention" in folder_paths.folder_names_and_paths
):  # extra_model_paths.yaml came first: keep its folders
    _paths, _extensions = folder_paths.folder_names_and_paths["nested_attention"]
    if _MODELS not in _paths:
        _paths.append(_MODELS)
    if isinstance(_extensions, set):
        _extensions.add(".safetensors")
    elif ".safetensors" not in _extensions:
        _extensions.append(".safetensors")
else:
    folder_paths.folder_names_and_paths["nested_attention"] = ([_MODELS], {".safetensors"})

if __package__:  # always when ComfyUI loads the pack. pytest also imports this file (the repo root is a
    # package to it), as the plain module `__init__` when the checkout's folder name is no identifier
    # (`git clone ... comfyui-nested-attention`); a relative import would fail there.
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
