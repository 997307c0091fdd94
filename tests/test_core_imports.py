"""The core package imports where ComfyUI cannot be found; only the glue, `nested_attention_comfy`, needs it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: a finder first on sys.meta_path refuses `comfy` and ComfyUI's other
# top-level modules, whatever sys.path holds (this test process has ComfyUI on it).
SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, sys

    BLOCKED = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server"}

    class NoComfy(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, NoComfy())
    import nested_attention
    for name in ("attention", "capture", "encoder", "layers", "patch", "reference", "tokens", "weights"):
        importlib.import_module(f"nested_attention.{name}")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED or m.split(".")[0] == "nested_attention_comfy")
    assert not loaded, loaded
    try:
        import nested_attention_comfy.model  # the glue: needs comfy, so it must fail here
    except ModuleNotFoundError as e:
        assert e.name.split(".")[0] == "comfy", e
    else:
        raise AssertionError("nested_attention_comfy imported without comfy: the blocker does not work")
    print("ok", len(nested_attention.__all__))
    """
)


def test_core_imports_without_comfyui_and_never_imports_the_host_glue():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok ")
