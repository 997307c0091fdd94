"""A real ComfyUI server with this pack, and its real frontend in headless Chromium.

Shared by the end-to-end tests and by devtools/workflows.py (which builds the shipped workflows in the same
frontend). The server runs as a subprocess with `--base-directory` pointing at a throw-away folder, so
that custom_nodes, models, input, output and user settings are all private to the run and the ComfyUI
tree is never touched. Chromium is Debian's /usr/bin/chromium, driven by the Python playwright package
(which never downloads a browser of its own here).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parents[2]
E2E_DIR = Path(__file__).resolve().parent
WORKFLOWS_DIR = REPO / "workflows"
EXAMPLE_INPUTS_DIR = WORKFLOWS_DIR / "input"
TINY_PACK_DIR = E2E_DIR / "tiny_pack"
ARTIFACTS_DIR = REPO / "tests" / "artifacts" / "e2e"

PACK_NAME = "comfyui-nested-attention"  # the folder name dev.py links the pack under
TINY_PACK_NAME = "nested_attention_test_tiny"
# Encoder files in the pack's own format in the e2e server's models folder (conftest.py writes them, sized for
# the tiny UNet); no shipped workflow names them.
FACES_ENCODER, PETS_ENCODER = "faces-encoder.safetensors", "pets-encoder.safetensors"

# Other packs' source archives, installed into the test server for compatibility tests (never into the repo):
# $NESTED_ATTENTION_PACKS, else ../shared/packs beside the checkout.
PACKS_ENV = "NESTED_ATTENTION_PACKS"
IPADAPTER_PLUS_ARCHIVE = "ComfyUI_IPAdapter_plus-9d076a3.tar.gz"  # cubiq's pack (GPL-3.0), one folder inside
IPADAPTER_PLUS_NAME = "ComfyUI_IPAdapter_plus"

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
VIEWPORT = {"width": 1600, "height": 1000}
# Frontend settings of a fresh user, except that no template browser pops up over the graph on the first
# start and no minimap covers a corner. Everything else (the low-detail zoom threshold included) is the
# frontend's default, so the screenshots show what a user sees.
FRONTEND_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}
# A frontend other than the one the host's venv pins: the `static` folder of a comfyui-frontend-package, which
# the server gets as --front-end-root (dev.py sets it for its newest-frontend leg).
FRONT_END_ROOT_ENV = "NESTED_ATTENTION_FRONT_END_ROOT"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base_dir(base: Path, custom_nodes: dict[str, Path], model_files: dict[str, list[str]]) -> None:
    """Lay out a ComfyUI base directory: linked custom node packs, model files, example inputs, settings.

    Model files ({models folder: [file names]}) that are not already there are created empty: enough for the
    frontend's file lists (the loaders' combo widgets), never loaded (the tests swap the heavy loaders for tiny
    ones).
    """
    for sub in ("custom_nodes", "input", "output", "temp", "user/default"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for name, target in custom_nodes.items():
        link = base / "custom_nodes" / name
        if not link.exists():
            os.symlink(target, link, target_is_directory=True)
    for folder, names in model_files.items():
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            (base / "models" / folder / name).touch(exist_ok=True)
    if EXAMPLE_INPUTS_DIR.is_dir():
        for image in EXAMPLE_INPUTS_DIR.iterdir():
            if image.is_file():
                shutil.copy2(image, base / "input" / image.name)
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(FRONTEND_SETTINGS))


def pack_archive(name: str) -> Path | None:
    """Another pack's source archive from the packs folder ($NESTED_ATTENTION_PACKS, else ../shared/packs)."""
    folder = Path(os.environ.get(PACKS_ENV) or REPO.parent / "shared" / "packs")
    path = folder / name
    return path if path.is_file() else None


def install_pack_archive(archive: Path, custom_nodes: Path) -> None:
    """Unpack a pack's archive (one top-level folder) into a test server's custom_nodes."""
    with tarfile.open(archive) as tar:
        tar.extractall(custom_nodes, filter="data")


