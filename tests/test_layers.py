"""The layers, read from the source: every module of every product package, by its import statements.

The product packages and what each may import:

- `nested_attention` (the core): torch, einops, safetensors and the standard library; never ComfyUI (`comfy`,
  `comfy_api`, `folder_paths`, ...), the glue, the nodes, the trainer, the benchmark or the tests.
- `nested_attention_comfy` (the glue): the core and ComfyUI; never the nodes, the trainer, the benchmark.
- `nodes`, `training`, `benchmark`: the core and the glue; `training` never imports `nodes`.
- No product module imports the tests (`tests/`'s modules: `tiny_models`, `pack_helpers`, ...).
- No import cycle among product modules.

Imports are read with `ast`, never executed, so a module's import-time side effects cannot hide or fake an
edge. Where an import sits matters only for cycles: an import inside a function still counts for every layer
rule (the module depends on what it imports whenever that code runs), and it counts for cycles too (a
function-level import is how a cycle is usually dodged, and a dodged cycle is still one: the two modules
cannot be understood or moved apart). Only imports under `if TYPE_CHECKING:` count for nothing at run time
and are left out of the cycles; they still obey the layer rules.

The last test imports the core in a fresh interpreter that has no ComfyUI on sys.path.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CORE = "nested_attention"
GLUE = "nested_attention_comfy"
PRODUCT = (CORE, GLUE, "nodes", "training", "benchmark")
# ComfyUI's top-level modules and packages (what its main.py puts on sys.path), any of which means ComfyUI.
COMFYUI = {
    "comfy", "comfy_api", "comfy_api_nodes", "comfy_config", "comfy_execution", "comfy_extras", "folder_paths",
    "execution", "server", "latent_preview", "node_helpers", "nodes", "app", "cuda_malloc", "main", "protocol",
    "utils", "comfyui_version",
}
# Top-level names each product package must not import (beyond the cycle rule).
FORBIDDEN = {
    CORE: COMFYUI | {GLUE, "nodes", "training", "benchmark"},
    GLUE: {"nodes", "training", "benchmark"},
    "training": {"nodes"},
}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, e.g. "nested_attention.weights"
    target: str  # the imported module, resolved to a product module where it is one, e.g. "nested_attention"
    line: int
    runtime: bool  # False under `if TYPE_CHECKING:`


def product_modules(root: Path, packages=PRODUCT) -> dict[str, Path]:
    """Every module of the product packages under `root`, by dotted name (a package by its own name)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def test_modules(root: Path) -> set[str]:
    """Top-level module names the tests folder provides (its files and folders), and `tests` itself."""
    tests = root / "tests"
    names = {p.stem for p in tests.glob("*.py")} | {p.name for p in tests.iterdir() if p.is_dir()}
    return (names - {"__init__", "__pycache__"}) | {"tests"}


test_modules.__test__ = False  # a helper, not a test


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers of the statements inside `if TYPE_CHECKING:` blocks."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """`name` as the product module it loads: the longest dotted prefix that is one, else `name` itself."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return name


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """The imports in one module's source, at any depth, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only = _type_checking_lines(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from a import b` loads a.b where that is a module, else takes a name from a.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for name in names:
            found.append(Import(module, _resolve(name, modules), node.lineno, node.lineno not in typing_only))
    return found


def layer_violations(root: Path, packages=PRODUCT) -> list[str]:
    """What breaks the rules in the module docstring, one line each (empty when nothing does)."""
    modules = product_modules(root, packages)
    tests = test_modules(root) if (root / "tests").is_dir() else {"tests"}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    problems = []
    for module, path in modules.items():
        package = module.split(".")[0]
        for imp in imports_of(module, path, modules):
            top = imp.target.split(".")[0]
            where = f"{path.relative_to(root)}:{imp.line}"
            if top in FORBIDDEN.get(package, ()):
                problems.append(f"{where}: {package} imports {imp.target}")
            elif top in tests:
                problems.append(f"{where}: a product module imports the tests' {imp.target}")
            if imp.target in modules and imp.target != module and imp.runtime:
                edges[module].add(imp.target)
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in import_cycles(edges)]
    return problems


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (first module repeated at the end) per strongly connected group of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in sorted(edges[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1:
                groups.append(set(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return [_cycle_in(min(group), group, edges) for group in groups]


def _cycle_in(start: str, group: set[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest path from `start` back to itself within `group` (breadth first)."""
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for succ in sorted(edges[node] & group):
            if succ == start:
                return paths[node] + [start]
            if succ not in paths:
                paths[succ] = paths[node] + [succ]
                queue.append(succ)
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")


# ------------------------------------------------------------------------------------------------


def test_every_product_module_keeps_to_its_layer_and_no_imports_go_round():
    modules = product_modules(REPO)
    for package in PRODUCT:  # the walk found each package's modules (a moved folder would empty it)
        assert any(m.split(".")[0] == package for m in modules), package
    assert {"nested_attention.formats", "nested_attention.weights", "nested_attention_comfy.words"} <= set(modules)
    assert layer_violations(REPO) == []


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


