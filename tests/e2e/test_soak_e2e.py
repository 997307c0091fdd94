"""The soak, short: 40 prompts through a real ComfyUI server, checked against fresh servers (tests/e2e/soak.py).

`python3 dev.py soak` runs the full one (200 prompts; README, Reliability). This short run has 32 good prompts
(11 subjects, chained pairs, masks, λ, 1-4 chunk prompts), 4 interrupted mid-sampling and 4 bad (one of each
kind: one in 10 instead of 20, so that each kind comes up). It starts its own servers: the soak server, a
fresh --cache-none server that runs every good prompt again, and one fresh server for one prompt alone.
The report and the servers' logs go to tests/artifacts/soak/ (beside the shared server's tests/artifacts/e2e/,
which that server's start empties: the soak may run at the same time, on another pytest-xdist worker).
"""

from __future__ import annotations

import json
import shutil

import pytest
import soak
import tiny_models
from harness import ARTIFACTS_DIR

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]


def test_a_short_soak_keeps_the_server_up_answers_bad_prompts_and_reproduces_every_output(tmp_path,
                                                                                          _tiny_unet_shared):
    report = soak.soak(40, 1, tmp_path, _tiny_unet_shared, tiny_models.find_comfyui(), bad_every=10)
    out = ARTIFACTS_DIR.parent / "soak"
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    for log in tmp_path.glob("*/server.log"):
        shutil.copy2(log, out / f"{log.parent.name}.log")
    print(soak.summary(report))

    assert report["counts"] == {"good": 32, "interrupt": 4, "bad": 4}
    assert sorted(b["kind"] for b in report["bad"].values()) == sorted(soak.BAD_KINDS)
    assert report["compared"]["reference"]["equal"] == 32 and report["compared"]["alone"]["equal"] == 1
    assert report["live_subjects"]["after_free"] == {"bindings": 0, "kv_entries": 0}
    assert report["memory"]["growth_mb"] < soak.RSS_GROWTH_LIMIT_MB
    assert not report["failures"], soak.summary(report)
