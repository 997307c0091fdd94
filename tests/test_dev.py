"""dev.py's own helpers (the set-up script every user runs first), without installing anything."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

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


# ------------------------------------------------------------------------------------------------
# Hosts: the pinned ComfyUI and archived releases, each with its own venv


def fake_comfyui_tarball(path: Path, version: str, extra: dict[str, bytes] | None = None) -> Path:
    """A tarball of one `ComfyUI/` folder that dev.is_comfyui accepts."""
    import io
    import tarfile

    files = {
        "ComfyUI/main.py": b"",
        "ComfyUI/comfy/model_management.py": b"",
        "ComfyUI/comfyui_version.py": f'__version__ = "{version}"\n'.encode(),
        "ComfyUI/requirements.txt": b"torch\ntorchaudio\nnumpy>=1.25.0\n",
        **(extra or {}),
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("ComfyUI/outside")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc"
        tar.addfile(link)
    return path


def test_each_archived_release_is_a_host_with_its_own_folder_and_venv(tmp_path, monkeypatch):
    dev = load_dev()
    for version in ("0.33.0", "0.4.2", dev.COMFYUI_VERSION):
        fake_comfyui_tarball(tmp_path / f"comfyui-{version}.tar.gz", version)
    (tmp_path / "comfyui-latest.tar.gz").touch()  # no version in the name: not a host
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setenv(dev.HOSTS_ENV, str(tmp_path))
    hosts, why = dev.pick_hosts(None)
    assert [h.version for h in hosts] == [dev.COMFYUI_VERSION, "0.4.2", "0.33.0"] and why == ""
    pinned, other = hosts[0], hosts[2]
    assert (pinned.venv, pinned.comfyui) == (ROOT / ".venv", ROOT / ".comfyui" / "ComfyUI")
    assert pinned.archive is None
    assert (other.venv, other.comfyui) == (ROOT / ".venv-0.33.0", ROOT / ".comfyui" / "ComfyUI-0.33.0")
    assert other.archive == tmp_path / "comfyui-0.33.0.tar.gz"
    assert other.stamp.parent == other.venv
    assert dev.pick_hosts("0.33.0")[0] == [other]


def test_without_archived_releases_one_host_runs_and_the_reason_is_given(tmp_path, monkeypatch):
    dev = load_dev()
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setenv(dev.HOSTS_ENV, str(tmp_path))
    hosts, why = dev.pick_hosts(None)
    assert [h.version for h in hosts] == [dev.COMFYUI_VERSION]
    assert "no other ComfyUI release was found" in why and str(tmp_path) in why
    # COMFYUI_PATH chooses one ComfyUI, run in .venv.
    comfyui = tmp_path / "mine" / "ComfyUI"
    for name in ("main.py", "comfy/model_management.py"):
        (comfyui / name).parent.mkdir(parents=True, exist_ok=True)
        (comfyui / name).touch()
    monkeypatch.setenv("COMFYUI_PATH", str(comfyui))
    hosts, why = dev.pick_hosts(None)
    assert [(h.comfyui, h.venv) for h in hosts] == [(comfyui, ROOT / ".venv")] and "COMFYUI_PATH" in why


def test_a_hosts_folder_that_does_not_exist_is_an_error(tmp_path, monkeypatch, capsys):
    dev = load_dev()
    monkeypatch.setenv(dev.HOSTS_ENV, str(tmp_path / "missing"))
    with pytest.raises(SystemExit):
        dev.hosts_dir()
    assert dev.HOSTS_ENV in capsys.readouterr().err


def test_an_archived_release_unpacks_once_without_links_or_paths_outside(tmp_path):
    dev = load_dev()
    archive = fake_comfyui_tarball(tmp_path / "comfyui-0.33.0.tar.gz", "0.33.0",
                                   {"ComfyUI/../escaped.txt": b"x", "ComfyUI/nodes.py": b"# nodes"})
    host = dev.Host(version="0.33.0", comfyui=tmp_path / "hosts" / "ComfyUI-0.33.0", venv=tmp_path / "venv",
                    archive=archive)
    dev.unpack_comfyui(host)
    assert dev.comfyui_version(host.comfyui) == "0.33.0"
    assert (host.comfyui / "nodes.py").read_text() == "# nodes"
    assert not (tmp_path / "hosts" / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()
    assert not (host.comfyui / "outside").exists() and not (host.comfyui / "outside").is_symlink()
    assert sorted(p.name for p in host.comfyui.parent.iterdir()) == ["ComfyUI-0.33.0"]  # no staging left
    (host.comfyui / "marker").touch()
    dev.unpack_comfyui(host)  # already there: untouched
    assert (host.comfyui / "marker").exists()
    # The requirements it brings lose the unpinned torch family; dev.py pins torch, torchvision, torchaudio.
    assert dev.comfyui_requirements(host.comfyui) == "numpy>=1.25.0\nrequests\n"
    assert any(p.startswith("torchaudio==2.9.") for p in dev.TORCH_PINS)


def test_an_archive_holding_another_version_is_refused(tmp_path, capsys):
    dev = load_dev()
    archive = fake_comfyui_tarball(tmp_path / "comfyui-0.33.0.tar.gz", "0.32.0")
    host = dev.Host(version="0.33.0", comfyui=tmp_path / "ComfyUI-0.33.0", venv=tmp_path / "venv",
                    archive=archive)
    with pytest.raises(SystemExit):
        dev.unpack_comfyui(host)
    assert "should hold one ComfyUI 0.33.0 folder" in capsys.readouterr().err


def test_the_install_stamp_names_this_checkout_so_a_clone_reinstalls_its_own_editable_pack():
    dev = load_dev()
    inputs = dev.install_inputs(dev.pinned_host(), "numpy\n")
    assert inputs["root"] == str(ROOT) and inputs["python"].startswith(str(ROOT))


def test_result_lines_and_options():
    dev = load_dev()
    assert dev.result_line("==== 164 passed, 2 warnings in 301.20s (0:05:01) ====\n") == \
        "164 passed, 2 warnings in 301.20s (0:05:01)"
    coloured = "\x1b[31m= 1 failed, 163 passed in 2.00s =\x1b[0m"
    assert dev.result_line(coloured) == "1 failed, 163 passed in 2.00s"
    assert dev.result_line("12 passed in 0.5s") == "12 passed in 0.5s"
    assert dev.result_line("tests/test_x.py::test_passed_in_order PASSED") is None
    assert dev.take_option(["-k", "x", "--host", "0.33.0", "-q"], "--host") == ("0.33.0", ["-k", "x", "-q"])
    assert dev.take_option(["--host=0.3.75"], "--host") == ("0.3.75", [])
    assert dev.take_option(["-q"], "--host") == (None, ["-q"])


# ------------------------------------------------------------------------------------------------
# Test runs: one per host, and the browser tests once more with the newest frontend


def test_every_host_runs_the_suite_and_the_newest_host_runs_the_browser_tests_with_the_newest_frontend(
        tmp_path, monkeypatch):
    dev = load_dev()
    fake_comfyui_tarball(tmp_path / "comfyui-0.33.0.tar.gz", "0.33.0")
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setenv(dev.HOSTS_ENV, str(tmp_path))
    legs, notes = dev.plan_legs(["-q", "tests/e2e"])
    assert [(leg.host.version, leg.frontend, leg.args) for leg in legs] == [
        (dev.COMFYUI_VERSION, None, ["-q", "tests/e2e"]), ("0.33.0", None, ["-q", "tests/e2e"]),
        ("0.33.0", dev.NEWEST_FRONTEND, ["-q", "tests/e2e", "-m", "browser"])]
    assert notes == [] and legs[2].name == f"ComfyUI 0.33.0 + frontend {dev.NEWEST_FRONTEND} (browser tests)"
    # The newest-frontend run keeps the browser tests of the selection: a marker expression given is combined.
    legs, _ = dev.plan_legs(["-m", "not slow", "-k", "tests"])
    assert legs[2].args == ["-k", "tests", "-m", "browser and (not slow)"]
    # --host: that host alone, with its own frontend; --frontend: the browser tests alone, with that frontend.
    legs, _ = dev.plan_legs(["--host", "0.33.0"])
    assert [(leg.host.version, leg.frontend) for leg in legs] == [("0.33.0", None)]
    legs, _ = dev.plan_legs(["--frontend", "1.60.0", "-x"])
    assert [(leg.host.version, leg.frontend, leg.args) for leg in legs] == [("0.33.0", "1.60.0", ["-x", "-m", "browser"])]
    legs, _ = dev.plan_legs(["--frontend=1.60.0", "--host", dev.COMFYUI_VERSION])
    assert [(leg.host.version, leg.frontend) for leg in legs] == [(dev.COMFYUI_VERSION, "1.60.0")]


def test_a_whole_suite_run_gets_a_worker_per_core_unless_the_args_choose(monkeypatch):
    dev = load_dev()
    monkeypatch.setattr(dev.os, "cpu_count", lambda: 2)
    assert dev.parallel_args(["-q", "tests/test_attention.py"]) == ["-n", "2", "--dist", "loadgroup"]
    for chosen in (["-n", "0"], ["-n4"], ["--numprocesses=3"], ["-p", "no:xdist"], ["--dist=load"]):
        assert dev.parallel_args(["-q", *chosen]) == [], chosen
    monkeypatch.setattr(dev.os, "cpu_count", lambda: 64)
    assert dev.parallel_args([])[:2] == ["-n", "4"]
    monkeypatch.setattr(dev.os, "cpu_count", lambda: 1)
    assert dev.parallel_args([]) == []


def test_every_test_in_tests_e2e_carries_the_e2e_marker():
    for module in sorted((ROOT / "tests" / "e2e").glob("test_*.py")):
        assert "pytest.mark.e2e" in module.read_text(), f"{module.name} lacks pytestmark = [pytest.mark.e2e, ...]"


def test_without_an_archived_host_the_newest_frontend_is_not_tested_and_the_reason_is_given(tmp_path, monkeypatch):
    dev = load_dev()
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setenv(dev.HOSTS_ENV, str(tmp_path))
    legs, notes = dev.plan_legs([])
    assert [(leg.host.version, leg.frontend) for leg in legs] == [(dev.COMFYUI_VERSION, None)]
    assert "ran ONE ComfyUI host" in notes[0]
    assert f"frontend {dev.NEWEST_FRONTEND} not tested" in notes[1] and "there is none" in notes[1]


def test_a_fresh_install_is_written_to_disk_before_the_tests_start(tmp_path, monkeypatch):
    """pip's gigabytes are flushed as part of set-up (os.sync after pip), so that the suite's fsyncs do not wait
    behind their write-back; an install that the stamp says is done runs neither."""
    dev = load_dev()
    comfyui = tmp_path / "ComfyUI"
    comfyui.mkdir()
    (comfyui / "requirements.txt").write_text("numpy\n")
    host = dev.Host(version="0.3.75", comfyui=comfyui, venv=tmp_path / "venv")
    host.venv.mkdir()
    calls = []
    monkeypatch.setattr(dev, "run", lambda cmd, **kw: calls.append("pip" if "pip" in map(str, cmd) else cmd))
    monkeypatch.setattr(dev.os, "sync", lambda: calls.append("sync"))
    dev.install_requirements(host)
    assert calls == ["pip", "sync"]
    dev.install_requirements(host)  # the stamp matches: nothing to install, nothing to write
    assert calls == ["pip", "sync"]