CLEAN = {
    "nested_attention/__init__.py": "from .maths import add\n",
    "nested_attention/maths.py": "import torch\n\ndef add(a, b):\n    return a + b\n",
    "nested_attention_comfy/__init__.py": "",
    "nested_attention_comfy/model.py": "import comfy.model_base\nfrom nested_attention.maths import add\n",
    "nodes/__init__.py": "from . import apply\n",
    "nodes/apply.py": "import folder_paths\nfrom nested_attention_comfy.model import add\nfrom .wires import X\n",
    "nodes/wires.py": "X = 1\n",
    "training/__init__.py": "",
    "training/run.py": "from nested_attention_comfy import model\nfrom . import steps\n",
    "training/steps.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .run import main\n",
    "benchmark/__init__.py": "",
    "benchmark/cli.py": "from training import run\n",
    "tests/tiny_models.py": "",
}


def test_a_clean_synthetic_tree_passes(tmp_path):
    _write(tmp_path, CLEAN)
    assert layer_violations(tmp_path) == []


def test_each_planted_violation_is_reported(tmp_path):
    _write(tmp_path, CLEAN)
    _write(tmp_path, {
        "nested_attention/comfy_use.py": "def f():\n    import comfy.sd  # a lazy import is still one\n",
        "nested_attention/uses_glue.py": "from nested_attention_comfy import model\n",
        "nested_attention/uses_nodes.py": "from nodes import apply\n",
        "nested_attention/reads_tests.py": "import tiny_models\n",
        "nested_attention_comfy/to_training.py": "import training.run\n",
        "training/to_nodes.py": "def f():\n    from nodes.apply import X\n",
        "benchmark/to_tests.py": "from tests import tiny_models\n",
        # a cycle dodged by a function-level import, and one through a package __init__
        "nested_attention/a.py": "from .b import g\n\ndef f():\n    return g()\n",
        "nested_attention/b.py": "def g():\n    from . import a\n    return a\n",
        "nodes/wires.py": "from . import apply\nX = 1\n",
    })
    problems = layer_violations(tmp_path)
    expected = [
        "nested_attention/comfy_use.py:2: nested_attention imports comfy.sd",
        "nested_attention/uses_glue.py:1: nested_attention imports nested_attention_comfy.model",
        "nested_attention/uses_nodes.py:1: nested_attention imports nodes.apply",
        "nested_attention/reads_tests.py:1: a product module imports the tests' tiny_models",
        "nested_attention_comfy/to_training.py:1: nested_attention_comfy imports training.run",
        "training/to_nodes.py:2: training imports nodes.apply",
        "benchmark/to_tests.py:1: a product module imports the tests' tests",
        "import cycle: nested_attention.a -> nested_attention.b -> nested_attention.a",
        "import cycle: nodes.apply -> nodes.wires -> nodes.apply",
    ]
    assert sorted(problems) == sorted(expected)


def test_the_core_imports_with_no_comfyui_on_sys_path(tmp_path):
    """Every core module imports in a fresh interpreter whose sys.path holds no ComfyUI; the glue does not."""
    core = sorted(m for m in product_modules(REPO, (CORE,)))
    script = textwrap.dedent(
        f"""
        import importlib, os, sys
        comfyui = [p for p in sys.path if os.path.isdir(os.path.join(p or ".", "comfy"))]
        assert not comfyui, comfyui
        for name in {core!r}:
            importlib.import_module(name)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {sorted(COMFYUI | {GLUE})!r})
        assert not loaded, loaded
        try:
            importlib.import_module("{GLUE}.model")
        except ModuleNotFoundError as e:
            assert e.name.split(".")[0] == "comfy", e
        else:
            raise AssertionError("the glue imported: ComfyUI is on sys.path after all")
        print("ok", len(sys.modules))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COMFYUI_PATH")}
    # cwd: an empty folder, so that neither the repo root's `nodes` nor ComfyUI's is on sys.path[0]; the core
    # comes from the installed (editable) pack.
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok ")


PLUGIN = """
import sys

def pytest_sessionfinish(session):
    comfyui = {comfyui!r}
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in comfyui)
    with open({out!r}, "w") as out:
        out.write("\\n".join(loaded))
"""


def test_core_tests_run_without_comfyui_imported(tmp_path):
    """The test modules that import only the core (conftest.needs_comfyui) run with no ComfyUI module imported,
    and the modules that need ComfyUI are told apart from them."""
    # tests/conftest.py by its path: the name `conftest` alone may be another folder's (tests/e2e/conftest.py).
    spec = importlib.util.spec_from_file_location("tests_conftest", REPO / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)

    tests = sorted((REPO / "tests").glob("test_*.py"))
    core_tests = [p for p in tests if not conftest.needs_comfyui(p) and p.name != Path(__file__).name]
    assert {"test_attention.py", "test_tokens.py", "test_encoder_weights.py"} <= {p.name for p in core_tests}
    assert conftest.needs_comfyui(REPO / "tests" / "test_nodes_apply.py")
    out = tmp_path / "loaded.txt"
    (tmp_path / "comfyui_probe.py").write_text(PLUGIN.format(comfyui=sorted(COMFYUI | {GLUE, "tiny_models"}),
                                                             out=str(out)))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "comfyui_probe", "-p", "no:cacheprovider",
         *(str(p) for p in core_tests)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert out.read_text() == "", f"ComfyUI modules imported by core tests: {out.read_text().split()[:10]}"