class ComfyServer:
    """`python main.py --cpu` of a ComfyUI folder; all it writes goes under `base` (--base-directory)."""

    def __init__(self, comfyui: Path, base: Path, log_path: Path, port: int | None = None,
                 extra_args: tuple = (), env: dict | None = None):
        """extra_args: more of main.py's arguments (e.g. --cache-none); env: variables added to the server's."""
        self.comfyui, self.base, self.log_path = Path(comfyui), Path(base), Path(log_path)
        self.extra_args, self.extra_env = tuple(extra_args), dict(env or {})
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.startup_log = ""

    def start(self, timeout: float = 600.0) -> ComfyServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch", "--preview-method", "none",
               *self.extra_args]
        if os.environ.get(FRONT_END_ROOT_ENV):
            cmd += ["--front-end-root", os.environ[FRONT_END_ROOT_ENV]]
        env = {**os.environ, "COMFYUI_PATH": str(self.comfyui), "PYTHONUNBUFFERED": "1", **self.extra_env}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(cmd, cwd=self.comfyui, env=env, stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode} while starting:\n"
                                   f"{self.log_tail()}")
            try:
                self.get_json("/system_stats")
                self.startup_log = self.log_path.read_text(errors="replace")  # what it printed until ready
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer on {self.url} within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no server log)"

    # -- HTTP ---------------------------------------------------------------------------------------------

    def get(self, path: str, **query: Any) -> bytes:
        url = self.url + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.read()

    def get_json(self, path: str, **query: Any) -> Any:
        return json.loads(self.get(path, **query))

    def post(self, path: str, data: Any) -> bytes:
        """POST `data` as JSON; the answer's body."""
        request = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def post_json(self, path: str, data: Any) -> Any:
        return json.loads(self.post(path, data))

    def queue_prompt(self, prompt: dict, client_id: str = "nested-attention-e2e") -> str:
        """POST /prompt; returns the prompt id. A prompt the server refuses raises with its node errors.

        client_id: who gets the progress and output messages (a page's app.api.clientId: that frontend shows
        the outputs in its nodes)."""
        try:
            answer = self.post_json("/prompt", {"prompt": prompt, "client_id": client_id})
            return answer["prompt_id"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"the server refused the prompt: {e.read().decode(errors='replace')}") from e

    def wait_for(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """Poll /history until the prompt has finished; returns its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str") == "success":
                    return entry
                raise AssertionError(f"prompt {prompt_id} failed: {json.dumps(entry['status'], indent=1)}\n"
                                     f"server log:\n{self.log_tail()}")
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"ComfyUI exited while running a prompt:\n{self.log_tail()}")
            time.sleep(0.05)  # a tiny model's prompt takes a second or less: a longer wait would be most of it
        raise AssertionError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def run_prompt(self, prompt: dict, timeout: float = 600.0, client_id: str = "nested-attention-e2e"
                   ) -> dict[str, list[bytes]]:
        """Queue `prompt`, wait for it, fetch its output images over /view: {node id: [PNG bytes, ...]}."""
        entry = self.wait_for(self.queue_prompt(prompt, client_id), timeout)
        images = {}
        for node_id, output in entry.get("outputs", {}).items():
            for image in output.get("images", []):
                if image.get("type") == "output":
                    data = self.get("/view", filename=image["filename"], subfolder=image.get("subfolder", ""),
                                    type="output")
                    images.setdefault(node_id, []).append(data)
        return images


# -- The frontend -----------------------------------------------------------------------------------------

# Runs in the page: waits until what the page shows has stopped changing, counted in animation frames (the
# frontend draws its canvas and lays out Nodes 2.0's elements on them): the view, every node's place and size
# (and its element's box when it has one), and the document itself (a MutationObserver's count: toasts,
# dialogs, re-rendered elements) the same `frames` frames in a row, every image shown loaded, and with Nodes
# 2.0 an element for every node. Frontend.settle adds "no request under way" to it.
_SETTLE_JS = """
async ([frames, timeoutMs]) => {
  const app = window.app, start = performance.now();
  let mutations = 0;
  const observer = new MutationObserver((records) => { mutations += records.length; });
  observer.observe(document.body, {subtree: true, childList: true, attributes: true, characterData: true});
  const onScreen = (e) => {
    const r = e.getBoundingClientRect();
    return r.bottom > 0 && r.right > 0 && r.top < innerHeight && r.left < innerWidth;
  };
  const look = () => {
    // Images the page shows (a lazy one below the fold is not loaded until it is scrolled to) and the
    // nodes' preview images (LoadImage's photo, drawn on the canvas) must have loaded.
    for (const img of document.images) if (!img.complete && (img.loading !== 'lazy' || onScreen(img))) return null;
    const vue = app.extensionManager.setting.get('Comfy.VueNodes.Enabled');
    const ds = app.canvas.ds, parts = [mutations, ds.scale, ...ds.offset];
    for (const n of app.graph.nodes) {
      for (const img of n.imgs ?? []) if (!img.complete) return null;
      parts.push(n.id, ...n.pos, ...n.size);
      const element = document.querySelector(`[data-node-id="${n.id}"]`);
      if (vue && !element) return null;
      if (element) {
        const r = element.getBoundingClientRect();
        parts.push(r.left, r.top, r.width, r.height);
      }
    }
    return JSON.stringify(parts);
  };
  try {
    let last = null, same = 0;
    while (same < frames) {
      if (performance.now() - start > timeoutMs) return false;
      await new Promise((r) => requestAnimationFrame(() => r()));
      const now = look();
      same = now !== null && now === last ? same + 1 : 0;
      last = now;
    }
    return true;
  } finally {
    observer.disconnect();
  }
}
"""

# Runs in the page. Loads a workflow as the template browser does (app.loadGraphData); the dialogs it would
# show for missing node types and models are recorded instead (window.__nestedAttentionMissing).
_LOAD_WORKFLOW_JS = """
async ([workflow, name]) => {
  const app = window.app;
  const missing = (window.__nestedAttentionMissing = {dialog: [], models: []});
  app.showMissingNodesError = (types) => {
    for (const t of types) missing.dialog.push(typeof t === 'string' ? t : (t.type ?? JSON.stringify(t)));
  };
  app.showMissingModelsError = (models) => {
    for (const m of models) missing.models.push(m.name ?? JSON.stringify(m));
  };
  for (const b of document.querySelectorAll('.p-toast-close-button')) b.click();
  try {
    await app.loadGraphData(structuredClone(workflow), true, true, name);
  } finally {
    delete app.showMissingNodesError;  // back to the prototype's
    delete app.showMissingModelsError;
  }
}
"""

# Runs in the page once the loaded workflow has settled: what the frontend made of it: node types it does not
# know, nodes it flagged, widget values it refused or changed, and the alerts it raised (its schema check of
# the file shows one).
_LOAD_REPORT_JS = """
(workflow) => {
  const app = window.app, LG = window.LiteGraph;
  const {dialog: missingDialog, models: missingModels} = window.__nestedAttentionMissing;
  const nodes = app.graph.nodes;
  const unknownTypes = nodes.filter((n) => !LG.registered_node_types[n.type]).map((n) => n.type);
  const flagged = nodes.filter((n) => n.has_errors).map((n) => `#${n.id} ${n.type}`);
  const widgetErrors = [];
  for (const n of nodes) {
    for (const w of n.widgets ?? []) {
      const where = `#${n.id} ${n.type}.${w.name}`;
      if (w.type === 'combo') {
        let values = w.options?.values;
        if (typeof values === 'function') values = values(w, n);
        if (Array.isArray(values) && !values.includes(w.value))
          widgetErrors.push(`${where}: ${JSON.stringify(w.value)} is not one of its options`);
      } else if (typeof w.value === 'number') {
        const o = w.options ?? {};
        if (Number.isNaN(w.value) || (o.min != null && w.value < o.min) || (o.max != null && w.value > o.max))
          widgetErrors.push(`${where}: ${w.value} is outside [${o.min}, ${o.max}]`);
      }
    }
  }
  // What the frontend would save now must be what the file says: nothing refused, reset or shifted.
  const saved = Object.fromEntries(workflow.nodes.map((n) => [n.id, n.widgets_values ?? []]));
  for (const n of app.graph.serialize().nodes) {
    const now = JSON.stringify(n.widgets_values ?? []), before = JSON.stringify(saved[n.id]);
    if (now !== before)
      widgetErrors.push(`#${n.id} ${n.type}: widget values ${before} became ${now} on load`);
  }
  const alerts = [...document.querySelectorAll('.p-toast-message')]
    .filter((m) => /p-toast-message-(warn|error)/.test(m.className))
    .map((m) => m.innerText.replace(/\\s+/g, ' ').trim());
  return {missingDialog, missingModels, unknownTypes, flagged, widgetErrors, alerts, nodes: nodes.length,
          links: Object.keys(app.graph.links ?? {}).length};
}
"""

# Records the addresses the page opens in new tabs (a link clicked with target=_blank, window.open) until
# window.__nestedAttentionUnwatch() is called; the browser still opens them.
_WATCH_NEW_TABS_JS = """
() => {
  const opened = (window.__nestedAttentionOpened = []);
  const click = HTMLAnchorElement.prototype.click, open = window.open;
  HTMLAnchorElement.prototype.click = function () {
    if (this.target === '_blank') opened.push(this.href);
    return click.call(this);
  };
  window.open = function (url, ...rest) {
    opened.push(new URL(url, location.href).href);
    return open.call(this, url, ...rest);
  };
  window.__nestedAttentionUnwatch = () => { HTMLAnchorElement.prototype.click = click; window.open = open; };
}
"""

# Zooms and pans so that every node is in view, inside the part of the canvas that the sidebar, the tab bar
# and the floating menu leave visible (margins: left, top, right, bottom).
_FIT_VIEW_JS = """
([left, top, right, bottom]) => {
  const app = window.app, canvas = app.canvas, nodes = app.graph.nodes;
  if (!nodes.length) return;
  const title = window.LiteGraph.NODE_TITLE_HEIGHT;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  const w = canvas.canvas.width / window.devicePixelRatio - left - right;
  const h = canvas.canvas.height / window.devicePixelRatio - top - bottom;
  const scale = Math.min(w / (x1 - x0), h / (y1 - y0), 1.0);
  canvas.ds.scale = scale;
  canvas.ds.offset = [left / scale + (w / scale - (x1 - x0)) / 2 - x0,
                      top / scale + (h / scale - (y1 - y0)) / 2 - y0];
  canvas.setDirty(true, true);
}
"""
FIT_MARGINS = (80, 110, 30, 30)
# Animation frames in a row with nothing changed before Frontend.settle calls the page settled (about 100 ms
# at 60 frames a second: longer than the frontend's own debounced re-layouts).
SETTLE_FRAMES = 6
FOCUS_MODE_MARGINS = (30, 30, 30, 30)


# One playwright driver per process, shared by the Frontends open at the same time (the sync API refuses
# a second one while the first runs: a module's own fresh page beside the session's page needs this).
_PLAYWRIGHT: dict[str, Any] = {"driver": None, "users": 0}


def _playwright_start():
    from playwright.sync_api import sync_playwright

    if _PLAYWRIGHT["driver"] is None:
        _PLAYWRIGHT["driver"] = sync_playwright().start()
    _PLAYWRIGHT["users"] += 1
    return _PLAYWRIGHT["driver"]


def _playwright_stop() -> None:
    _PLAYWRIGHT["users"] -= 1
    if _PLAYWRIGHT["users"] == 0:
        _PLAYWRIGHT["driver"].stop()
        _PLAYWRIGHT["driver"] = None


class Frontend:
    """ComfyUI's frontend, served by `server`, in headless Debian Chromium with a fresh profile."""

    def __init__(self, server: ComfyServer):
        self.server = server
        self._playwright = None
        self._context = None
        self._profile: str | None = None
        self.page = None
        self.console_errors: list[str] = []  # console errors and page errors, network failures left out
        self.http_errors: list[str] = []  # this server's answers >= 400 (fresh-profile user files left out)
        self._requests: dict[Any, str] = {}  # the page's requests under way (settle waits for them)

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self, timeout_ms: int = 600_000) -> Frontend:
        if not CHROMIUM.exists():
            raise RuntimeError(f"{CHROMIUM} is missing; install Debian's chromium (apt-get install chromium)")
        self._profile = tempfile.mkdtemp(prefix="nested-attention-chromium-")
        self._playwright = _playwright_start()
        self._context = self._playwright.chromium.launch_persistent_context(
            self._profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport=VIEWPORT)
        # Nothing leaves the machine: the frontend also asks api.comfy.org (registry, releases). A regular
        # expression is matched inside the driver; a Python predicate would slow every request down.
        elsewhere = re.compile(rf"^(?!{re.escape(self.server.url)}/)(https?|wss?)://")
        self._context.route(elsewhere, lambda route: route.abort())
        self.page = self._context.pages[0] if self._context.pages else self._context.new_page()
        self.page.set_default_timeout(120_000)  # generous: CI machines can be slow and shared
        # A fresh user: no "Nodes 2.0" banner over the canvas (the frontend keeps that in localStorage).
        self.page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
        self.page.on("console", self._on_console)
        self.page.on("response", self._on_response)
        self.page.on("request", lambda request: self._requests.__setitem__(request, request.url))
        for ended in ("requestfinished", "requestfailed"):
            self.page.on(ended, lambda request: self._requests.pop(request, None))
        self.page.on("pageerror", lambda error: self.console_errors.append(f"pageerror: {error}"))
        self.page.goto(self.server.url + "/", timeout=timeout_ms, wait_until="domcontentloaded")
        self.page.wait_for_function(
            "window.app?.graph && window.LiteGraph && window.app.vueAppReady"
            " && Object.keys(window.LiteGraph.registered_node_types).length > 100",
            timeout=timeout_ms)
        return self

    def address_opened_by(self, locator) -> str:
        """Click `locator` (e.g. a model's Download button), which opens an address in a new tab (through a
        link with target=_blank, or window.open); returns that address and closes the tab (its request to
        the outside is aborted, as all are)."""
        self.evaluate(_WATCH_NEW_TABS_JS)
        try:
            locator.click()
            self.page.wait_for_function("window.__nestedAttentionOpened.length > 0", timeout=10_000)
            opened = self.evaluate("() => window.__nestedAttentionOpened")
        finally:
            self.evaluate("() => window.__nestedAttentionUnwatch?.()")
        for page in self._context.pages:
            if page is not self.page:
                page.close()
        self.page.bring_to_front()  # the tab the user was on (a hidden tab draws no frames)
        assert len(opened) == 1, f"{locator} opened {opened}"
        return opened[0]

    def press_run(self) -> None:
        """Press the Run button (frontend 1.48 has a second button labelled Run beside it: the mode menu)."""
        run = self.page.get_by_role("button", name="Run", exact=True)
        run.and_(self.page.locator("button:not([aria-haspopup=menu])")).click()

    def _on_console(self, message) -> None:
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.console_errors.append(message.text)

    def _on_response(self, response) -> None:
        if response.status >= 400 and response.url.startswith(self.server.url):
            path = response.url[len(self.server.url):]
            if not path.startswith(("/api/userdata", "/user.css")):
                self.http_errors.append(f"{response.status} {path}")

    def close(self) -> None:
        if self._context is not None:
            self._context.close()
        if self._playwright is not None:
            _playwright_stop()
        if self._profile:
            shutil.rmtree(self._profile, ignore_errors=True)
        self._context = self._playwright = self._profile = None

    @contextlib.contextmanager
    def frozen(self):
        """Freeze the page (no rendering, no timers) while the server computes: on a small shared CPU an idle
        frontend still costs cycles. Uses Chromium's page lifecycle (CDP Page.setWebLifecycleState)."""
        session = self._context.new_cdp_session(self.page)
        session.send("Page.setWebLifecycleState", {"state": "frozen"})
        try:
            yield
        finally:
            session.send("Page.setWebLifecycleState", {"state": "active"})
            session.detach()

    def evaluate(self, script: str, arg: Any = None) -> Any:
        return self.page.evaluate(script, arg)

    def settle(self, frames: int = SETTLE_FRAMES, timeout_s: float = 60.0) -> None:
        """Wait until the page has stopped changing, instead of waiting a fixed time: no request of the page's
        under way, and what it shows (_SETTLE_JS) the same over `frames` animation frames in a row."""
        deadline = time.monotonic() + timeout_s
        if self.evaluate("() => document.hidden"):
            self.page.bring_to_front()  # a tab in the background draws no animation frames
        while True:
            left_ms = max(0.0, deadline - time.monotonic()) * 1000
            if self.evaluate(_SETTLE_JS, [frames, left_ms]) and not self._requests:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the page did not settle within {timeout_s:.0f} s; requests under way: "
                                     f"{sorted(set(self._requests.values()))}")
            self.page.wait_for_timeout(20)  # (lets playwright deliver the requests' events)

    def fetch_template(self, module: str, name: str) -> dict:
        """A custom node pack's template, fetched by the page from the URL the template browser uses."""
        return self.evaluate(
            "async ([m, n]) => {"
            " const r = await fetch(window.app.api.apiURL(`/workflow_templates/${m}/${n}.json`));"
            " if (!r.ok) throw new Error(`${r.status} ${r.url}`); return await r.json(); }",
            [module, name])

    def load_workflow(self, workflow: dict, name: str) -> dict:
        """Load `workflow` in the frontend; returns what went wrong (empty lists when nothing did)."""
        console, http = len(self.console_errors), len(self.http_errors)
        self.evaluate(_LOAD_WORKFLOW_JS, [workflow, name])
        self.settle()
        report = self.evaluate(_LOAD_REPORT_JS, workflow)
        report["consoleErrors"] = self.console_errors[console:]
        report["httpErrors"] = self.http_errors[http:]
        return report

    @staticmethod
    def problems(report: dict) -> dict:
        """The parts of a load_workflow report that say something went wrong."""
        keys = ("missingDialog", "missingModels", "unknownTypes", "flagged", "widgetErrors", "alerts",
                "consoleErrors", "httpErrors")
        return {key: report[key] for key in keys if report.get(key)}

    def fit_view(self, margins: tuple = FIT_MARGINS) -> None:
        self.evaluate(_FIT_VIEW_JS, list(margins))
        self.settle()  # the canvas has drawn the new view

    def graph_to_prompt(self) -> dict:
        """The API prompt the frontend would queue for the loaded graph ({node id: {class_type, inputs}})."""
        return self.evaluate("async () => (await window.app.graphToPrompt()).output")

    def serialize(self) -> dict:
        """The workflow as the frontend saves it."""
        # Through JSON.stringify, as the frontend saves: keys whose value is undefined are left out (a
        # structured copy would turn them into nulls, which the frontend's own schema check refuses).
        return json.loads(self.evaluate("() => JSON.stringify(window.app.graph.serialize())"))

    def screenshot(self, path: Path, canvas_only: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if canvas_only:
            self.page.locator("#graph-canvas").screenshot(path=str(path))
        else:
            self.page.screenshot(path=str(path))
