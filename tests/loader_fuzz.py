"""Loader fuzz: mutated files through Load Nested Encoder, `python -m nested_attention.describe` and Load
Nested Subject, each case bounded in time and memory.

    .venv/bin/python tests/loader_fuzz.py [--files 1000] [--seed 0] [--case-timeout 30] [--memory-mb 1024]

Three seed files, made here on the tiny test models: an encoder in the pack's own format, a file in
IP-Adapter Plus's layout (real key names, the tiny UNet's layers), and a subject saved by Save Nested
Subject. Case i takes a seed (in turn) and one mutation (in turn), with its own random stream (seed, i):
truncations, random bytes, byte flips, header lengths out of range, wrong dtypes (re-packed or not),
changed shapes, tensors of 0 elements, duplicated keys, bad data offsets, tensors dropped, added or
renamed, metadata dropped or damaged (config numbers 0, negative, huge, of the wrong type), NaN / Inf
values, and files that are not safetensors at all (JPEG, PNG, text, an HTML error page, a pickle, an
empty file). Each file goes through the encoder loader node (encoder seeds) or the subject loader node
(subject seeds), and through `describe`'s main.

A case passes when each consumer loads the file or raises one of the pack's own errors (NestedWeightsError,
NestedEncoderLoadError, SubjectError); NaN / Inf values must be refused with the tensor's name. Anything
else fails the case: another exception, a crash of the worker process, a case over the time limit (the
worker is killed and restarted after it), or memory over the worker's address-space limit. The cases run
in a worker process so that a hang or a crash is seen, not suffered. Prints the figures: files, outcome
classes per consumer, the slowest case, the worker's peak memory and the largest rise one case caused.
`tests/test_loader_fuzz.py` runs a fixed-seed share of it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import resource
import select
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# ------------------------------------------------------------------------------------------------
# The safetensors byte layout: 8-byte little-endian header length, a JSON header, the data.

ELEMENT_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
NAN_BYTES = {"F32": struct.pack("<f", math.nan), "F16": struct.pack("<e", math.nan),
             "BF16": b"\xc0\x7f", "F64": struct.pack("<d", math.nan)}
INF_BYTES = {"F32": struct.pack("<f", math.inf), "F16": struct.pack("<e", math.inf),
             "BF16": b"\x80\x7f", "F64": struct.pack("<d", math.inf)}


def split(blob: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def join(header: dict | str, data: bytes) -> bytes:
    text = header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def tensors(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def repack(header: dict, data: bytes, changes: dict[str, dict]) -> bytes:
    """A file whose tensors are `header`'s with `changes` (new dtype / shape per name, None to drop, or a new
    entry), every tensor's bytes kept (cut or zero-padded to its new size) and the offsets made consistent."""
    out, blob = {}, bytearray()
    for name in tensors(header) + [n for n in changes if n not in header]:
        entry = dict(header.get(name, {}))
        if name in changes:
            if changes[name] is None:
                continue
            entry.update(changes[name])
        old = header.get(name)
        raw = data[old["data_offsets"][0] : old["data_offsets"][1]] if old else b""
        size = math.prod(entry["shape"]) * ELEMENT_SIZE.get(entry["dtype"], 4)
        raw = raw[:size] + bytes(max(0, size - len(raw)))
        entry["data_offsets"] = [len(blob), len(blob) + size]
        out[name] = entry
        blob += raw
    if "__metadata__" in header:
        out["__metadata__"] = header["__metadata__"]
    return join(out, bytes(blob))


# ------------------------------------------------------------------------------------------------
# Mutations: each takes (seed file bytes, rng) and returns (bytes, detail, NaN/Inf tensor name or None).

FOREIGN = {
    "jpeg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + bytes(200),
    "png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200),
    "text": b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 848000000\n",
    "html": b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n",
    "pickle": b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01a\x94K\x01s.",
    "zip (torch.save)": b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(200),
    "gguf": b"GGUF\x03\x00\x00\x00" + bytes(200),
    "empty": b"",
}


