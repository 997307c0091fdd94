"""The node definitions load in a real ComfyUI server: /object_info lists them with their inputs and tooltips.

The server runs as a subprocess (`main.py --cpu`) with a throw-away `--base-directory` whose custom_nodes/
links to this repo, so the ComfyUI tree is never touched.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tiny_models

REPO = Path(__file__).resolve().parents[1]
PACK_LINK = "comfyui-nested-attention"

EXPECTED = {
    "NestedAttentionLoadEncoder": (
        "Load Nested Encoder",
        {"encoder_name"},
        {"clip_vision"},
        ["NESTED_ENCODER"],
    ),
    "NestedAttentionEncodeSubject": (
        "Encode Subject Image(s)",
        {"encoder", "image", "crop"},
        {"mask"},
        ["NESTED_SUBJECT"],
    ),
    "NestedAttentionApply": (
        "Apply Nested Attention (token, λ)",
        {"model", "clip", "subject", "text", "token", "lambda_", "start_percent", "end_percent"},
        {"mask"},
        ["MODEL", "CONDITIONING"],
    ),
}
NO_TOOLTIP_NEEDED = {"model"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    for sub in ("custom_nodes", "input", "output", "temp", "models/nested_attention"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    os.symlink(REPO, base / "custom_nodes" / PACK_LINK, target_is_directory=True)
    (base / "models" / "nested_attention" / "listed-encoder.safetensors").touch()
    comfyui = tiny_models.find_comfyui()
    port = free_port()
    log_path = base / "server.log"
    cmd = [
        sys.executable,
        "main.py",
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--base-directory",
        str(base),
        "--disable-auto-launch",
        "--disable-api-nodes",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd,
            cwd=comfyui,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with code {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                get_json(f"{url}/system_stats")
                break
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not start within 300 s:\n{log_path.read_text()[-4000:]}")
                time.sleep(0.5)
        yield url, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_object_info_lists_the_three_nodes_with_inputs_and_tooltips(server):
    url, log_path = server
    log = log_path.read_text(errors="replace")
    ours = [line for line in log.splitlines() if PACK_LINK in line]
    assert ours and not any("IMPORT FAILED" in line for line in ours), log[-4000:]
    info = get_json(f"{url}/object_info")
    for node_id, (display, required, optional, outputs) in EXPECTED.items():
        assert node_id in info, f"{node_id} missing; server log:\n{log[-4000:]}"
        node = info[node_id]
        assert node["display_name"] == display
        assert node["category"] == "nested_attention" and node["description"]
        assert set(node["input"]["required"]) == required
        assert set(node["input"].get("optional", {})) == optional
        assert node["output"] == outputs
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                if name not in NO_TOOLTIP_NEEDED:
                    assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    # The registered models folder is what the loader lists (so extra_model_paths.yaml entries work too).
    assert (
        "listed-encoder.safetensors"
        in info["NestedAttentionLoadEncoder"]["input"]["required"]["encoder_name"][0]
    )
    assert info["NestedAttentionApply"]["input"]["required"]["lambda_"][1]["display_name"] == "λ"
