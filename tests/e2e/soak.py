"""Soak: hundreds of prompts through a real ComfyUI server, then every output checked against fresh servers.

    python3 dev.py soak [--prompts N] [--alone K] [--out DIR]     (README, Reliability)
    python tests/e2e/soak.py ...                                   the same in a host's venv (COMFYUI_PATH set)

1. A base directory with the tiny models and encoder files the e2e suite uses (tests/e2e/tiny_base.py), the
   shipped example photos, and the soak's own inputs: a cut-out PNG of the cat (RGBA), a segmentation-style
   mask of it, a blank photo, and a file in a layout the loader refuses (a plain IP-Adapter).
2. The soak server, started as a user starts it (default caching), gets all N prompts at once over
   POST /prompt and is followed on its websocket:
   - good prompts cycle through 11 subjects from 4 encoder files (2 in the pack's format, 2 in IP-Adapter
     Plus's layout): one photo or two, a Load Image cut-out MASK, a segmentation mask, an explicit mask_marks,
     crop none; single subjects and chained pairs (person + pet); λ 1, 1.5, 2.5, 4; a region mask or none; a
     start/end window; prompts of 1 to 4 chunks of 77 tokens against negatives of 1 or 2; a seed each;
   - every 10th prompt is interrupted (POST /interrupt) when its KSampler reports its first step;
   - 5 % are bad (a missing word, a missing encoder file, a refused layout, a blank photo), each of which must
     come back with the pack's own message;
   - the server's RSS is read after each prompt; growth counts from the end of the warm-up (the first tenth).
3. ComfyUI's caches are freed (POST /free) and the pack's subjects still alive in the server are counted after
   a garbage collection (tests/e2e/tiny_pack: GET /nested_attention_test/live_subjects): none may be left.
4. "Alone on a fresh server", made affordable: a second fresh server started with --cache-none (every node of
   every prompt runs from scratch, nothing kept from the prompt before) runs each good prompt once, in a
   shuffled order; and K more fresh servers (default caching) run one good prompt each, nothing else. Each
   output must equal the soak's bit for bit: the latent (SaveLatent) and the decoded PNG's pixels.

Both servers run torch with one thread (OMP_NUM_THREADS=1), so a float sum is added up in one order on both.
The report goes to <out>/soak.json; the exit code is 1 when any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for _path in (_HERE, _HERE.parent):  # tests/e2e (harness) and tests/ (tiny_models, pack_helpers)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import tiny_models  # isort: skip  (first: it sets ComfyUI up as a library, as the test suite's conftest does)
import aiohttp
import numpy as np
import torch
from harness import FACES_ENCODER, PETS_ENCODER, ComfyServer
from pack_helpers import PET_PHOTO, cat_cutout_alpha
from PIL import Image
from safetensors.torch import load_file
from tiny_base import prepare_tiny_base
from weight_layouts import plain_ip_adapter_keys, write_safetensors

from devtools.workflows import (  # tiny_base puts it on the path
    IPADAPTER_FACE,
    IPADAPTER_PLUS,
    PERSON_IMAGES,
    PET_IMAGE,
)

CLIENT_ID = "nested-attention-soak"
SERVER_ENV = {"OMP_NUM_THREADS": "1"}
CUTOUT, CUTOUT_MASK, BLANK = "soak_cat_cutout.png", "soak_cat_mask.png", "soak_blank.png"
REFUSED_LAYOUT = "ip-adapter_sdxl_vit-h.safetensors"  # a plain IP-Adapter: refused by name and reason
MISSING_ENCODER = "soak-no-such-encoder.safetensors"
RSS_GROWTH_LIMIT_MB = 100.0
IMAGE_SIZE = 64  # pixels: an 8 x 8 latent for the tiny UNet
INTERRUPT_STEPS = 400  # long enough that the interrupt lands mid-sampling
# The pack's error classes: a bad prompt must fail with one of these, never with something from deeper down.
PACK_ERRORS = ("SubjectWordError", "SubjectError", "NestedWeightsError", "NestedEncoderLoadError", "NestedApplyError")


# ------------------------------------------------------------------------------------------------
# What is sampled


@dataclass(frozen=True)
class SubjectSpec:
    encoder: str
    photos: tuple[str, ...]
    word: str
    token: str = ""  # the Apply node's token ("" = the encoder's word)
    mask: str | None = None  # None, "load_image" (the cut-out's own MASK) or "segmentation" (1 on the cat)
    mask_marks: str = "auto"
    crop: str = "center"


PERSONS = [
    SubjectSpec(FACES_ENCODER, (PERSON_IMAGES[0],), "person"),
    SubjectSpec(FACES_ENCODER, (PERSON_IMAGES[1],), "person"),
    SubjectSpec(FACES_ENCODER, (PERSON_IMAGES[2],), "person"),
    SubjectSpec(FACES_ENCODER, (PERSON_IMAGES[0], PERSON_IMAGES[1]), "person"),  # two photos, one subject
    SubjectSpec(IPADAPTER_FACE, (PERSON_IMAGES[2],), "person"),
]
PETS = [
    SubjectSpec(PETS_ENCODER, (PET_IMAGE,), "pet"),
    SubjectSpec(PETS_ENCODER, (CUTOUT,), "pet", mask="load_image"),
    SubjectSpec(PETS_ENCODER, (PET_IMAGE,), "pet", mask="segmentation"),
    SubjectSpec(PETS_ENCODER, (CUTOUT,), "pet", mask="load_image", mask_marks="background"),
    SubjectSpec(IPADAPTER_PLUS, (PET_IMAGE,), "pet", token="pet"),
    SubjectSpec(PETS_ENCODER, (PET_IMAGE,), "pet", crop="none"),
]
SUBJECTS = PERSONS + PETS
LAMBDAS = (1.0, 1.5, 2.5, 4.0)
FILLER = ("standing in a quiet garden with tall trees, stone paths, wooden benches, morning fog, "
          "warm light from the left, a small pond with reeds and ducks, ")  # 32 tokens
NEGATIVES = ("", "blurry, low quality", "blurry, low quality, " + FILLER * 3)  # 1, 1 and 2 chunks


def prompt_text(words: list[str], length: int) -> str:
    """A prompt naming every subject word, of 1 chunk (length 0 and 1), 2 chunks (2) or 4 chunks (3)."""
    subject = " and their ".join(words)
    if length == 0:
        return f"a photo of a {subject}"
    text = f"a photo of a ({subject}:1.2) sitting on a bench, soft light, 35mm. {words[0].upper()}!"
    return text + ", " + FILLER * {1: 0, 2: 3, 3: 8}[length]


@dataclass
class Case:
    index: int
    kind: str  # "good", "interrupt" or "bad"
    subjects: tuple[SubjectSpec, ...]
    text: str
    negative: str
    lam: float
    window: tuple[float, float]
    region: bool
    seed: int
    steps: int
    bad: str | None = None  # "missing word", "missing file", "refused layout", "blank photo"
    prompt_id: str | None = None
    outcome: dict = field(default_factory=dict)

    def describe(self) -> str:
        who = " + ".join(f"{s.word}<{s.encoder[:12]}:{'+'.join(p[:14] for p in s.photos)}"
                         f"{':' + s.mask if s.mask else ''}>" for s in self.subjects)
        return (f"#{self.index} {self.kind}{' (' + self.bad + ')' if self.bad else ''}: {who}, λ {self.lam}, "
                f"{len(self.text)} chars")


BAD_KINDS = ("missing word", "missing file", "refused layout", "blank photo")


def make_cases(n: int, bad_every: int = 20) -> list[Case]:
    """N prompts: every 10th interrupted, every `bad_every`-th (from the 5th) bad, the rest good; deterministic."""
    cases = []
    for i in range(n):
        if i % 4 == 1:  # chained: a person and their pet
            subjects = (PERSONS[(i // 4) % len(PERSONS)], PETS[(i // 4) % len(PETS)])
        else:
            subjects = (SUBJECTS[i % len(SUBJECTS)],)
        case = Case(
            index=i, kind="good", subjects=subjects,
            text=prompt_text([s.word for s in subjects], (i // 3) % 4), negative=NEGATIVES[i % 3],
            lam=LAMBDAS[(i // 2) % 4], window=(0.2, 0.8) if i % 7 == 3 else (0.0, 1.0), region=i % 5 == 2,
            seed=i, steps=2 + i % 2,
        )
        if i % 10 == 9:
            case.kind, case.steps = "interrupt", INTERRUPT_STEPS
        elif i % bad_every == 4:
            case.kind, case.bad = "bad", BAD_KINDS[(i // bad_every) % len(BAD_KINDS)]
            pet = PETS[0]
            case.subjects = {
                "missing word": (pet,),
                "missing file": (SubjectSpec(MISSING_ENCODER, pet.photos, "pet"),),
                "refused layout": (SubjectSpec(REFUSED_LAYOUT, pet.photos, "pet"),),
                "blank photo": (SubjectSpec(PETS_ENCODER, (BLANK,), "pet"),),
            }[case.bad]
            case.text = "a photo of two pets on a sofa" if case.bad == "missing word" else "a photo of a pet"
        cases.append(case)
    return cases


def api_prompt(case: Case, tag: str) -> dict:
    """The case as an API prompt ({node id: {class_type, inputs}}), saving under `tag`/."""
    nodes: dict[str, dict] = {}

    def add(class_type: str, **inputs) -> str:
        node_id = str(len(nodes) + 1)
        nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id

    ckpt = add("NestedAttentionTestTinyCheckpoint")
    vision = add("NestedAttentionTestTinyCLIPVision")

    def cat_mask() -> list:
        return [add("ImageToMask", image=[add("LoadImage", image=CUTOUT_MASK), 0], channel="red"), 0]

    model = [ckpt, 0]
    positive = None
    for s in case.subjects:
        encoder = add("NestedAttentionLoadEncoder", encoder_name=s.encoder, clip_vision=[vision, 0])
        loads = [add("LoadImage", image=photo) for photo in s.photos]
        image = [loads[0], 0]
        for more in loads[1:]:
            image = [add("ImageBatch", image1=image, image2=[more, 0]), 0]
        inputs = {"encoder": [encoder, 0], "image": image, "crop": s.crop, "mask_marks": s.mask_marks}
        if s.mask == "load_image":
            inputs["mask"] = [loads[0], 1]  # Load Image's MASK: 1 - alpha
        elif s.mask == "segmentation":
            inputs["mask"] = cat_mask()
        subject = add("NestedAttentionEncodeSubject", **inputs)
        apply_inputs = {"model": model, "clip": [ckpt, 1], "subject": [subject, 0], "text": case.text,
                        "token": s.token, "λ": case.lam, "start_percent": case.window[0],
                        "end_percent": case.window[1]}
        if case.region:
            apply_inputs["mask"] = cat_mask()
        apply = add("NestedAttentionApply", **apply_inputs)
        model, positive = [apply, 0], [apply, 1]
    negative = add("CLIPTextEncode", text=case.negative, clip=[ckpt, 1])
    latent = add("EmptyLatentImage", width=IMAGE_SIZE, height=IMAGE_SIZE, batch_size=1)
    sampler = add("KSampler", model=model, positive=positive, negative=[negative, 0], latent_image=[latent, 0],
                  seed=case.seed, steps=case.steps, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    decoded = add("VAEDecode", samples=[sampler, 0], vae=[ckpt, 2])
    add("SaveImage", images=[decoded, 0], filename_prefix=f"{tag}/{case.index:04d}")
    add("SaveLatent", samples=[sampler, 0], filename_prefix=f"{tag}_latents/{case.index:04d}")
    return nodes


def sampler_id(prompt: dict) -> str:
    return next(i for i, n in prompt.items() if n["class_type"] == "KSampler")


# ------------------------------------------------------------------------------------------------
# The base directory


def prepare_soak_base(base: Path, unet) -> None:
    """The e2e suite's tiny base plus the soak's inputs and a file in a layout the loader refuses."""
    prepare_tiny_base(base, unet)
    rgb = np.asarray(Image.open(PET_PHOTO).convert("RGB"))
    alpha = cat_cutout_alpha(rgb.shape[1], rgb.shape[0])
    Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(base / "input" / CUTOUT)
    Image.fromarray(alpha, mode="L").convert("RGB").save(base / "input" / CUTOUT_MASK)
    Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255)).save(base / "input" / BLANK)
    write_safetensors(base / "models" / "ipadapter" / REFUSED_LAYOUT,
                      [(k, s, torch.float16) for k, s in plain_ip_adapter_keys()], lambda n, s, d: torch.zeros(s))


def rss_mb(pid: int) -> float:
    """Resident set size of a process, in MB (Linux: /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for process {pid}")


# ------------------------------------------------------------------------------------------------
# The soak server: everything queued at once, followed on the websocket


async def _soak(server: ComfyServer, cases: list[Case], tag: str, idle_timeout: float) -> dict:
    rss: list[tuple[int, float]] = []  # (prompts finished, RSS MB)
    live: list[tuple[int, dict]] = []
    by_id: dict[str, Case] = {}
    sampler_of: dict[str, str] = {}
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{server.url.replace('http', 'ws')}/ws?clientId={CLIENT_ID}")
        for case in cases:
            prompt = api_prompt(case, tag)
            async with http.post(f"{server.url}/prompt", json={"prompt": prompt, "client_id": CLIENT_ID}) as r:
                answer = await r.json(content_type=None)
            if r.status == 200:
                case.prompt_id = answer["prompt_id"]
                by_id[case.prompt_id] = case
                sampler_of[case.prompt_id] = sampler_id(prompt)
            else:
                case.outcome = {"refused": answer}
        pending, finished, interrupts_sent = set(by_id), 0, set()
        while pending:
            try:
                message = await ws.receive(timeout=idle_timeout)
            except asyncio.TimeoutError:
                raise AssertionError(f"nothing from the server for {idle_timeout:.0f} s with {len(pending)} "
                                     f"prompts pending:\n{server.log_tail()}") from None
            if message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                raise AssertionError(f"the websocket closed (server crashed?):\n{server.log_tail()}")
            if message.type != aiohttp.WSMsgType.TEXT:
                continue  # previews (binary)
            event = json.loads(message.data)
            data = event.get("data", {})
            pid = data.get("prompt_id")
            case = by_id.get(pid)
            if case is None:
                continue
            if (event["type"] == "progress" and case.kind == "interrupt" and pid not in interrupts_sent
                    and data.get("node") == sampler_of[pid]):
                case.outcome["interrupted_at"] = (data["value"], data["max"])
                interrupts_sent.add(pid)
                async with http.post(f"{server.url}/interrupt", json={"prompt_id": pid}) as r:
                    r.raise_for_status()
            elif event["type"] == "executing" and data.get("node") is None and pid in pending:
                pending.discard(pid)
                finished += 1
                rss.append((finished, rss_mb(server.process.pid)))
                if finished % 10 == 0 or not pending:
                    async with http.get(f"{server.url}/nested_attention_test/live_subjects") as r:
                        live.append((finished, await r.json()))
        await ws.close()
    return {"rss": rss, "live": live}


def run_soak(server: ComfyServer, cases: list[Case], tag: str = "soak", idle_timeout: float = 300.0) -> dict:
    # In a thread of its own: the caller's thread may already run an event loop (playwright's, in the e2e suite).
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, _soak(server, cases, tag, idle_timeout)).result()