def m_truncate(blob, rng):
    n = struct.unpack("<Q", blob[:8])[0]
    cut = rng.choice([rng.randrange(0, 8), rng.randrange(8, 8 + n), rng.randrange(8 + n, len(blob))])
    return blob[:cut], f"cut at byte {cut} of {len(blob)}", None


def m_random_bytes(blob, rng):
    size = rng.choice([1, 7, 8, 64, 4096, rng.randrange(1, 65536)])
    return bytes(rng.getrandbits(8) for _ in range(size)), f"{size} random bytes", None


def m_byte_flips(blob, rng):
    out = bytearray(blob)
    n = struct.unpack("<Q", blob[:8])[0]
    where = rng.choice(["header", "data", "anywhere"])
    spots = []
    for _ in range(rng.choice([1, 2, 8, 64])):
        lo, hi = {"header": (8, 8 + n), "data": (8 + n, len(blob)), "anywhere": (0, len(blob))}[where]
        i = rng.randrange(lo, hi)
        out[i] ^= 1 << rng.randrange(8)
        spots.append(i)
    return bytes(out), f"{len(spots)} bits flipped in the {where}", None


def m_header_length(blob, rng):
    n = struct.unpack("<Q", blob[:8])[0]
    value = rng.choice([0, 1, n - 1, n + 8, len(blob), len(blob) + 1, 100_000_001, 1 << 40, (1 << 64) - 1])
    return struct.pack("<Q", value) + blob[8:], f"header length {value} (real {n})", None


def m_dtype(blob, rng):
    header, data = split(blob)
    name = rng.choice(tensors(header))
    dtype = rng.choice([d for d in ELEMENT_SIZE if d != header[name]["dtype"]])
    if rng.random() < 0.5:  # offsets kept: the size no longer matches the dtype
        header[name]["dtype"] = dtype
        return join(header, data), f"{name}: dtype {dtype}, offsets kept", None
    return repack(header, data, {name: {"dtype": dtype}}), f"{name}: dtype {dtype}, re-packed", None


def m_shape(blob, rng):
    header, data = split(blob)
    name = rng.choice(tensors(header))
    shape = list(header[name]["shape"])
    how = rng.choice(["double", "extra dim", "drop dim", "transpose", "offsets kept"])
    if how == "double" and shape:
        shape[rng.randrange(len(shape))] *= 2
    elif how == "extra dim":
        shape.insert(rng.randrange(len(shape) + 1), rng.choice([1, 2]))
    elif how == "drop dim" and shape:
        shape.pop(rng.randrange(len(shape)))
    elif how == "transpose":
        shape = shape[::-1]
    else:
        header[name]["shape"] = shape + [3]
        return join(header, data), f"{name}: shape {shape + [3]}, offsets kept", None
    return repack(header, data, {name: {"shape": shape}}), f"{name}: shape {shape}", None


def m_zero_size(blob, rng):
    header, data = split(blob)
    name = rng.choice(tensors(header))
    shape = list(header[name]["shape"]) or [1]
    shape[rng.randrange(len(shape))] = 0
    return repack(header, data, {name: {"shape": shape}}), f"{name}: shape {shape} (0 elements)", None


def m_duplicate_key(blob, rng):
    header, data = split(blob)
    name = rng.choice(tensors(header) + (["__metadata__"] if "__metadata__" in header else []))
    text = json.dumps(header, separators=(",", ":"))
    entry = json.dumps(header[name], separators=(",", ":"))
    if name != "__metadata__" and rng.random() < 0.5:  # the duplicate points at another tensor's bytes
        other = header[rng.choice(tensors(header))]
        entry = json.dumps({**header[name], "data_offsets": other["data_offsets"]}, separators=(",", ":"))
    text = text[:-1] + f",{json.dumps(name)}:{entry}}}"
    return join(text, data), f"'{name}' twice in the header", None


def m_offsets(blob, rng):
    header, data = split(blob)
    name = rng.choice(tensors(header))
    start, end = header[name]["data_offsets"]
    how = rng.choice(["reversed", "past the end", "overlapping", "negative", "gap"])
    header[name]["data_offsets"] = {
        "reversed": [end, start], "past the end": [start, len(data) + 1024],
        "overlapping": [max(0, start - 4), end - 4], "negative": [-8, end], "gap": [start + 8, end + 8],
    }[how]
    return join(header, data), f"{name}: data offsets {how}", None


