"""One real ComfyUI server (and one headless Chromium on its frontend) for every test under tests/e2e.

The server runs with this pack, the test-only pack tests/e2e/tiny_pack and cubiq's ComfyUI_IPAdapter_plus
(unpacked from ../shared/packs for the compatibility test, never part of the repo), a throw-away
`--base-directory`, and real encoder files sized for the tiny UNet (tests/e2e/tiny_base.py). Starting it
once saves each test module its own start-up.
"""

from __future__ import annotations

import os
import shutil

import pytest
import tiny_models
from harness import (
    ARTIFACTS_DIR,
    CHROMIUM,
    IPADAPTER_PLUS_ARCHIVE,
    ComfyServer,
    Frontend,
    install_pack_archive,
    pack_archive,
)
from tiny_base import prepare_tiny_base

HERE = os.path.dirname(__file__)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the groups (on each worker)
def pytest_collection_modifyitems(items):
    """Tests here that open the frontend get the `browser` marker (the newest-frontend run selects them). Under
    pytest-xdist (`dev.py test` runs a worker per core) the tests here run on one worker, group `e2e`: they
    share the one server and browser above and its artifacts folder, and a second server would cost more than
    it saves. The soak starts servers of its own: it runs beside them, group `soak`."""
    for item in items:
        if not os.fspath(item.path).startswith(HERE + os.sep):
            continue
        if {"frontend", "fresh_install"} & set(item.fixturenames):  # fresh_install: a page of its own
            item.add_marker(pytest.mark.browser)
        item.add_marker(pytest.mark.xdist_group("soak" if item.path.name == "test_soak_e2e.py" else "e2e"))


# The shared server and browser, in the order they started: closed as soon as the last test that uses them has
# run (pytest_runtest_teardown below), not at the end of the session: the e2e group runs first on its worker and
# the worker goes on with other tests, beside which an idle frontend would still draw and a server still wait.
_SHARED: list = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After the last test of the session's list that uses the shared server (the e2e group runs on one worker,
    in that order), once its own fixtures are torn down: close the browser, then stop the server. The session
    fixtures' own teardown then finds them closed."""
    result = yield
    if _SHARED and "comfy" in item.fixturenames and item is _last_user_of_the_server(item.session):
        for shared in reversed(_SHARED):
            shared.close() if isinstance(shared, Frontend) else shared.stop()
        _SHARED.clear()
    return result


_LAST_USER = pytest.StashKey[object]()


def _last_user_of_the_server(session):
    """The last test of the session's list (as run: after deselection) that uses the server; found once."""
    if _LAST_USER not in session.stash:
        users = [i for i in session.items if "comfy" in i.fixturenames]
        session.stash[_LAST_USER] = users[-1] if users else None
    return session.stash[_LAST_USER]


@pytest.fixture(scope="session")
def comfy(tmp_path_factory, _tiny_unet_shared):
    """The running server (harness.ComfyServer); its log is ARTIFACTS_DIR/server.log."""
    if ARTIFACTS_DIR.exists():
        shutil.rmtree(ARTIFACTS_DIR)
    ARTIFACTS_DIR.mkdir(parents=True)
    base = tmp_path_factory.mktemp("comfyui") / "base"
    prepare_tiny_base(base, _tiny_unet_shared)
    ipadapter_plus = pack_archive(IPADAPTER_PLUS_ARCHIVE)
    if ipadapter_plus is not None:  # test_other_packs_e2e.py says what is missing when it is not
        install_pack_archive(ipadapter_plus, base / "custom_nodes")
    # One torch thread, as the workers (tests/conftest.py): the other pytest-xdist worker keeps the second core busy,
    # where OpenMP threads waiting for it slow the server's tiny models down many times.
    threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    server = ComfyServer(tiny_models.find_comfyui(), base, ARTIFACTS_DIR / "server.log", env=threads).start()
    _SHARED.append(server)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def frontend(comfy):
    """The server's frontend in Debian's Chromium (harness.Frontend)."""
    if not CHROMIUM.exists():
        # In CI the browser test must run: `python3 dev.py test` installs Chromium there (as root).
        missing = pytest.fail if os.environ.get("CI") else pytest.skip
        missing(f"{CHROMIUM} is missing: install Debian's chromium (python3 dev.py test does, as root)")
    pytest.importorskip("playwright.sync_api", reason="the playwright package drives Chromium")
    with Frontend(comfy) as page:
        _SHARED.append(page)
        yield page
