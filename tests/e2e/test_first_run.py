"""A new user's first run: the shipped workflows with no model file on disk, in the real frontend.

The shared e2e server (tests/e2e/conftest.py) runs with its model folders emptied for this module (the
files are moved aside and put back afterwards) and a fresh Chromium page opens its frontend, as on a fresh
install. Then
  - the frontend's list of missing models (from the loaders' `properties.models`) names every file the
    workflow's loaders name, and nothing else (no optional file shown as if it were needed), with a download
    address the frontend accepts and the models folder it goes in;
  - pressing Run shows the pack's message for the missing encoder (which file, the folder searched, where
    to get one) instead of ComfyUI's "Value not in list".
The frontends the suite runs on show these facts in different places:
  - frontend 1.32 (ComfyUI 0.3.75): a Missing Models dialog on load, one row per file ("folder / file",
    a Download button whose title is the address); the Run error in a dialog;
  - frontend 1.48 (ComfyUI 0.33): a toast "N errors found ... View details" on load, which opens the
    Errors tab of the right-side panel: a Missing Models group, one row per file (file, folder, a Download
    button that opens the address in a new tab); the Run error under "Invalid input", its text behind the
    row's Info button;
  - frontend 1.58 (on ComfyUI 0.33): the same toast, whose View details opens the same rows in the panel it
    calls Workflow Overview, under Issues.
Screenshots: tests/artifacts/e2e/first-run-*.png.
"""

from __future__ import annotations

import shutil

import pytest
from harness import ARTIFACTS_DIR, PACK_NAME, WORKFLOWS_DIR, Frontend

from devtools.workflows import IPADAPTER_FACE, MODELS, person_one_photo, workflow_name

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

WORKFLOW_NAMES = sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))
PERSON_FROM_ONE_PHOTO = workflow_name(person_one_photo)
# The loaders of the shipped workflows, with the models folders ComfyUI reads their file from: the files a
# workflow needs are read from the workflow itself. Load Nested Encoder lists two folders.
LOADERS = {"CheckpointLoaderSimple": ("checkpoints",), "CLIPVisionLoader": ("clip_vision",),
           "NestedAttentionLoadEncoder": ("nested_attention", "ipadapter"),
           "UNETLoader": ("diffusion_models",)}
ALLOWED_SOURCES = ("https://huggingface.co/", "https://civitai.com/")  # the frontend's download allow-list


def needed_files(workflow: dict) -> dict[str, str]:
    """{file name: models folder}: the files the workflow's loaders name."""
    files = {}
    for node in workflow["nodes"]:
        if node["type"] in LOADERS:  # each has one widget: the file's name
            file = node["widgets_values"][0]
            folder = MODELS[file]["directory"]
            assert folder in LOADERS[node["type"]], f"{node['type']} does not read {folder}/{file}"
            files[file] = folder
    return files


# Opens a workflow as the template browser does (the frontend's own missing-models report included).
_OPEN_JS = """
async ([workflow, name]) => {
  await window.app.loadGraphData(structuredClone(workflow), true, true, name);
}
"""

# What either frontend shows on loading a workflow whose model files are missing: frontend 1.32's Missing
# Models dialog, or frontend 1.48's error toast (with its View details button).
_MISSING_MODELS_SHOWN = ".comfy-missing-models, [data-testid=error-overlay]"

# Frontend 1.32's Missing Models dialog's rows: label ("folder / file"), the address it downloads from.
_DIALOG_ROWS_JS = """
() => [...document.querySelectorAll('.comfy-missing-models [role=option]')].map((row) => ({
  text: row.innerText.replace(/\\s+/g, ' ').trim(),
  urls: [...row.querySelectorAll('[title]')].map((e) => e.title).filter((t) => t.startsWith('http')),
}))
"""

# Frontend 1.48's Missing Models group (Errors tab of the right-side panel): one row per file, each with a
# copy button ("Copy URL" when the file has an address, "Copy model name" when not); the row's lines are
# the file name, its models folder (" · size" when known) and Download when the frontend allows it.
_PANEL_ROWS_JS = """
() => {
  const group = document.querySelector('[data-testid=error-group-missing-model]');
  if (!group) return null;
  const copies = group.querySelectorAll(
    'button[aria-label="Copy URL"], button[aria-label="Copy model name"]');
  return [...copies].map((copy) => {
    const row = copy.closest('.w-full.flex-col');
    const lines = row.innerText.split('\\n').map((l) => l.trim()).filter(Boolean);
    const download = row.querySelector('[data-testid=missing-model-download]');
    return {file: lines[0], folder: (lines[1] ?? '').split(' · ')[0], lines,
            copy: copy.getAttribute('aria-label'), download: download?.getAttribute('aria-label') ?? null};
  });
}
"""


@pytest.fixture(scope="module")
def fresh_install(comfy):
    """The server with no model file at all, and a fresh frontend page on it. The user's frontend settings
    are put back afterwards too: frontend 1.48 saves its Errors panel open (Comfy.RightSidePanel.IsOpen),
    which would cover the right of every graph the later tests open."""
    settings = comfy.base / "user" / "default" / "comfy.settings.json"
    saved_settings = settings.read_bytes()
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
        settings.write_bytes(saved_settings)


