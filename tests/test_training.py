"""The trainer (`python -m training.run`) on tiny models on the CPU: the CLI, checkpoints, resume, export.

Runs share one uninterrupted reference run (module fixture). Step counts are small: on two CPU
cores a tiny step (batch 2, 64 px) takes one to a few seconds.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tiny_models  # ComfyUI set-up first; also the accelerate launcher
import torch
from pack_helpers import run_node
from safetensors.torch import load_file
from trainer_runs import run_trainer, tiny_argv, train

from nested_attention import load_encoder, read_config
from nested_attention.images import from_pil
from nested_attention.weights import weights_fingerprint
from training.data import dataset as data_lib
from training.data.captions import CaptionRule
from training.data.shards import TarShardStream
from training.loop import config as train_config
from training.loop.loss import LossConfig, training_loss
from training.models import sdxl as models_lib
from training.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]
# The reference run's options, shared by the runs compared with it: accumulation, EMA, min-SNR, noise offset.
OPTIONS = [
    "--gradient_accumulation_steps",
    "2",
    "--use_ema",
    "--ema_decay",
    "0.9",
    "--snr_gamma",
    "5",
    "--noise_offset",
    "0.05",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these tiny steps are many small ops, which two threads on two busy cores slow down
    several-fold (each op waits for the descheduled thread). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logged_losses(output_dir: Path) -> dict[int, float]:
    lines = (output_dir / "logs" / "losses.jsonl").read_text().splitlines()
    return {entry["step"]: entry["loss"] for entry in map(json.loads, lines)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from training.tiny.models import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("tiny-data") / "pets", count=8, size=64)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir) -> dict:
    """Four uninterrupted steps (OPTIONS), a checkpoint every two steps, a sample grid at the end."""
    out = tmp_path_factory.mktemp("reference")
    summary = train(
        out,
        "--train_data",
        str(data_dir),
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "2",
        *OPTIONS,
        "--validation_steps",
        "4",
        "--report_to",
        "tensorboard",
    )
    return {**summary, "dir": out}


# ------------------------------------------------------------------------------------------------
# Flags


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--text_dropout", "0.6", "--subject_dropout", "0.6"], "must not exceed 1"),
        (["--subject_dropout", "1.5"], "probability in [0, 1]"),
        (["--cache_latents", "--random_flip"], "cannot be combined with --random_flip"),
        (["--resolution", "100"], "multiple of 64"),
        (["--checkpoints_total_limit", "-1"], "--checkpoints_total_limit must be 0 (keep all) or a positive"),
        (["--pretrained_model", "sdxl.safetensors"], "cannot be used with --domain tiny"),
        (["--resume_from_checkpoint", "/nonexistent/checkpoint-3"], "no such folder"),
        (["--snr_gamma", "0"], "--snr_gamma must be positive"),
        (["--caption_template", "a photo"], "must contain {token}"),
        (["--use_ema", "--ema_decay", "1.5"], "--ema_decay must be between 0 and 1"),
        (["--max_train_steps", "0"], "--max_train_steps must be at least 1"),
    ],
)
def test_bad_flag_combinations_are_rejected_with_clear_messages(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train_config.parse_args(["--domain", "tiny", *flags])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cache_latents_refuses_tar_shards(tmp_path, capsys):
    (tmp_path / "000.tar").write_bytes(b"")
    with pytest.raises(SystemExit):
        train_config.parse_args(
            ["--domain", "tiny", "--cache_latents", "--no-random_flip", "--train_data", str(tmp_path)]
        )
    assert "cannot be used with tar shards" in capsys.readouterr().err


def test_presets_fill_unset_flags_and_flags_win():
    args = train_config.parse_args(["--domain", "faces", "--resolution", "1024"])
    assert (args.token, args.num_tokens, args.resolution, args.output_dir) == (
        "person",
        1024,
        1024,
        os.path.join("output", "faces"),
    )
    args = train_config.parse_args(["--domain", "pets"])
    assert (args.token, args.num_tokens, args.resolution) == ("pet", 256, 512)
    assert PRESETS["pets"].resolutions == PRESETS["faces"].resolutions == (512, 1024)


def test_run_with_only_the_domain_says_what_is_missing_and_where(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    models = tmp_path / "models"
    with pytest.raises(SystemExit) as e:
        run_trainer(["--domain", "pets", "--models_dir", str(models)])
    message = str(e.value)
    assert "sd_xl_base_1.0.safetensors" in message and str(models / "checkpoints") in message
    assert "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors" in message and str(models / "clip_vision") in message
    assert str(tmp_path / "data" / "pets") in message
    assert "--pretrained_model" in message and "--clip_vision" in message and "--train_data" in message


# ------------------------------------------------------------------------------------------------
# Data


def test_captions_get_the_domain_token():
    rule = CaptionRule(token="pet", subject_words=("dog", "cat"), template="a photo of a {token}")
    assert rule.apply("A Dog on the beach") == "A pet on the beach"
    assert rule.apply("a cat and a dog") == "a pet and a dog"  # the first subject word only
    assert rule.apply("a hotdog stand") == "a photo of a pet, a hotdog stand"  # whole words only
    assert rule.apply(None) == "a photo of a pet"
    assert rule.apply("my corgi Rex at home", subject="corgi") == "my pet Rex at home"
    assert rule.apply("a pet in the snow") == "a pet in the snow"


def test_target_crop_records_sdxl_time_ids():
    from PIL import Image

    image = Image.new("RGB", (200, 100), (255, 0, 0))
    pixels, time_ids = data_lib.prepare_target(image, 64, center_crop=True, flip=False, rng=None)
    assert pixels.shape == (64, 64, 3)
    # original (h, w), crop top-left (top, left) in the resized 128 x 64 image, target (h, w)
    assert time_ids.tolist() == [100, 200, 0, 32, 64, 64]


def test_unreadable_image_is_skipped_with_a_logged_warning(tmp_path, caplog):
    from PIL import Image

    Image.new("RGB", (64, 64), (0, 0, 255)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    records = data_lib.read_folder(tmp_path)
    rule = CaptionRule("pet", ("pet",), "a photo of a {token}")
    dataset = data_lib.RecordDataset(records, data_lib.SampleConfig(64, 32, True, False, rule, 0))
    with caplog.at_level(logging.WARNING):
        samples = [dataset[(i, i)] for i in range(len(dataset))]
    assert [s is None for s in samples] == [True, False]  # sorted: broken.png, good.png
    assert "broken.png" in caplog.text and "unreadable image" in caplog.text
    batch = data_lib.collate(samples)
    assert batch["pixels"].shape == (1, 64, 64, 3) and batch["key"] == ["good.png"]
    assert data_lib.collate([None, None]) is None


def test_manifest_lines_resolve_paths_and_bad_lines_are_skipped(tmp_path, caplog):
    (tmp_path / "manifest.jsonl").write_text(
        '{"input": "a.png", "target": "b.png", "caption": "a man", "subject": "man"}\n'
        "not json\n"
        '{"target": "c.png"}\n'
        '{"input": "d.png"}\n'
    )
    with caplog.at_level(logging.WARNING):
        kind, source = data_lib.describe_source(str(tmp_path))
        records = data_lib.read_manifest(source)
    assert kind == "manifest"
    assert [(Path(r.input).name, r.target and Path(r.target).name, r.caption) for r in records] == [
        ("a.png", "b.png", "a man"),
        ("d.png", None, None),
    ]
    assert caplog.text.count("skipped") == 2


def test_step_batch_sampler_is_a_pure_function_of_the_batch_index():
    full = data_lib.StepBatchSampler(10, 3, seed=5, rank=1, world=2)
    resumed = data_lib.StepBatchSampler(10, 3, seed=5, rank=1, world=2, start=4)
    first = [b for _, b in zip(range(8), iter(full))]
    assert [b for _, b in zip(range(4), iter(resumed))] == first[4:]
    other_rank = data_lib.StepBatchSampler(10, 3, seed=5, rank=0, world=2)
    indices = [i for b in first[:1] for i, _ in b] + [i for i, _ in other_rank.batch(0)]
    assert len(set(indices)) == 6  # the two ranks' first batches are disjoint parts of one permutation


def make_shards(folder: Path, shards: int, per_shard: int) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        path = folder / f"{s:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"s{s}-{i}"
                buffer = io.BytesIO()
                Image.new("RGB", (48, 40), (40 * s, 20 * i, 100)).save(buffer, format="PNG")
                image = b"garbage" if (s, i) == (1, 1) else buffer.getvalue()
                for name, payload in (
                    (f"{key}.png", image),
                    (f"{key}.txt", f"a dog number {s} {i}".encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(str(path))
    return paths


def take(stream, n):
    out = []
    for item in stream:
        out.append(None if item is None else item["key"])
        if len(out) == n:
            return out


def test_tar_shards_stream_split_between_ranks_skip_bad_images_and_resume(tmp_path, caplog):
    shards = make_shards(tmp_path, shards=4, per_shard=3)
    rule = CaptionRule("pet", ("dog",), "a photo of a {token}")
    config = data_lib.SampleConfig(32, 32, False, True, rule, seed=1)
    with caplog.at_level(logging.WARNING):
        rank0 = take(TarShardStream(shards, config, batch_size=2, rank=0, world=2), 12)
        rank1 = take(TarShardStream(shards, config, batch_size=2, rank=1, world=2), 12)
    assert "s1-1" in caplog.text and "unreadable image" in caplog.text
    first_pass = [k for k in rank0[:6] + rank1[:6] if k is not None]
    assert (
        len(first_pass) == len(set(first_pass)) == 11
    )  # 12 samples, one unreadable; the ranks never overlap
    resumed = take(TarShardStream(shards, config, batch_size=2, rank=0, world=2, start_batch=2), 8)
    assert resumed == rank0[4:12]
    sample = next(s for s in TarShardStream(shards, config, batch_size=2) if s is not None)
    assert sample["caption"].startswith("a pet number")
    assert sample["pixels"].shape == (32, 32, 3) and sample["time_ids"][:2].tolist() == [40.0, 48.0]


# ------------------------------------------------------------------------------------------------
# The forward


@pytest.fixture(scope="module")
def frozen():
    return models_lib.load_frozen(tiny=True, checkpoint=None, clip_vision_path=None, weight_dtype=None)


def tiny_module(frozen, seed=0):
    encoder = models_lib.make_encoder(
        domain="tiny",
        token="pet",
        qformer=PRESETS["tiny"].qformer,
        frozen=frozen,
        alpha=2.0,
        init_from_unet=True,
        seed=seed,
    )
    return models_lib.NestedTrainingModule(encoder, frozen.base)


def tiny_inputs(frozen, captions, seed=0):
    text = models_lib.TextEncoder(frozen.clip, "pet")
    generator = torch.Generator().manual_seed(seed)
    n = len(captions)
    context, pooled, positions = text.encode(captions)
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * n, dtype=torch.float32)
    adm = models_lib.sdxl_adm(frozen.base, pooled, time_ids)
    sigmas = frozen.base.model_sampling.sigmas[torch.tensor([100, 500, 800, 999][:n])].float()
    x = torch.randn(n, 4, 8, 8, generator=generator) * sigmas.view(-1, 1, 1, 1)
    clip_tokens = torch.randn(n, 17, 64, generator=generator)
    return clip_tokens, x, sigmas, context, adm, positions


def test_subject_positions_follow_the_nodes_rule(frozen):
    from nested_attention_comfy import words as tokens  # what the nodes call
    text = models_lib.TextEncoder(frozen.clip, "pet")
    prompts = [
        "a photo of a pet",
        "Pet",
        "a carpet and a (pet:1.2), pet.",
        "a petal",
        "pets and a pet-friendly pet",
    ]
    _, _, positions = text.encode(prompts)
    assert (
        positions[0] == (5,) and positions[1] == (1,) and len(positions[2]) == 2
    )  # "<start> a photo of a pet"
    for prompt, found in zip(prompts, positions):
        try:
            nodes_found = tokens.locate_word(
                frozen.clip, frozen.clip.tokenize(prompt, return_word_ids=True), "pet", prompt
            ).positions
        except (
            tokens.SubjectWordError
        ):  # the nodes refuse a prompt without the word; the trainer drops the subject
            nodes_found = ()
        assert found == nodes_found, prompt
    assert text.encode(["a dog"])[2] == [()]


def test_aligning_subject_positions_equals_one_binding_per_row(frozen):
    """One binding at shared positions (context permuted) gives what per-row bindings give."""
    module = tiny_module(frozen)
    captions = ["a photo of a pet", "a pet on the beach", "a photo of a pet", "pet"]
    clip_tokens, x, sigmas, context, adm, positions = tiny_inputs(frozen, captions)
    keep = torch.tensor([True, True, False, True])
    aligned_context, groups = models_lib.align_subjects(context, positions, keep)
    assert len(groups) == 1 and groups[0][1].tolist() == [True, True, False, True]
    with torch.no_grad():
        aligned = module(clip_tokens, x, sigmas, aligned_context, adm, groups)
        per_row = [((positions[i]), torch.arange(4) == i) for i in range(4) if keep[i]]
        reference = module(clip_tokens, x, sigmas, context, adm, per_row)
        plain = frozen.base.apply_model(x, sigmas, c_crossattn=context, y=adm)
    torch.testing.assert_close(aligned, reference, rtol=1e-4, atol=1e-4)
    eps_plain = (x - plain) / sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(aligned[2], eps_plain[2], rtol=1e-4, atol=1e-4)  # subject dropped: no change
    assert (aligned[0] - eps_plain[0]).abs().max() > 1e-4  # the subject changes the prediction


def test_gradient_checkpointing_gives_the_same_gradients(frozen):
    captions = ["a photo of a pet", "a pet on the beach"]
    clip_tokens, x, sigmas, context, adm, positions = tiny_inputs(frozen, captions)
    context, groups = models_lib.align_subjects(context, positions, torch.tensor([True, True]))
    grads = []
    for checkpointing in (False, True):
        tiny = dataclasses.replace(frozen, unet=tiny_models.tiny_sdxl_unet(seed=0))  # a UNet of its own
        tiny.base.requires_grad_(False)
        if checkpointing:
            assert models_lib.enable_gradient_checkpointing(tiny.base.diffusion_model) > 0
        module = tiny_module(tiny)
        module(clip_tokens, x, sigmas, context, adm, groups).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in module.encoder.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-7, msg=name)
    assert any(g.abs().max() > 0 for g in grads[0].values())


# ------------------------------------------------------------------------------------------------
# Runs


def test_a_few_steps_write_checkpoints_the_node_file_logs_and_a_sample_grid(reference):
    out = reference["dir"]
    assert reference["global_step"] == 4
    for step in (2, 4):
        folder = out / f"checkpoint-{step}"
        names = {p.name for p in folder.iterdir()}
        assert {
            "model.safetensors",
            "optimizer.bin",
            "scheduler.bin",
            "random_states_0.pkl",
            "custom_checkpoint_0.pkl",
            "tiny-encoder.safetensors",
            "trainer_state-0.json",
        } <= names, names
        assert read_config(str(folder / "tiny-encoder.safetensors")).domain == "tiny"
    final = load_encoder(str(out / "tiny-encoder.safetensors"))
    assert final.config.token == "pet" and final.config.num_tokens == 16
    assert len(final.config.layers) == 17  # the tiny UNet's table, not SDXL's 70
    # The export at the last checkpoint is the final encoder.
    last = load_file(str(out / "checkpoint-4" / "tiny-encoder.safetensors"))
    for name, tensor in final.state_dict().items():
        torch.testing.assert_close(last[name], tensor, rtol=0, atol=0)
    assert sorted(logged_losses(out)) == [1, 2, 3, 4]
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    from PIL import Image

    from training.loop.preview import labelled_grid

    grid = Image.open(out / "samples-4.png")
    # rows: no subject + two subjects; columns: input + two prompts x one seed; 64 px cells, labelled
    cells = [[torch.zeros(64, 64, 3).numpy()] * 3] * 3
    labels = ["a photo of a pet | seed 0", "a pet in the snow | seed 0"]
    layout, boxes = labelled_grid(cells, ["no subject", "subject 1", "subject 2"], ["subject image", *labels])
    assert grid.size == layout.size
    left, top, right, bottom = boxes[0][0]
    assert (np.asarray(grid.convert("RGB"))[top:bottom, left:right] == 255).all()  # no subject: blank cell


def test_resume_reproduces_the_uninterrupted_losses_and_keeps_the_checkpoint_limit(
    tmp_path, reference, data_dir
):
    common = ["--train_data", str(data_dir), "--checkpointing_steps", "2", *OPTIONS]
    train(tmp_path, *common, "--max_train_steps", "2")
    assert (tmp_path / "checkpoint-2").is_dir()
    resumed = train(
        tmp_path,
        *common,
        "--max_train_steps",
        "4",
        "--resume_from_checkpoint",
        "latest",
        "--checkpoints_total_limit",
        "1",
    )
    assert sorted(resumed["losses"]) == [3, 4]
    expected = logged_losses(reference["dir"])
    for step in (3, 4):
        assert resumed["losses"][step] == pytest.approx(expected[step], abs=1e-6), step
    assert logged_losses(tmp_path) == pytest.approx(expected, abs=1e-6)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4"]  # limit 1
    a = load_file(str(tmp_path / "tiny-encoder.safetensors"))
    b = load_file(str(reference["dir"] / "tiny-encoder.safetensors"))
    for name in b:  # the exported (EMA) weights: the EMA state was restored too
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_latent_cache_gives_the_losses_of_encoding_on_the_fly(tmp_path, reference, data_dir):
    summary = train(
        tmp_path,
        "--train_data",
        str(data_dir),
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "2",
        *OPTIONS,
        "--cache_latents",
        "--no-random_flip",
    )
    caches = list((tmp_path / "cache").glob("*/cache-0000.safetensors"))
    assert len(caches) == 1 and (caches[0].parent / "complete.json").is_file()
    expected = logged_losses(reference["dir"])
    for step in (1, 2):
        assert summary["losses"][step] == pytest.approx(expected[step], rel=1e-4), step


def test_overfitting_a_handful_of_examples_lowers_the_loss_clearly(frozen, data_dir):
    """The trainer's loss on four fixed examples (fixed noise and timesteps): 15 AdamW steps, below 0.8 x."""
    records = data_lib.read_folder(data_dir)[:4]
    rule = CaptionRule("pet", ("pet",), "a photo of a {token}")
    config = data_lib.SampleConfig(64, 32, True, False, rule, 0)
    batch = data_lib.collate([data_lib.load_sample(r, config, i) for i, r in enumerate(records)])
    module = tiny_module(frozen)
    text = models_lib.TextEncoder(frozen.clip, "pet", cache=True)
    config = LossConfig(
        seed=0,
        text_dropout=0.0,
        subject_dropout=0.0,
        both_dropout=0.0,
        token="pet",
        noise_offset=0.0,
        snr_gamma=None,
    )
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):  # about 0.73 x after 15 steps, 0.71 x after 20 (measured)
        loss = training_loss(module, frozen, text, batch, config, rank=0, batch_index=0, device="cpu")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_exported_file_loads_in_the_nodes_and_changes_the_sampled_image(
    pack, reference, tiny_clip, tiny_clip_vision
):
    encoder = load_encoder(reference["encoder_path"])
    handle = pack.loader.make_handle(encoder, tiny_clip_vision, "tiny-encoder.safetensors")
    image = from_pil(
        data_lib.open_image(str(min(Path(reference["dir"]).glob("*.png"))))
    )[None]
    subject, _ = run_node(pack, "NestedAttentionEncodeSubject", encoder=handle, image=image, crop="center")
    unet = tiny_models.tiny_sdxl_unet(seed=0)  # the trainer's frozen UNet (same builder, same seed)
    prompt = "a photo of a pet"
    patched, positive = run_node(pack, "NestedAttentionApply", model=unet, clip=tiny_clip, subject=subject,
                                 text=prompt, token="")
    negative = tiny_models.encode_text(tiny_clip, "")
    with_subject = tiny_models.sample(patched, positive, negative, seed=0, size=8)
    without = tiny_models.sample(unet, tiny_models.encode_text(tiny_clip, prompt), negative, seed=0, size=8)
    assert torch.isfinite(with_subject).all()
    assert (with_subject - without).abs().max() > 1e-3


