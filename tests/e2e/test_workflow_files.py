"""The shipped workflow files are what the workflow tool builds (`python3 dev.py workflows`, devtools/).

Each workflow is built again in the frontend the tests run, as the tool builds it. On the frontend the files are
built with (ComfyUI 0.3.75's, devtools.workflows.FRONTEND_VERSION) the file's text must come out the same, byte
for byte; a newer frontend saves the same graph with a few more fields, so there the two must say the same
about the graph (devtools.workflows.canonical: nodes, places, sizes, widget values, model files, links, view).
"""

from __future__ import annotations

import json

import pytest
from harness import WORKFLOWS_DIR

from devtools import workflows

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.mark.parametrize("name", sorted(workflows.WORKFLOWS))
def test_shipped_workflow_is_what_the_tool_builds(name, frontend):
    shipped = (WORKFLOWS_DIR / f"{name}.json").read_text()
    built = workflows.build(frontend, name)
    if frontend.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__") == workflows.FRONTEND_VERSION:
        assert workflows.to_text(built) == shipped, f"{name}: run python3 dev.py workflows and commit the result"
    assert workflows.canonical(built) == workflows.canonical(json.loads(shipped)), (
        f"{name}: the shipped file is not what devtools/workflows.py builds: run python3 dev.py workflows")
