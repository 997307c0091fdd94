"""Load this repo as ComfyUI loads a custom node pack: a package from its root __init__.py.

Never `import nodes`: that name is ComfyUI's own module. The pack gets a module name of its own
(`nested_attention_pack`), and its node modules are `nested_attention_pack.nodes.*`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import tiny_models  # noqa: F401  (sets ComfyUI up before folder_paths or comfy are imported)

REPO = Path(__file__).resolve().parents[1]
PACK_NAME = "nested_attention_pack"


def load_pack(name: str = PACK_NAME) -> ModuleType:
    """The pack module, loaded once per name with importlib, like ComfyUI's load_custom_node."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        unload_pack(name)
        raise
    return module


def unload_pack(name: str) -> None:
    """Forget a pack loaded under `name` and its submodules."""
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]