def test_init_encoder_starts_a_new_run_from_an_exported_file(tmp_path, reference, data_dir):
    """Phase two starts from phase one's export: the run's initial weights are the file's."""
    train(
        tmp_path,
        "--train_data",
        str(data_dir),
        "--max_train_steps",
        "1",
        "--checkpointing_steps",
        "1",
        "--init_encoder",
        reference["encoder_path"],
    )
    state = json.loads((tmp_path / "checkpoint-1" / "trainer_state-0.json").read_text())
    assert state["initial_weights_sha256"] == weights_fingerprint(
        load_encoder(reference["encoder_path"])
    )
    assert state["weights_sha256"] != state["initial_weights_sha256"]


def test_tar_shards_train_end_to_end(tmp_path):
    shards = make_shards(tmp_path / "shards", shards=2, per_shard=3)
    summary = train(
        tmp_path / "out",
        "--train_data",
        str(Path(shards[0]).parent),
        "--max_train_steps",
        "1",
        "--checkpointing_steps",
        "1",
        "--validation_steps",
        "1",
    )
    assert summary["global_step"] == 1 and (tmp_path / "out" / "tiny-encoder.safetensors").is_file()
    # the sample grid's subjects are the first two samples of the stream: two subject rows, as from a folder
    from PIL import Image

    from training.loop.preview import labelled_grid

    labels = ["subject image", "a photo of a pet | seed 0", "a pet in the snow | seed 0"]
    rows = ["no subject", "subject 1", "subject 2"]
    layout, _ = labelled_grid([[np.zeros((64, 64, 3))] * 3] * 3, rows, labels)
    assert Image.open(tmp_path / "out" / "samples-1.png").size == layout.size


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_end_a_step_with_identical_weights(tmp_path, data_dir):
    result = tiny_models.accelerate_launch(
        "training.run",
        tiny_argv(tmp_path, "--train_data", str(data_dir), "--max_train_steps", "1", "--checkpointing_steps", "1"),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    states = [json.loads((tmp_path / "checkpoint-1" / f"trainer_state-{r}.json").read_text()) for r in (0, 1)]
    assert states[0]["world"] == states[1]["world"] == 2
    assert states[0]["weights_sha256"] == states[1]["weights_sha256"]
    assert states[0]["initial_weights_sha256"] != states[0]["weights_sha256"]  # the step changed the weights
    assert states[0]["batch_keys"] != states[1]["batch_keys"]  # each rank saw its own part of the data