# ------------------------------------------------------------------------------------------------
# Outputs and checks


def outputs(server: ComfyServer, entry: dict, prompt: dict) -> dict:
    """The latent tensor (SaveLatent) and the PNG's pixels (SaveImage) of a finished prompt, read from disk."""
    found = {}
    for node_id, node in prompt.items():
        kind = node["class_type"]
        if kind in ("SaveImage", "SaveLatent"):
            key = "images" if kind == "SaveImage" else "latents"
            [item] = entry["outputs"][node_id][key]
            path = server.base / "output" / item.get("subfolder", "") / item["filename"]
            if kind == "SaveImage":
                found["pixels"] = np.asarray(Image.open(path))
            else:
                found["latent"] = load_file(str(path))["latent_tensor"]
    return found


def same_outputs(a: dict, b: dict) -> bool:
    return (a["latent"].dtype == b["latent"].dtype and torch.equal(a["latent"], b["latent"])
            and np.array_equal(a["pixels"], b["pixels"]))


def check_bad(case: Case, server: ComfyServer) -> str | None:
    """None when a bad prompt came back with the pack's own message for its fault, else what went wrong."""
    outcome = case.outcome
    if case.bad == "missing file":
        refused = outcome.get("refused")
        if not refused:
            return f"queued, expected to be refused at /prompt: {outcome}"
        details = " ".join(e.get("details", "") for n in refused.get("node_errors", {}).values()
                           for e in n.get("errors", []))
        folder = str(server.base / "models" / "nested_attention")
        if MISSING_ENCODER not in details or folder not in details:
            return f"the refusal does not name the file and the folder searched: {refused}"
        return None
    error = outcome.get("error")
    if not error:
        return f"expected an execution error, got {outcome.get('status')}"
    kind = error.get("exception_type", "").rsplit(".", 1)[-1]
    text = error.get("exception_message", "")
    expected = {"missing word": ("SubjectWordError", "'pet' is not in the prompt", "another form of 'pet'"),
                "refused layout": ("NestedWeightsError", REFUSED_LAYOUT, "plain IP-Adapter"),
                "blank photo": ("SubjectError", "is blank", "16-bit PNG")}[case.bad]
    if kind not in PACK_ERRORS or kind != expected[0] or not all(e in text for e in expected[1:]):
        return f"not the pack's message: {kind}: {text[:300]}"
    return None