def close_dialogs(frontend: Frontend) -> None:
    page = frontend.page
    for _ in range(3):
        if not page.locator(".p-dialog").count():
            return
        page.keyboard.press("Escape")
        frontend.settle()


def open_first_run(frontend: Frontend, name: str) -> tuple[dict, str]:
    """Open a shipped workflow on the empty models folders; returns it and how the frontend reports the
    missing files: "dialog" (frontend 1.32) or "panel" (frontend 1.48, its Errors panel now open)."""
    page = frontend.page
    close_dialogs(frontend)
    workflow = frontend.fetch_template(PACK_NAME, name)
    frontend.evaluate(_OPEN_JS, [workflow, name])
    page.locator(_MISSING_MODELS_SHOWN).first.wait_for()
    if page.locator(".comfy-missing-models").count():
        return workflow, "dialog"
    page.get_by_test_id("error-overlay-see-errors").click()  # "View details"
    buttons = page.locator("[data-testid=error-group-missing-model] [data-testid=missing-model-download]")
    buttons.first.wait_for()
    return workflow, "panel"


def download_address(frontend: Frontend, file: str) -> str:
    """Press frontend 1.48's Download button of `file`; returns the address the tab it opens goes to."""
    button = frontend.page.locator(f'[data-testid=error-group-missing-model] [aria-label="Download {file}"]')
    return frontend.address_opened_by(button)


def check_address(file: str, url: str, where: str) -> None:
    assert url == MODELS[file]["url"], f"{where}: {file} downloads from {url}, not {MODELS[file]['url']}"
    assert url.startswith(ALLOWED_SOURCES) and url.endswith(".safetensors"), (where, url)


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_missing_models_list_every_file_with_its_address_and_folder(name, fresh_install):
    """Exactly the files the loaders name. (Frontend 1.32's dialog would also list a workflow's top-level
    `models`; the shipped workflows have none: the optional encoders are offered in their Models note only.)"""
    frontend = fresh_install
    workflow, shown = open_first_run(frontend, name)
    frontend.settle()
    frontend.screenshot(ARTIFACTS_DIR / f"first-run-missing-models-{name}.png")
    if shown == "dialog":
        rows = frontend.evaluate(_DIALOG_ROWS_JS)
        close_dialogs(frontend)
        expected = needed_files(workflow)
        assert "models" not in workflow, workflow["models"]
        assert len(rows) == len(expected), f"{name}: the dialog lists {rows}, the workflow needs {expected}"
        for file, folder in expected.items():
            matching = [row for row in rows if row["text"].startswith(f"{folder} / {file}")]
            assert len(matching) == 1, f"{name}: {folder} / {file} is not in the dialog: {rows}"
            (row,) = matching
            # No "Download not allowed", "Only allowed suffixes" or "Invalid directory" instead of Download.
            assert "allowed" not in row["text"] and "Invalid directory" not in row["text"], row
            assert "Download" in row["text"], row
            assert row["urls"], row
            check_address(file, row["urls"][0], name)
        return

    rows = frontend.evaluate(_PANEL_ROWS_JS)
    expected = needed_files(workflow)
    assert sorted(row["file"] for row in rows) == sorted(expected), (
        f"{name}: the Missing Models panel lists {rows}, the workflow's loaders name {expected}")
    for row in rows:
        file = row["file"]
        assert row["folder"] == expected[file], f"{name}: {file} goes in {expected[file]}: {row}"
        # A file the frontend will not download (address not allow-listed, wrong suffix) has no button.
        assert row["download"] == f"Download {file}" and row["copy"] == "Copy URL", row
        check_address(file, download_address(frontend, file), name)


# The Run error as the frontend shows it: 1.32 in a dialog; 1.48 in the Errors panel's "Invalid input"
# group, the server's message behind the failing input's Info button.
_ENCODER_INPUT = "Load Nested Encoder - encoder_name"


def run_error_text(frontend: Frontend, shown: str) -> str:
    page = frontend.page
    if shown == "dialog":
        error = page.locator(".p-dialog").filter(has_text="not found")
    else:
        info = page.get_by_role("button", name=f"Info for {_ENCODER_INPUT}", exact=True)
        info.click()
        error = page.locator(f'[id="{info.get_attribute("aria-controls")}"]')
    error.wait_for()
    frontend.settle()
    frontend.screenshot(ARTIFACTS_DIR / "first-run-queue-error.png")
    return " ".join(error.inner_text().split())


def test_run_with_no_model_files_shows_the_packs_message_naming_the_folder(fresh_install, comfy):
    frontend = fresh_install
    _, shown = open_first_run(frontend, PERSON_FROM_ONE_PHOTO)
    close_dialogs(frontend)

    frontend.press_run()
    text = run_error_text(frontend, shown)
    # The workflow's default encoder, the folders searched (its own among them), which file goes where and
    # where to download it.
    folder = comfy.base / "models" / "ipadapter"
    assert f"Load Nested Encoder: encoder file '{IPADAPTER_FACE}' not found." in text, text
    assert f"models/ipadapter: {folder} (found there: no .safetensors file)" in text, text
    assert "IP-Adapter Plus SDXL files (ip-adapter-plus*_sdxl_vit-h.safetensors) -> models/ipadapter" in text, text
    assert "https://huggingface.co/h94/IP-Adapter" in text, text
    close_dialogs(frontend)
