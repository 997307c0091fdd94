"""Nested Attention for ComfyUI: personalize SDXL with a subject encoder (arXiv 2501.01407).

ComfyUI loads this folder as a package from custom_nodes/. It registers the `nested_attention` models
folder (and `ipadapter`, if no other pack has) and exports `comfy_entrypoint` (ComfyUI's V3 registration:
the list of nodes, nodes/__init__.py) and its small frontend extension (web/), nothing else. No
NODE_CLASS_MAPPINGS: ComfyUI registers a pack from those when it has them and then never calls
comfy_entrypoint.
"""

import logging
import os
import sys

import folder_paths

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    # Appended, not inserted: ComfyUI's own top-level modules (its `nodes`) keep priority; this only makes
    # the core package `nested_attention` and its ComfyUI glue `nested_attention_comfy` importable.
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

# IP-Adapter Plus SDXL files are nested encoders too (see nested_attention/formats.py): Load Nested Encoder also
# lists models/ipadapter. ComfyUI_IPAdapter_plus registers the same name and keeps the paths it finds there.
if "ipadapter" not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths["ipadapter"] = (
        [os.path.join(folder_paths.models_dir, "ipadapter")],
        set(folder_paths.supported_pt_extensions),
    )

# The folders must exist for users to find them (the error messages and the workflows' Missing Models dialog
# send them there): models/nested_attention, and models/ipadapter where it is a registered folder. ComfyUI's
# models folder can be read-only (system installs, containers): then only warn.
for _name in ("nested_attention", "ipadapter"):
    _folder = os.path.join(folder_paths.models_dir, _name)
    if _folder not in folder_paths.folder_names_and_paths[_name][0]:
        continue
    try:
        os.makedirs(_folder, exist_ok=True)
    except OSError as error:
        from nested_attention.logs import LOG_PREFIX

        logging.getLogger(__name__).warning(
            "%s cannot create the models folder %s (%s); put the files in a folder registered as '%s' in "
            "extra_model_paths.yaml instead",
            LOG_PREFIX,
            _folder,
            error,
            _name,
        )

if __package__:  # always when ComfyUI loads the pack. pytest also imports this file (the repo root is a
    # package to it), as the plain module `__init__` when the checkout's folder name is no identifier
    # (`git clone ... comfyui-nested-attention`); a relative import would fail there.
    from .nodes import comfy_entrypoint

# The frontend extension that shows what Save Nested Subject saved (web/save_subject.js).
WEB_DIRECTORY = "./web"

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
