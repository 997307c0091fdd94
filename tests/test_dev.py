"""dev.py's own helpers (the set-up script every user runs first), without installing anything."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_dev():
    spec = importlib.util.spec_from_file_location("nested_attention_dev", ROOT / "dev.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_last_option_reads_both_spellings_and_the_last_one_wins():
    dev = load_dev()
    assert dev.last_option(["--port", "1", "--port=2"], "--port") == "2"
    assert dev.last_option(["--listen", "0.0.0.0"], "--listen") == "0.0.0.0"
    assert dev.last_option(["--port"], "--port") == ""


def test_serve_copies_the_example_photos_into_comfyuis_input_without_overwriting(tmp_path):
    dev = load_dev()
    shipped = sorted(p.name for p in (ROOT / "workflows" / "input").iterdir() if p.suffix in (".png", ".jpg"))
    assert shipped, "workflows/input/ has no example photos"

    comfyui = tmp_path / "ComfyUI"
    (comfyui / "input").mkdir(parents=True)
    mine = comfyui / "input" / shipped[0]
    mine.write_bytes(b"the user's own photo")
    dev.copy_example_inputs(comfyui, [])
    assert sorted(p.name for p in (comfyui / "input").iterdir()) == shipped
    assert mine.read_bytes() == b"the user's own photo"
    for name in shipped[1:]:
        assert (comfyui / "input" / name).read_bytes() == (ROOT / "workflows" / "input" / name).read_bytes()

    # --input-directory, relative to ComfyUI's folder (where it runs) or absolute.
    dev.copy_example_inputs(comfyui, ["--input-directory", "elsewhere"])
    assert sorted(p.name for p in (comfyui / "elsewhere").iterdir()) == shipped
    absolute = tmp_path / "abs"
    dev.copy_example_inputs(comfyui, [f"--input-directory={absolute}"])
    assert sorted(p.name for p in absolute.iterdir()) == shipped


def test_serve_says_where_the_model_folders_are(tmp_path):
    dev = load_dev()
    comfyui = tmp_path / "ComfyUI"
    comfyui.mkdir()
    message = dev.model_folders_message(comfyui, [])
    assert f"model files go in {comfyui / 'models'}:" in message
    for folder in ("checkpoints/", "clip_vision/", "nested_attention/", "ipadapter/"):
        assert folder in message
    assert "extra_model_paths" not in message
    (comfyui / "extra_model_paths.yaml").write_text("a: {}\n")
    yaml = comfyui / "extra_model_paths.yaml"
    assert f"(and the folders {yaml} adds)" in dev.model_folders_message(comfyui, [])
    # --base-directory moves the models folder, relative to ComfyUI's folder (where it runs) or absolute.
    assert dev.models_dir(comfyui, ["--base-directory", "mine"]) == comfyui / "mine" / "models"
    assert dev.models_dir(comfyui, [f"--base-directory={tmp_path / 'b'}"]) == tmp_path / "b" / "models"
