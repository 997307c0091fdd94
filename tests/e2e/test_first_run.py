"""A new user's first run: the shipped workflows with no model file on disk, in the real frontend.

The shared e2e server (tests/e2e/conftest.py) runs with its model folders emptied for this module (the
files are moved aside and put back afterwards) and a fresh Chromium page opens its frontend, as on a fresh
install. Then
  - each workflow's Missing Models dialog (the frontend's own, from the loaders' `properties.models` and
    the workflow's `models`) lists every file the workflow's loaders name, with a download address the
    frontend accepts and the models folder it goes in;
  - pressing Run shows the pack's message for the missing encoder (which file, the folder searched, where
    to get one) instead of ComfyUI's "Value not in list".
Screenshots: tests/artifacts/e2e/first-run-*.png.
"""

from __future__ import annotations

import shutil

import pytest
from harness import ARTIFACTS_DIR, PACK_NAME, WORKFLOWS_DIR, Frontend
from make_workflows import FACES_ENCODER, IPADAPTER_FACE, MODELS

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

WORKFLOW_NAMES = sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))
# The loaders of the shipped workflows, with the models folders ComfyUI reads their file from: the files a
# workflow needs are read from the workflow itself. Load Nested Encoder lists two folders.
LOADERS = {"CheckpointLoaderSimple": ("checkpoints",), "CLIPVisionLoader": ("clip_vision",),
           "NestedAttentionLoadEncoder": ("nested_attention", "ipadapter")}
ALLOWED_SOURCES = ("https://huggingface.co/", "https://civitai.com/")  # the frontend's download allow-list


def needed_files(workflow: dict) -> dict[str, str]:
    """{file name: models folder}: what the loaders name, and the alternative face encoder."""
    files = {}
    for node in workflow["nodes"]:
        if node["type"] in LOADERS:  # each has one widget: the file's name
            file = node["widgets_values"][0]
            folder = MODELS[file]["directory"]
            assert folder in LOADERS[node["type"]], f"{node['type']} does not read {folder}/{file}"
            files[file] = folder
    if FACES_ENCODER in files:
        files[IPADAPTER_FACE] = "ipadapter"  # offered next to the authors' face encoder
    return files


# Opens a workflow as the template browser does (the real Missing Models dialog included).
_OPEN_JS = """
async ([workflow, name]) => {
  await window.app.loadGraphData(structuredClone(workflow), true, true, name);
}
"""

# The Missing Models dialog's rows: label ("folder / file"), the address it downloads from, any error.
_DIALOG_ROWS_JS = """
() => [...document.querySelectorAll('.comfy-missing-models [role=option]')].map((row) => ({
  text: row.innerText.replace(/\\s+/g, ' ').trim(),
  urls: [...row.querySelectorAll('[title]')].map((e) => e.title).filter((t) => t.startsWith('http')),
}))
"""


@pytest.fixture(scope="module")
def fresh_install(comfy):
    """The server with no model file at all, and a fresh frontend page on it."""
    models, aside = comfy.base / "models", comfy.base / "models-aside"
    moved = []
    for file in sorted(p for p in models.rglob("*") if p.is_file()):
        target = aside / file.relative_to(models)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(file, target)
        moved.append((file, target))
    try:
        with Frontend(comfy) as page:
            yield page
    finally:
        for file, target in moved:
            shutil.move(target, file)


def close_dialogs(frontend: Frontend) -> None:
    page = frontend.page
    for _ in range(3):
        if not page.locator(".p-dialog").count():
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_missing_models_dialog_lists_every_file_with_its_address_and_folder(name, fresh_install):
    frontend, page = fresh_install, fresh_install.page
    close_dialogs(frontend)
    workflow = frontend.fetch_template(PACK_NAME, name)
    frontend.evaluate(_OPEN_JS, [workflow, name])
    page.locator(".comfy-missing-models").wait_for()
    page.wait_for_timeout(300)
    frontend.screenshot(ARTIFACTS_DIR / f"first-run-missing-models-{name}.png")
    rows = frontend.evaluate(_DIALOG_ROWS_JS)
    close_dialogs(frontend)

    needed = needed_files(workflow)
    assert len(rows) == len(needed), f"{name}: the dialog lists {rows}, the workflow needs {needed}"
    for file, folder in needed.items():
        matching = [row for row in rows if row["text"].startswith(f"{folder} / {file}")]
        assert len(matching) == 1, f"{name}: {folder} / {file} is not in the Missing Models dialog: {rows}"
        (row,) = matching
        # No "Download not allowed", "Only allowed suffixes" or "Invalid directory" in place of the button.
        assert "allowed" not in row["text"] and "Invalid directory" not in row["text"], row
        assert "Download" in row["text"], row
        assert row["urls"] and row["urls"][0] == MODELS[file]["url"], row
        assert row["urls"][0].startswith(ALLOWED_SOURCES) and row["urls"][0].endswith(".safetensors"), row


def test_run_with_no_model_files_shows_the_packs_message_naming_the_folder(fresh_install, comfy):
    frontend, page = fresh_install, fresh_install.page
    close_dialogs(frontend)
    name = "Person from one photo"
    frontend.evaluate(_OPEN_JS, [frontend.fetch_template(PACK_NAME, name), name])
    page.locator(".comfy-missing-models").wait_for()
    close_dialogs(frontend)

    page.get_by_role("button", name="Run", exact=True).click()
    error = page.locator(".p-dialog").filter(has_text="not found")
    error.wait_for()
    page.wait_for_timeout(300)
    frontend.screenshot(ARTIFACTS_DIR / "first-run-queue-error.png")
    text = " ".join(error.inner_text().split())
    folder = comfy.base / "models" / "nested_attention"
    assert f"'{FACES_ENCODER}' not found (searched: {folder}" in text, text
    assert f"Put the encoder file into {folder}" in text, text
    assert "https://huggingface.co/orpatashnik/NestedAttentionEncoder" in text, text
    close_dialogs(frontend)
