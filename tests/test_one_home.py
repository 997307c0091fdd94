"""Concepts the nodes, the trainer and the benchmark share have one home each (issue 19, item 2)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("__init__.py", "nested_attention", "nodes", "training", "benchmark")


def product_files() -> list[Path]:
    files = []
    for name in PRODUCT:
        path = REPO / name
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return files


def test_the_log_prefix_is_written_once():
    from nested_attention.logs import LOG_PREFIX

    assert LOG_PREFIX == "[nested-attention]"  # what users search ComfyUI's console for
    written = [str(f.relative_to(REPO)) for f in product_files() if LOG_PREFIX in f.read_text()]
    assert written == ["nested_attention/logs.py"]