def history(server: ComfyServer, case: Case) -> dict:
    entry = server.get_json(f"/history/{case.prompt_id}")[case.prompt_id]
    messages = {m[0]: m[1] for m in entry["status"].get("messages", [])}
    case.outcome.update(status=entry["status"].get("status_str"), error=messages.get("execution_error"),
                        interrupted=messages.get("execution_interrupted"))
    return entry


def run_alone(server: ComfyServer, cases: list[Case], tag: str) -> dict[int, dict]:
    """Each case run on its own on `server`, one after another: {case index: outputs}."""
    found = {}
    for case in cases:
        prompt = api_prompt(case, tag)
        entry = server.wait_for(server.queue_prompt(prompt))
        found[case.index] = outputs(server, entry, prompt)
    return found


# ------------------------------------------------------------------------------------------------
# The whole soak


def _check_soak(server: ComfyServer, cases: list, failures: list[str]) -> dict:
    """The soak's outcomes: each good prompt's outputs (returned, by index), each interrupted prompt stopped
    mid-sampling, each bad one answered with the pack's message."""
    soak_out = {}
    for case in cases:
        if case.prompt_id is None:
            continue
        entry = history(server, case)
        if case.kind == "good":
            if case.outcome["status"] != "success":
                failures.append(f"{case.describe()} failed: {case.outcome.get('error')}")
            else:
                soak_out[case.index] = outputs(server, entry, api_prompt(case, "soak"))
    for case in cases:
        if case.kind == "interrupt":
            at = case.outcome.get("interrupted_at")
            if not case.outcome.get("interrupted") or not at or not 0 < at[0] < at[1]:
                failures.append(f"{case.describe()} was not interrupted mid-sampling: {case.outcome}")
        elif case.kind == "bad":
            problem = check_bad(case, server)
            if problem:
                failures.append(f"{case.describe()}: {problem}")
    return soak_out