def m_tensor_set(blob, rng):
    header, data = split(blob)
    name = rng.choice(tensors(header))
    how = rng.choice(["dropped", "added", "renamed"])
    if how == "dropped":
        return repack(header, data, {name: None}), f"{name} dropped", None
    if how == "added":
        extra = name.rsplit(".", 1)[0] + ".extra.weight"
        return repack(header, data, {extra: {"dtype": "F32", "shape": [4, 4]}}), f"{extra} added", None
    renamed = name.replace(".", "_", 1)
    entry = header.pop(name)
    header[renamed] = entry
    return join(header, data), f"{name} renamed {renamed}", None


def _config_leaves(node, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _config_leaves(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _config_leaves(value, (*path, i))
    else:
        yield path


def m_metadata(blob, rng):
    header, data = split(blob)
    meta = dict(header.get("__metadata__", {}))
    how = rng.choice(["dropped", "config dropped", "config value", "config value", "config value",
                      "config not JSON", "format_version", "not strings", "format"])
    if how == "dropped":
        header.pop("__metadata__", None)
        return join(header, data), "metadata dropped", None
    if how == "not strings":
        header["__metadata__"] = {**meta, "format_version": 1}
        return join(header, data), "a metadata value that is not a string", None
    if how == "format":
        meta["format"] = rng.choice(["", "nested-attention-subject", "nested-attention", "pt"])
    elif how == "format_version":
        meta["format_version"] = rng.choice(["0", "2", "", "1.0", "99999999999"])
    elif how == "config dropped" or "config" not in meta:  # subjects and IP-Adapter files have no config
        meta.pop("config", None)
        if rng.random() < 0.5:
            meta.pop("images", None)
        else:
            meta["images"] = rng.choice(["x", "-3", "1e9"])
        how = f"config dropped, images {meta.get('images', 'dropped')}"
    elif how == "config not JSON":
        meta["config"] = meta["config"][: rng.randrange(len(meta["config"]))]
    else:
        config = json.loads(meta["config"])
        path = rng.choice(list(_config_leaves(config)))
        node = config
        for key in path[:-1]:
            node = node[key]
        value = rng.choice([0, -1, 10**9, 10**18, 2.5, "x", None, True, [], 1])
        node[path[-1]] = value
        meta["config"] = json.dumps(config)
        how = f"config {'.'.join(map(str, path))} = {value!r}"
    header["__metadata__"] = meta
    return join(header, data), how, None


def m_nan_inf(blob, rng):
    header, data = split(blob)
    floats = [n for n in tensors(header) if header[n]["dtype"] in NAN_BYTES and math.prod(header[n]["shape"])]
    name = rng.choice(floats)
    dtype = header[name]["dtype"]
    value = rng.choice(["NaN", "+Inf", "-Inf"])
    raw = NAN_BYTES[dtype] if value == "NaN" else INF_BYTES[dtype]
    if value == "-Inf":
        raw = raw[:-1] + bytes([raw[-1] | 0x80])
    start = header[name]["data_offsets"][0] + rng.randrange(math.prod(header[name]["shape"])) * len(raw)
    out = bytearray(data)
    out[start : start + len(raw)] = raw
    return join(header, bytes(out)), f"{name}: one {value}", name


def m_foreign(blob, rng):
    kind = rng.choice(sorted(FOREIGN))
    return FOREIGN[kind], f"not safetensors: {kind}", None


MUTATIONS = {
    "truncation": m_truncate, "random bytes": m_random_bytes, "bit flips": m_byte_flips,
    "header length": m_header_length, "dtype": m_dtype, "shape": m_shape, "0-size tensor": m_zero_size,
    "duplicated key": m_duplicate_key, "data offsets": m_offsets, "tensor set": m_tensor_set,
    "metadata": m_metadata, "NaN/Inf": m_nan_inf, "not safetensors": m_foreign,
}
SEEDS = ("encoder", "ip-adapter", "subject")


def case(seeds: dict[str, bytes], seed: int, index: int) -> tuple[str, str, bytes, str, str | None]:
    """(seed name, mutation, file bytes, detail, NaN/Inf tensor) of case `index`: a pure function of both."""
    rng = random.Random(f"{seed}-{index}")
    seed_name = SEEDS[index % len(SEEDS)]
    mutation = list(MUTATIONS)[(index // len(SEEDS)) % len(MUTATIONS)]
    blob, detail, nan_tensor = MUTATIONS[mutation](seeds[seed_name], rng)
    return seed_name, mutation, blob, detail, nan_tensor


# ------------------------------------------------------------------------------------------------
# The worker: builds the seeds on the tiny models, runs cases, one JSON line per case.


class Worker:
    def __init__(self, workdir: Path):
        import tiny_models  # isort: skip  (first: it sets ComfyUI up, then folder_paths can be imported)
        import folder_paths
        import torch
        from pack_helpers import TINY_CLIP_VISION_SPEC, encode_subject, pack_namespace, run_node, tiny_encoder
        from weight_layouts import TINY_IP_ADAPTER_NUMBERS, ip_adapter_plus_keys, plausible_values
        from weight_layouts import write_safetensors as write_layout

        from nested_attention import describe, formats, save_encoder, unet_layers
        from nested_attention_comfy.clip_vision import clip_vision_spec

        torch.set_num_threads(1)
        self.describe_main, self.run_node = describe.main, run_node
        self.pack = pack_namespace()
        self.errors = pack_errors(self.pack)
        self.encoders = workdir / "nested_attention"
        self.subjects = workdir / "input" / "nested_attention_subjects"
        self.encoders.mkdir(parents=True, exist_ok=True)
        self.subjects.mkdir(parents=True, exist_ok=True)
        folder_paths.folder_names_and_paths["nested_attention"] = ([str(self.encoders)], {".safetensors"})
        folder_paths.set_input_directory(str(workdir / "input"))
        unet = tiny_models.tiny_sdxl_unet(seed=0)
        self.clip_vision = tiny_models.tiny_clip_vision(seed=0)
        layers = tuple(unet_layers(unet.model.diffusion_model))
        # As the e2e test pack does: the tiny UNet and CLIP tower known to the IP-Adapter path.
        formats.KNOWN_UNET_LAYERS.setdefault(len(layers), layers)
        tower = clip_vision_spec(self.clip_vision)
        formats.KNOWN_CLIP_VISION.setdefault(tower.hidden_size, tower)
        assert tower.hidden_size == TINY_CLIP_VISION_SPEC["hidden_size"]
        seeds = {}
        save_encoder(str(self.encoders / "seed-encoder.safetensors"), tiny_encoder(unet, seed=3))
        widths = {TINY_IP_ADAPTER_NUMBERS[layer.key]: layer.dim for layer in layers}
        keys = ip_adapter_plus_keys(widths, dim=64, depth=1, inner=64, num_queries=4, clip_dim=64)
        write_layout(self.encoders / "seed-ip-adapter.safetensors",
                     [(name, shape, torch.float16) for name, shape in keys], plausible_values(0))
        (self.handle,) = run_node(self.pack, "NestedAttentionLoadEncoder", encoder_name="seed-encoder.safetensors",
                                  clip_vision=self.clip_vision)
        subject = encode_subject(self.pack, self.handle, seed=1)
        self.pack.subject.save_subject(str(self.subjects / "seed.safetensors"), subject)  # Save Nested Subject's
        for name, path in (("encoder", self.encoders / "seed-encoder.safetensors"),
                           ("ip-adapter", self.encoders / "seed-ip-adapter.safetensors"),
                           ("subject", self.subjects / "seed.safetensors")):
            seeds[name] = path.read_bytes()
            path.unlink()
        # Each seed loads as it is (describe reads encoders only): the mutations are what fails.
        for name, blob in seeds.items():
            result = self.run_case(name, blob, "seed", None)
            assert all(r["outcome"] == "loaded" for c, r in result.items() if c != "describe"), (name, result)
            assert result["describe"]["outcome"] == ("exit 1" if name == "subject" else "exit 0"), (name, result)
        self.seeds = seeds

    def consume(self, consumer: str, run) -> dict:
        began = time.perf_counter()
        try:
            outcome = run()
            message = ""
        except self.errors as e:
            outcome, message = type(e).__name__, str(e)
        except Exception as e:  # noqa: BLE001 (not the pack's own error: the finding)
            outcome, message = f"UNEXPECTED {type(e).__module__}.{type(e).__name__}", traceback.format_exc(limit=8)
        return {"outcome": outcome, "message": message[:4000], "s": time.perf_counter() - began}

    def run_case(self, seed_name: str, blob: bytes, mutation: str, nan_tensor: str | None) -> dict:
        folder = self.subjects if seed_name == "subject" else self.encoders
        path = folder / "case.safetensors"
        path.write_bytes(blob)
        results = {}
        try:
            def describe():
                with contextlib.redirect_stdout(io.StringIO()):
                    return f"exit {self.describe_main([str(path)])}"

            results["describe"] = self.consume("describe", describe)
            if seed_name == "subject":
                results["Load Nested Subject"] = self.consume("Load Nested Subject", lambda: self.run_node(
                    self.pack, "NestedAttentionLoadSubject", encoder=self.handle,
                    subject_file="nested_attention_subjects/case.safetensors") and "loaded")
            else:
                results["Load Nested Encoder"] = self.consume("Load Nested Encoder", lambda: self.run_node(
                    self.pack, "NestedAttentionLoadEncoder", encoder_name="case.safetensors",
                    clip_vision=self.clip_vision) and "loaded")
        finally:
            path.unlink(missing_ok=True)
        return results


def pack_errors(pack) -> tuple[type, ...]:
    """The pack's own error types a loader may raise (each a ValueError written for the user)."""
    from nested_attention.formats import NestedWeightsError
    from nested_attention_comfy.clip_vision import NestedEncoderLoadError

    return (NestedWeightsError, NestedEncoderLoadError, pack.subject.SubjectError)


def worker_main(workdir: Path, seed: int, start: int, stop: int, memory_mb: int) -> None:
    worker = Worker(workdir)
    if memory_mb:  # room for `memory_mb` more than the worker holds now; an allocation beyond fails
        with open("/proc/self/statm") as f:
            held = int(f.read().split()[0]) * resource.getpagesize()
        limit = held + memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    print(json.dumps({"ready": True, "rss_mb": rss_mb()}), flush=True)
    for index in range(start, stop):
        seed_name, mutation, blob, detail, nan_tensor = case(worker.seeds, seed, index)
        before = rss_mb()
        results = worker.run_case(seed_name, blob, mutation, nan_tensor)
        print(json.dumps({"index": index, "seed": seed_name, "mutation": mutation, "detail": detail,
                          "nan_tensor": nan_tensor, "results": results, "rss_mb": rss_mb(),
                          "rss_rise_mb": rss_mb() - before}), flush=True)


def rss_mb() -> float:
    """The process's peak resident memory so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------
# The parent: runs the worker, watches each case's time, restarts the worker after a hang or a crash.


@dataclass
class Report:
    files: int = 0
    by_mutation: Counter = field(default_factory=Counter)
    outcomes: dict = field(default_factory=dict)  # consumer -> Counter of outcome classes
    slowest: tuple = (0.0, "")  # (seconds, case)
    peak_rss_mb: float = 0.0
    largest_rise: tuple = (0.0, "")  # (MiB, case)
    failures: list = field(default_factory=list)
    loaded: Counter = field(default_factory=Counter)  # (consumer, mutation detail kind) of mutated files that loaded
    startup_s: float = 0.0
    seconds: float = 0.0


def check(record: dict) -> list[str]:
    """What is wrong with one case's results (empty: it passed)."""
    problems = []
    for consumer, result in record["results"].items():
        if result["outcome"].startswith("UNEXPECTED"):
            problems.append(f"{consumer}: {result['outcome']}\n{result['message']}")
    nan = record["nan_tensor"]
    if nan:
        loader = next(r for c, r in record["results"].items() if c != "describe")
        if loader["outcome"] == "loaded" or nan not in loader["message"]:
            problems.append(f"NaN/Inf in '{nan}' not refused by name: {loader['outcome']} {loader['message'][:300]}")
    return problems


def spawn(workdir: Path, seed: int, start: int, stop: int, memory_mb: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--workdir", str(workdir),
               "--seed", str(seed), "--start", str(start), "--stop", str(stop), "--memory-mb", str(memory_mb)]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_line(proc: subprocess.Popen, timeout: float) -> str | None:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else None


def fuzz(files: int, seed: int = 0, case_timeout: float = 30.0, memory_mb: int = 1024,
         workdir: Path | None = None) -> Report:
    report = Report()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="loader-fuzz-") as tmp:
        work = Path(workdir or tmp)
        index = 0
        while index < files:
            started = time.monotonic()
            proc = spawn(work, seed, index, files, memory_mb)
            line = read_line(proc, 600)
            if not line or not json.loads(line).get("ready"):
                proc.kill()
                raise RuntimeError(f"the fuzz worker did not start: {line!r}\n{proc.stderr.read()[-4000:]}")
            report.startup_s = max(report.startup_s, time.monotonic() - started)
            while index < files:
                case_began = time.monotonic()
                line = read_line(proc, case_timeout)
                if not line:  # over the time limit, or the worker died
                    dead = proc.poll() is not None
                    proc.kill()
                    proc.wait()
                    what = f"worker exited with code {proc.returncode}" if dead else f"over {case_timeout:.0f} s"
                    report.failures.append(f"case {index}: {what}\n{proc.stderr.read()[-2000:]}")
                    report.files += 1
                    index += 1
                    break
                record = json.loads(line)
                assert record["index"] == index
                name = f"case {index} ({record['seed']}, {record['mutation']}: {record['detail']})"
                report.files += 1
                report.by_mutation[record["mutation"]] += 1
                for consumer, result in record["results"].items():
                    outcome = result["outcome"]
                    report.outcomes.setdefault(consumer, Counter())[outcome] += 1
                    if outcome == "loaded":
                        report.loaded[f"{consumer}: {record['mutation']} ({record['detail']})"] += 1
                seconds = time.monotonic() - case_began
                report.slowest = max(report.slowest, (seconds, name))
                report.peak_rss_mb = max(report.peak_rss_mb, record["rss_mb"])
                report.largest_rise = max(report.largest_rise, (record["rss_rise_mb"], name))
                report.failures += [f"{name}: {p}" for p in check(record)]
                index += 1
            else:
                proc.stdout.close()
                proc.wait(timeout=60)
    report.seconds = time.monotonic() - began
    return report


def summary(report: Report) -> str:
    lines = [f"files: {report.files} ({', '.join(f'{k} {v}' for k, v in report.by_mutation.items())})"]
    for consumer, counts in sorted(report.outcomes.items()):
        lines.append(f"{consumer}: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    lines += [
        ("mutated files that still loaded (harmless changes: values, or a dtype the loader converts): "
         + ", ".join(f"{k} x{v}" for k, v in sorted(report.loaded.items()))),
        f"slowest case: {report.slowest[0]:.2f} s, {report.slowest[1]}",
        (f"worker peak RSS {report.peak_rss_mb:.0f} MiB (models and pack loaded); largest rise in one case "
        f"{report.largest_rise[0]:.1f} MiB, {report.largest_rise[1]}"),
        f"{report.seconds:.0f} s in all (worker start-up {report.startup_s:.0f} s)",
        "failures: " + ("none" if not report.failures else f"{len(report.failures)}\n  " + "\n  ".join(report.failures[:20])),
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/loader_fuzz.py", description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000, help="mutated files (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--case-timeout", type=float, default=30.0, help="seconds one case may take")
    parser.add_argument("--memory-mb", type=int, default=1024,
                        help="address space the worker may add to what it holds after start-up (0: no limit)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--stop", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        sys.path.insert(0, str(TESTS))
        worker_main(args.workdir, args.seed, args.start, args.stop, args.memory_mb)
        return 0
    report = fuzz(args.files, args.seed, args.case_timeout, args.memory_mb)
    print(summary(report))
    return 1 if report.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