def _check_memory(server: ComfyServer, cases: list, followed: dict, prompts: int,
                  failures: list[str]) -> tuple[dict, dict]:
    """RSS from the end of the warm-up, the subjects left once ComfyUI lets go of its caches, and the server
    still up with no traceback beyond the bad prompts' ones; returns (memory, live subjects)."""
    warm = max(10, prompts // 10)
    rss = followed["rss"]
    at_warm = next(mb for done, mb in rss if done >= warm)
    after = [mb for done, mb in rss if done >= warm]
    memory = {"warmup_prompts": warm, "rss_at_warmup_mb": round(at_warm, 1), "rss_end_mb": round(rss[-1][1], 1),
              "rss_peak_after_warmup_mb": round(max(after), 1), "growth_mb": round(rss[-1][1] - at_warm, 1),
              "rss_series": [(done, round(mb, 1)) for done, mb in rss]}
    if memory["growth_mb"] >= RSS_GROWTH_LIMIT_MB:
        failures.append(f"RSS grew {memory['growth_mb']} MB after the warm-up (limit {RSS_GROWTH_LIMIT_MB})")
    applies = sum(len(c.subjects) for c in cases if c.prompt_id)
    live = {"series": followed["live"], "end_of_soak": followed["live"][-1][1], "apply_nodes_queued": applies}
    server.post("/free", {"unload_models": True, "free_memory": True})
    deadline = time.monotonic() + 60
    while True:
        live["after_free"] = server.get_json("/nested_attention_test/live_subjects")
        if live["after_free"]["bindings"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if live["after_free"]["bindings"] or live["after_free"]["kv_entries"]:
        failures.append(f"subjects still alive after ComfyUI freed its caches: {live['after_free']}")
    if server.process.poll() is not None:
        failures.append(f"the soak server exited with code {server.process.returncode}")
    else:
        server.get_json("/system_stats")
    log_text = server.log_path.read_text(errors="replace")
    tracebacks = log_text.count("Traceback (most recent call last)")
    errors_expected = sum(1 for c in cases if c.kind == "bad" and c.outcome.get("error"))
    if tracebacks > errors_expected:
        failures.append(f"the server log has {tracebacks} tracebacks for {errors_expected} expected errors")
    return memory, live


def _compare_with_fresh_servers(start, cases: list, soak_out: dict, alone: int, times: dict, log,
                                failures: list[str]) -> dict:
    """The good prompts again on a fresh --cache-none server (shuffled) and `alone` of them each on a server
    of its own: their outputs must be the soak's."""
    good = [c for c in cases if c.kind == "good"]
    compared = {}
    reference = start("reference", "--cache-none")
    try:
        order = good[:]
        random.Random(0).shuffle(order)
        t = time.monotonic()
        log(f"reference: {len(order)} good prompts, shuffled, on a fresh --cache-none server")
        ref_out = run_alone(reference, order, "reference")
        times["reference_s"] = round(time.monotonic() - t, 1)
    finally:
        reference.stop()
    differ = [c.index for c in good if c.index in soak_out and not same_outputs(soak_out[c.index], ref_out[c.index])]
    compared["reference"] = {"prompts": len(good), "equal": len(good) - len(differ), "differ": differ}
    picks = [good[round(k * (len(good) - 1) / max(alone - 1, 1))] for k in range(alone)] if alone else []
    differ = []
    for k, case in enumerate(picks):
        single = start(f"alone-{k}")
        try:
            found = run_alone(single, [case], "alone")[case.index]
        finally:
            single.stop()
        if case.index not in soak_out or not same_outputs(soak_out[case.index], found):
            differ.append(case.index)
    compared["alone"] = {"prompts": [c.index for c in picks], "equal": len(picks) - len(differ), "differ": differ}
    for name, result in compared.items():
        if result["differ"]:
            failures.append(f"{name}: outputs differ from the soak's for prompts {result['differ']}")
    return compared


def soak(prompts: int, alone: int, workdir: Path, unet, comfyui: Path, bad_every: int = 20, log=print) -> dict:
    """Run the soak (module docstring) in `workdir`; returns the report (report["failures"] empty when it passed)."""
    cases = make_cases(prompts, bad_every)
    failures: list[str] = []
    times: dict[str, float] = {}

    def start(name: str, *extra: str) -> ComfyServer:
        base = workdir / name / "base"
        prepare_soak_base(base, unet)
        t = time.monotonic()
        server = ComfyServer(comfyui, base, workdir / name / "server.log", extra_args=extra, env=SERVER_ENV).start()
        times[f"{name}_start_s"] = round(time.monotonic() - t, 1)
        return server

    server = start("soak")
    try:
        t = time.monotonic()
        log(f"soak: {prompts} prompts queued on {server.url}")
        followed = run_soak(server, cases, "soak")
        times["soak_s"] = round(time.monotonic() - t, 1)
        soak_out = _check_soak(server, cases, failures)
        memory, live = _check_memory(server, cases, followed, prompts, failures)
    finally:
        server.stop()
    compared = _compare_with_fresh_servers(start, cases, soak_out, alone, times, log, failures)

    counts = {kind: sum(1 for c in cases if c.kind == kind) for kind in ("good", "interrupt", "bad")}
    return {
        "prompts": prompts, "counts": counts, "subjects": len(SUBJECTS),
        "encoders": sorted({s.encoder for s in SUBJECTS}),
        "bad": {c.index: {"kind": c.bad, "answer": _short(c.outcome)} for c in cases if c.kind == "bad"},
        "interrupted_at": {c.index: c.outcome.get("interrupted_at") for c in cases if c.kind == "interrupt"},
        "memory": memory, "live_subjects": live, "compared": compared, "times": times, "failures": failures,
    }


def _short(outcome: dict) -> str:
    if outcome.get("refused"):
        errors = [e for n in outcome["refused"].get("node_errors", {}).values() for e in n.get("errors", [])]
        return "refused at /prompt: " + (errors[0].get("details", "") if errors else json.dumps(outcome["refused"]))
    error = outcome.get("error") or {}
    return f"{error.get('exception_type', '?')}: {error.get('exception_message', '')}"


def summary(report: dict) -> str:
    m, live, c = report["memory"], report["live_subjects"], report["compared"]
    lines = [
        (f"prompts: {report['prompts']} ({report['counts']['good']} good, {report['counts']['interrupt']} interrupted "
        f"mid-sampling, {report['counts']['bad']} bad); {report['subjects']} subjects from "
        f"{len(report['encoders'])} encoder files"),
        (f"RSS: {m['rss_at_warmup_mb']} MB after {m['warmup_prompts']} prompts, {m['rss_end_mb']} MB at the end "
        f"(growth {m['growth_mb']:+} MB, peak {m['rss_peak_after_warmup_mb']} MB; limit +{RSS_GROWTH_LIMIT_MB:.0f})"),
        (f"subjects alive: {live['end_of_soak']['bindings']} at the end of the soak ({live['apply_nodes_queued']} Apply "
        f"nodes queued); after POST /free: {live['after_free']['bindings']} bindings, "
        f"{live['after_free']['kv_entries']} K~/V~ entries"),
        (f"outputs equal to a fresh --cache-none server's: {c['reference']['equal']}/{c['reference']['prompts']}; "
        f"to a server running that prompt alone: {c['alone']['equal']}/{len(c['alone']['prompts'])}"),
        "bad prompts: " + "; ".join(f"#{i} {b['kind']}: {b['answer'][:90]}" for i, b in report["bad"].items()),
        f"times: {report['times']}",
        "PASSED" if not report["failures"] else "FAILED:\n  " + "\n  ".join(report["failures"]),
    ]
    return "\n".join(lines)


def parse_args(args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=200,
                        help="How many prompts to queue on the soak server (every 10th interrupted, 5 %% bad).")
    parser.add_argument("--bad-every", type=int, default=20,
                        help="One bad prompt in this many (20: 5 %%); the bad kinds take turns.")
    parser.add_argument("--alone", type=int, default=2,
                        help="How many good prompts to run again each on a server of its own, started for it.")
    parser.add_argument("--out", type=Path, default=Path("runs/soak"),
                        help="Folder for soak.json and the servers' logs.")
    parser.add_argument("--keep", action="store_true", help="Keep the servers' base folders (outputs) in --out.")
    parsed = parser.parse_args(args)
    if not 5 <= parsed.bad_every <= parsed.prompts:
        parser.error("--bad-every must be from 5 to --prompts (the first bad prompt is the 5th)")
    return parsed


def main(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="nested-attention-soak-"))
    try:
        t = time.monotonic()
        report = soak(args.prompts, args.alone, workdir, tiny_models.tiny_sdxl_unet(seed=0),
                      tiny_models.find_comfyui(), args.bad_every)
        report["times"]["total_s"] = round(time.monotonic() - t, 1)
    finally:
        for log_file in workdir.glob("*/server.log"):
            shutil.copy2(log_file, args.out / f"{log_file.parent.name}.log")
        if args.keep:
            shutil.copytree(workdir, args.out / "servers", dirs_exist_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
    (args.out / "soak.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(summary(report), flush=True)
    print(f"[nested-attention] report: {args.out / 'soak.json'}; server logs: {args.out}/*.log", flush=True)
    return 0 if not report["failures"] else 1


if __name__ == "__main__":
    sys.exit(main(parse_args()))
