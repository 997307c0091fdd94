"""The evaluation (`python -m training.evaluate`, training/evaluation/) on the tiny test bed, on the CPU.

Metrics against hand-computed values, the baselines as really different code paths (prior = the
unpatched sampler bit for bit; decoupled at scale 0 = the same; decoupled = IP-Adapter's formula
written out here), the output files written and re-read, resume, the split over processes, and the
trainer's --eval_steps hook.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tiny_models  # ComfyUI set-up first; also the accelerate launcher
import torch
from PIL import Image
from trainer_runs import reset_after_run, train

from nested_attention.images import to_uint8
from nested_attention.patch import SubjectBinding
from nested_attention_comfy.attention import comfy_attention
from training.evaluation import cli as evaluate_cli
from training.evaluation import config as evaluate_config
from training.evaluation import metrics, report
from training.evaluation import prompts as prompts_lib
from training.evaluation.method_images import (
    DecoupledAttentionPatch,
    Generator,
    Job,
    Method,
    SampleSettings,
    Subject,
    make_jobs,
    methods,
    shard,
)
from training.loop import config as train_config
from training.models import sdxl as models_lib
from training.tiny import scorers as tiny_scorers

REPO = Path(__file__).resolve().parents[1]
SETTINGS = SampleSettings(steps=2, cfg=5.0, resolution=64)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def frozen():
    return models_lib.load_frozen(
        tiny=True, checkpoint=None, clip_vision_path=None, weight_dtype=None, seed=0
    )


@pytest.fixture(scope="module")
def encoder(frozen):
    from training.presets import PRESETS

    preset = PRESETS["tiny"]
    return (
        models_lib.make_encoder(
            domain="tiny",
            token="pet",
            qformer=preset.qformer,
            frozen=frozen,
            alpha=2.0,
            init_from_unet=True,
            seed=0,
        )
        .eval()
        .requires_grad_(False)
    )


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    from nested_attention.images import from_pil
    from training.data.dataset import open_image
    from training.tiny.models import make_tiny_dataset

    folder = make_tiny_dataset(tmp_path_factory.mktemp("subjects"), count=2, size=64, seed=1)
    return [
        Subject(name=p.stem, source=str(p), image=from_pil(open_image(str(p))))
        for p in sorted(folder.glob("*.png"))
    ]


@pytest.fixture
def generator(frozen, encoder, subjects):
    text = models_lib.TextEncoder(frozen.clip, "pet")
    return Generator(
        frozen=frozen,
        encoder=encoder,
        text=text,
        subjects=subjects,
        prompts=list(prompts_lib.TINY_PROMPTS),
        token="pet",
        settings=SETTINGS,
        host=comfy_attention,
    )


def unpatched_image(frozen, prompt: str, seed: int) -> torch.Tensor:
    """ComfyUI's sampler on the unpatched UNet, as the test bed runs it (tests/tiny_models.py)."""
    positive = tiny_models.encode_text(frozen.clip, prompt)
    negative = tiny_models.encode_text(frozen.clip, "")
    latent = tiny_models.sample(
        frozen.unet,
        positive,
        negative,
        seed,
        steps=SETTINGS.steps,
        size=SETTINGS.resolution // 8,
        cfg=SETTINGS.cfg,
    )
    return frozen.vae.decode(latent)[0].float().cpu().clamp(0, 1)


# ------------------------------------------------------------------------------------------------
# Metrics against hand-computed values


def test_cosine_matches_hand_computed_values():
    a = torch.tensor([[1.0, 0.0], [1.0, 2.0], [3.0, 4.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, 4.0], [4.0, 3.0], [-2.0, 0.0]])
    assert metrics.cosine(a, b).tolist() == pytest.approx([0.0, 1.0, 24 / 25, -1.0], abs=1e-12)


def test_identical_images_score_one_and_known_embeddings_score_their_cosine(frozen, subjects):
    image = subjects[0].image
    scorers = metrics.Scorers(
        clip_i=metrics.ClipImageSpace(clip_vision=frozen.clip_vision, name="tiny"),
        identity=tiny_scorers.TinyIdentity(),
    )
    ref = scorers.reference(image, "subject 0")
    same = scorers.subject_scores(image, ref)
    assert same["clip_i[tiny]"] == pytest.approx(1.0, abs=1e-6)
    assert same["identity[tiny-face]"] == pytest.approx(1.0, abs=1e-12)
    assert same["face_found"] is True
    # Another image: CLIP-I is the cosine of the two image_embeds, computed here by hand.
    other = subjects[1].image
    e0 = frozen.clip_vision.encode_image(image[None], crop=True)["image_embeds"][0].double()
    e1 = frozen.clip_vision.encode_image(other[None], crop=True)["image_embeds"][0].double()
    expected = float(e0 @ e1 / (e0.norm() * e1.norm()))
    assert scorers.subject_scores(other, ref)["clip_i[tiny]"] == pytest.approx(expected, abs=1e-6)
    assert expected < 0.999


def test_tiny_identity_embeds_the_detected_box_so_a_moved_subject_keeps_its_identity():
    canvas = torch.ones(64, 64, 3)
    a, b = canvas.clone(), canvas.clone()
    a[10:30, 12:36] = torch.tensor([0.9, 0.1, 0.1])
    b[30:50, 30:54] = torch.tensor([0.9, 0.1, 0.1])  # the same "face", elsewhere
    model = tiny_scorers.TinyIdentity()
    assert model.detector.detect(to_uint8(a)) == [metrics.FaceBox(12, 10, 36, 30)]
    assert float(metrics.cosine(model.embed(a), model.embed(b))) == pytest.approx(1.0, abs=1e-12)


def test_an_image_without_a_face_is_a_reported_failure_not_dropped(frozen, subjects):
    scorers = metrics.Scorers(identity=tiny_scorers.TinyIdentity())
    ref = scorers.reference(subjects[0].image, "subject 0")
    blank = torch.ones(64, 64, 3)
    scores = scorers.subject_scores(blank, ref)
    assert scores == {"face_found": False, "identity[tiny-face]": None}
    rows = [
        dict(method="nested", parameter="lambda", value=1.0, image="a.png", **scores),
        dict(
            method="nested",
            parameter="lambda",
            value=1.0,
            image="b.png",
            face_found=True,
            **{"identity[tiny-face]": 0.5},
        ),
    ]
    (entry,) = report.summarize(rows, ["identity[tiny-face]"])
    assert entry["rows"] == 2 and entry["face_failures"] == 1 and entry["face_failure_rate"] == 0.5
    assert (
        entry["identity[tiny-face]"] == 0.5
    )  # the mean over detected faces, with the failure counted beside it
    with pytest.raises(metrics.MetricSetupError, match="no face found in the subject image blank.png"):
        scorers.reference(blank, "blank.png")


def test_clip_t_is_the_cosine_of_the_image_and_the_prompt_without_the_subject_word(frozen, subjects):
    from training.tiny.models import tiny_clip_vision

    vision = tiny_clip_vision(seed=1, projection_dim=1280)
    space = metrics.ComfyClipSpace(clip=frozen.clip, clip_vision=vision, name="joint")
    scorers = metrics.Scorers(clip_t=[space])
    prompt = prompts_lib.EvalPrompt("a photo of a {token} wearing a red hoodie")
    text = prompt.without_subject()
    assert text == "a photo of wearing a red hoodie"
    image = subjects[0].image
    _, pooled = frozen.clip.encode_from_tokens(frozen.clip.tokenize(text), return_pooled=True)
    embeds = vision.encode_image(image[None], crop=True)["image_embeds"]
    t, i = pooled[0].detach().double(), embeds[0].detach().double()
    expected = float(t @ i / (t.norm() * i.norm()))
    assert scorers.prompt_scores(image, text) == {"clip_t[joint]": pytest.approx(expected, abs=1e-6)}
    # A text tower and an image tower of different widths are not a joint space: refused, naming the fix.
    wrong = metrics.Scorers(
        clip_t=[metrics.ComfyClipSpace(clip=frozen.clip, clip_vision=frozen.clip_vision, name="mismatched")]
    )
    with pytest.raises(metrics.MetricSetupError, match="not one joint space.*ViT-bigG"):
        wrong.prompt_scores(image, text)


def test_prompts_lose_their_subject_word_for_clip_t_and_load_from_a_file(tmp_path):
    assert prompts_lib.EvalPrompt("an oil painting of a {token}").without_subject() == "an oil painting of"
    assert prompts_lib.EvalPrompt("a {token}, smiling, in Paris").without_subject() == "smiling, in Paris"
    assert all("{token}" in p.template for p in prompts_lib.DEFAULT_PROMPTS)
    assert {p.category for p in prompts_lib.DEFAULT_PROMPTS} == {"clothing", "expression", "scene", "style"}
    file = tmp_path / "prompts.txt"
    file.write_text("# comment\n\nscene: a {token} on the moon\na Person in a red coat\n")
    loaded = prompts_lib.load_prompts(file, "person")
    assert loaded == [
        prompts_lib.EvalPrompt("a {token} on the moon", "scene"),
        prompts_lib.EvalPrompt("a {token} in a red coat", "custom"),
    ]
    file.write_text("a {token} on the moon\na dog in the snow\n")
    with pytest.raises(prompts_lib.PromptFileError, match="line 2.*neither"):
        prompts_lib.load_prompts(file, "person")


def test_open_clip_space_loads_a_local_safetensors_checkpoint_and_refuses_hub_names(tmp_path):
    import open_clip  # the `train` extra
    from safetensors.torch import save_file

    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    }
    (tmp_path / "nested-eval-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "nested-eval-tiny-clip.json")
    torch.manual_seed(0)
    original = open_clip.create_model("nested-eval-tiny-clip").eval()
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(weights))
    space = metrics.OpenClipSpace(model_name="nested-eval-tiny-clip", checkpoint=str(weights))
    tokenizer = open_clip.get_tokenizer("nested-eval-tiny-clip")
    with torch.no_grad():
        expected = original.encode_text(tokenizer(["a red hoodie"])).float()
    assert torch.equal(space.embed_texts(["a red hoodie"]), expected)  # the file's weights, not a fresh init
    assert space.embed_images(torch.rand(2, 40, 48, 3)).shape == (2, 32)
    with pytest.raises(metrics.MetricSetupError, match="built-in model names"):
        metrics.OpenClipSpace(
            model_name="hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K", checkpoint=str(weights)
        )
    with pytest.raises(metrics.MetricSetupError, match="expected an existing .safetensors file"):
        metrics.OpenClipSpace(model_name="nested-eval-tiny-clip", checkpoint=str(tmp_path / "weights.bin"))


def test_dlib_identity_reports_no_face_on_an_image_without_one():
    model = metrics.DlibIdentity()  # dlib-bin and face-recognition-models: the `faces` extra
    assert model.embed(torch.full((96, 96, 3), 0.5)) is None


def test_dlib_identity_of_a_real_face_matches_itself_and_its_mirror_image():
    from skimage import data as skimage_data  # the astronaut: NASA photo of Eileen Collins, public domain

    photo = torch.from_numpy(skimage_data.astronaut()).float() / 255.0  # (512, 512, 3)
    model = metrics.DlibIdentity()
    a, b = model.embed(photo), model.embed(photo.flip(1))
    assert a is not None and b is not None
    same = float(torch.nn.functional.cosine_similarity(a.flatten(), model.embed(photo).flatten(), dim=0))
    mirrored = float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
    assert same == pytest.approx(1.0, abs=1e-6)
    assert mirrored > 0.9  # one person: dlib's own same-person threshold is a distance of 0.6 (cosine ~0.8)


# ------------------------------------------------------------------------------------------------
# The baselines are different code paths


def test_prior_baseline_is_the_unpatched_sampler_bit_for_bit(frozen, generator):
    for prompt in range(len(generator.prompts)):
        job = Job(Method("prior"), None, prompt, seed=3)
        assert generator.model(job) is frozen.unet
        expected = unpatched_image(frozen, generator.prompts[prompt].render("pet"), seed=3)
        assert torch.equal(generator.generate(job), expected)


def test_decoupled_at_scale_zero_is_the_unpatched_sampler_and_runs_its_patch(frozen, generator, monkeypatch):
    calls = []
    original = DecoupledAttentionPatch.__call__

    def counting(self, q, k, v, extra_options):
        calls.append(self.scale)
        return original(self, q, k, v, extra_options)

    monkeypatch.setattr(DecoupledAttentionPatch, "__call__", counting)
    expected = unpatched_image(frozen, generator.prompts[0].render("pet"), seed=1)
    zero = generator.generate(Job(Method("decoupled", 0.0), 0, 0, seed=1))
    assert calls and set(calls) == {0.0}  # every layer went through the patch
    assert torch.equal(zero, expected)
    one = generator.generate(Job(Method("decoupled", 1.0), 0, 0, seed=1))
    nested = generator.generate(Job(Method("nested", 1.0), 0, 0, seed=1))
    assert (
        not torch.equal(one, expected) and not torch.equal(nested, expected) and not torch.equal(one, nested)
    )


def reference_attention(q, k, v, heads):
    """softmax(q k^T / sqrt(d)) v per head, written out: (B, N, H*d), (B, T, H*d) -> (B, N, H*d)."""
    b, n, inner = q.shape
    d = inner // heads
    q_, k_, v_ = (t.reshape(t.shape[0], t.shape[1], heads, d).permute(0, 2, 1, 3) for t in (q, k, v))
    weights = torch.softmax(q_ @ k_.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (weights @ v_).permute(0, 2, 1, 3).reshape(b, n, inner)


def test_decoupled_patch_is_ip_adapters_formula_with_the_nested_projections(encoder):
    torch.manual_seed(0)
    index, layer = 0, encoder.layers[0]
    heads, dim, m = 2, layer.dim, encoder.config.num_tokens
    tokens, uncond_tokens = torch.randn(1, m, 2048), torch.randn(1, m, 2048)
    binding = SubjectBinding(encoder=encoder, tokens=tokens, positions=(1,), prompt_tokens=77)
    uncond = SubjectBinding(encoder=encoder, tokens=uncond_tokens, positions=(1,), prompt_tokens=77)
    q, k, v = torch.randn(4, 16, dim), torch.randn(4, 77, dim), torch.randn(4, 77, dim)
    options = {"n_heads": heads, "cond_or_uncond": [1, 0]}  # rows 0-1 unconditional, 2-3 conditional
    host = lambda q_, k_, v_, h, extra: reference_attention(q_, k_, v_, h)
    patch = DecoupledAttentionPatch(index=index, binding=binding, scale=0.7, host=host, uncond=uncond)
    out = patch(q, k, v, options)
    k_ip, v_ip = (t[0] for t in encoder.projections[index](tokens))  # (M, dim): the layer's W_K~, W_V~
    k_un, v_un = (t[0] for t in encoder.projections[index](uncond_tokens))
    text = reference_attention(q, k, v, heads)
    cond_term = reference_attention(q, k_ip.expand(4, -1, -1), v_ip.expand(4, -1, -1), heads)
    uncond_term = reference_attention(q, k_un.expand(4, -1, -1), v_un.expand(4, -1, -1), heads)
    torch.testing.assert_close(out[2:], text[2:] + 0.7 * cond_term[2:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:2], text[:2] + 0.7 * uncond_term[:2], rtol=1e-5, atol=1e-5)
    no_uncond = DecoupledAttentionPatch(index=index, binding=binding, scale=0.7, host=host)(q, k, v, options)
    assert torch.equal(no_uncond[:2], text[:2])  # nothing added to unconditional rows


def test_the_benchmarks_naive_ip_adapter_patch_is_the_same_formula():
    """benchmark.variants.NaiveIPAdapterPatch (projects on every call, every row) times the decoupled
    cross-attention the product's DecoupledAttentionPatch computes: text + scale * attn(q, K_ip, V_ip)."""
    from benchmark.variants import NaiveIPAdapterPatch

    g = torch.Generator().manual_seed(0)
    heads, dim, context = 2, 16, 24
    q, k, v = (torch.randn(3, n, dim, generator=g) for n in (10, 77, 77))
    tokens, to_k_ip, to_v_ip = (torch.randn(*shape, generator=g) for shape in ((1, 5, context), (dim, context),
                                                                             (dim, context)))
    def host(q_, k_, v_, h, extra):
        return reference_attention(q_, k_, v_, h)

    patch = NaiveIPAdapterPatch(image_tokens=tokens, to_k_ip=to_k_ip, to_v_ip=to_v_ip, host=host, scale=0.6)
    out = patch(q, k, v, {"n_heads": heads, "cond_or_uncond": [0]})
    k_ip, v_ip = (tokens[0] @ w.T for w in (to_k_ip, to_v_ip))  # (5, dim): the image tokens' K_ip, V_ip
    expected = reference_attention(q, k, v, heads) + 0.6 * reference_attention(
        q, k_ip.expand(3, -1, -1), v_ip.expand(3, -1, -1), heads)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

def test_jobs_split_over_processes_cover_every_image_once():
    jobs = make_jobs(methods(lambdas=(1.0, 2.0), scales=(0.5,)), subjects=3, prompts=2, seeds=[0, 1])
    assert len(jobs) == 1 * 2 * 2 + 2 * 3 * 2 * 2 + 1 * 3 * 2 * 2
    shards = [shard(jobs, r, 3) for r in range(3)]
    assert Counter(j for s in shards for j in s) == Counter(jobs) and len(set(jobs)) == len(jobs)
    assert len({j.relpath([Subject(f"s{i}", "", torch.zeros(1)) for i in range(3)]) for j in jobs}) == len(
        jobs
    )


# ------------------------------------------------------------------------------------------------
# The command line: files, resume, processes


def run_cli(*flags: str) -> dict:
    try:
        return evaluate_cli.main(evaluate_config.parse_args(["--domain", "tiny", "--steps", "2", *flags]))
    finally:
        reset_after_run()


def test_cli_writes_csv_json_plot_and_grids_that_read_back_and_resume_skips_finished_images(tmp_path):
    out = tmp_path / "eval"
    flags = ["--output_dir", str(out), "--lambdas", "1", "2", "--decoupled_scales", "0.5", "1"]
    result = run_cli(*flags)
    images = sorted(out.glob("images/**/*.png"))
    assert result["generated"] == len(images) == 2 + 2 * 2 * 2 * 2 and result["skipped"] == 0
    metric_names = result["metrics"]
    assert [m.split("[")[0] for m in metric_names] == ["clip_t", "clip_i", "identity"]

    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    saved = json.loads((out / "metrics.json").read_text())
    assert len(rows) == len(saved["rows"]) == 2 * 2 + 8 + 8  # the prior image is scored against each subject
    for row, entry in zip(rows, saved["rows"]):
        assert (row["method"], row["subject"], row["image"]) == (
            entry["method"],
            entry["subject"],
            entry["image"],
        )
        for name in metric_names:
            assert float(row[name]) == pytest.approx(entry[name], abs=1e-12)
    # Each figure recomputed from the image on disk and its subject's input.
    row = next(r for r in saved["rows"] if r["method"] == "nested" and r["value"] == 2.0)
    image = torch.from_numpy(np.asarray(Image.open(out / row["image"]), dtype=np.float32) / 255)
    subject = torch.from_numpy(
        np.asarray(Image.open(row["subject_source"]).convert("RGB"), dtype=np.float32) / 255
    )
    identity = tiny_scorers.TinyIdentity()
    ref, got = identity.embed(subject), identity.embed(image)
    if got is None:
        assert row["face_found"] is False and row["identity[tiny-face]"] is None
    else:
        assert row["identity[tiny-face]"] == pytest.approx(float(metrics.cosine(got, ref)), abs=1e-9)
    summary = {(e["method"], e["value"]): e for e in saved["summary"]}
    assert set(summary) == {
        ("prior", None),
        ("nested", 1.0),
        ("nested", 2.0),
        ("decoupled", 0.5),
        ("decoupled", 1.0),
    }
    nested_rows = [r for r in saved["rows"] if r["method"] == "nested" and r["value"] == 1.0]
    clip_i = metric_names[1]
    assert summary[("nested", 1.0)][clip_i] == pytest.approx(np.mean([r[clip_i] for r in nested_rows]))
    with open(out / "summary.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 5
    assert saved["settings"]["steps"] == 2 and saved["settings"]["lambdas"] == [1.0, 2.0]
    with Image.open(out / "tradeoff.png") as plot:
        assert plot.size[0] > 400 and plot.size[1] > 300
    grids = sorted(p.name for p in (out / "grids").glob("*.png"))
    assert grids == sorted(f"{m.slug}.png" for m in methods(lambdas=(1.0, 2.0), scales=(0.5, 1.0)))

    # Resume: finished images are skipped, lost ones made again, identical to the first run's.
    lost = [p for p in images if "nested-lambda-2" in str(p)][:2]
    before = {p: p.read_bytes() for p in lost}
    kept = images[0]
    stamp = kept.stat().st_mtime_ns
    for p in lost:
        p.unlink()
    again = run_cli(*flags)
    assert again["generated"] == 2 and again["skipped"] == len(images) - 2
    assert kept.stat().st_mtime_ns == stamp
    assert all(p.read_bytes() == before[p] for p in lost)
    assert again["rows"] == saved["rows"]

    # Other image settings in the same folder are refused, not mixed in.
    with pytest.raises(SystemExit, match="steps differ"):
        run_cli("--output_dir", str(out), "--steps", "3")


def test_a_subject_photo_without_a_face_stops_the_run_before_any_image_is_generated(tmp_path):
    folder = tmp_path / "subjects"
    folder.mkdir()
    Image.new("RGB", (64, 64), (255, 255, 255)).save(folder / "empty.png")
    with pytest.raises(SystemExit, match="no face found in the subject image .*empty.png"):
        run_cli("--output_dir", str(tmp_path / "out"), "--subjects", str(folder))
    assert not (tmp_path / "out" / "images").exists()


def test_real_domains_say_what_is_missing(tmp_path):
    with pytest.raises(SystemExit):
        evaluate_config.parse_args(["--domain", "faces", "--output_dir", str(tmp_path)])  # no --encoder
    encoder = tmp_path / "e.safetensors"
    encoder.write_bytes(b"")
    args = evaluate_config.parse_args(
        [
            "--domain",
            "pets",
            "--output_dir",
            str(tmp_path),
            "--encoder",
            str(encoder),
            "--models_dir",
            str(tmp_path / "models"),
        ]
    )
    try:
        with pytest.raises(SystemExit, match="SDXL base checkpoint was not found.*--pretrained_model"):
            evaluate_cli.main(args)
    finally:
        reset_after_run()


@pytest.mark.slow
def test_two_processes_split_the_generations_and_gather_the_metrics_once(tmp_path):
    result = tiny_models.accelerate_launch(
        "training.evaluate",
        ["--domain", "tiny", "--steps", "2", "--output_dir", tmp_path, "--lambdas", "1", "--decoupled_scales", "1",
         "--no_grids"],
    )
    assert result.returncode == 0, result.stderr[-4000:]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    processes = sorted(saved["processes"], key=lambda p: p["process"])
    # 2 prior images (2 prompts) + 4 nested + 4 decoupled (2 subjects x 2 prompts), split evenly
    assert [p["process"] for p in processes] == [0, 1] and [p["generated"] for p in processes] == [5, 5]
    assert len(saved["rows"]) == 2 * 2 + 4 + 4  # gathered once: every image's rows, in job order
    assert len(list(tmp_path.glob("images/**/*.png"))) == 10


# ------------------------------------------------------------------------------------------------
# During training


def test_eval_steps_logs_metrics_and_grids_to_tensorboard_from_a_training_run(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.tiny.models import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", count=4, size=64)
    held_out = make_tiny_dataset(tmp_path / "held-out", count=1, size=64, seed=5) / "pet-000.png"
    run = ["--train_data", str(data), "--max_train_steps", "2", "--checkpointing_steps", "100"]
    evaluation = ["--eval_steps", "2", "--validation_images", str(held_out), "--sample_steps", "2"]
    train(tmp_path / "run", *run, *evaluation, "--report_to", "tensorboard")
    saved = json.loads((tmp_path / "run" / "eval" / "step-2" / "metrics.json").read_text())
    assert {(e["method"], e["value"]) for e in saved["summary"]} == {("prior", None), ("nested", 1.0)}
    events = next((tmp_path / "run" / "logs").rglob("events.out.tfevents.*")).parent
    accumulator = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    scalars = accumulator.Tags()["scalars"]
    for tag in (
        "eval/prior/clip_i",
        "eval/nested-lambda-1/clip_i",
        "eval/nested-lambda-1/identity",
        "eval/nested-lambda-1/clip_t",
    ):
        assert tag in scalars
        assert accumulator.Scalars(tag)[-1].step == 2
    summary = {e["method"]: e for e in saved["summary"]}
    clip_i = next(m for m in saved["metrics"] if m.startswith("clip_i"))
    assert accumulator.Scalars("eval/nested-lambda-1/clip_i")[-1].value == pytest.approx(
        summary["nested"][clip_i]
    )
    assert {"eval/prior", "eval/nested-lambda-1"} <= set(accumulator.Tags()["images"])
    with pytest.raises(SystemExit):
        train_config.parse_args(["--domain", "tiny", "--eval_steps", "-1"])


def test_tradeoff_point_labels_cover_no_other_label_and_no_point():
    """λ and scale points of a run sit close together; their labels must each stay readable."""
    from training.evaluation.report import place_labels, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    nested = [(0.300 - 0.0004 * i, 0.52 + 0.004 * i) for i in range(6)]  # λ = 1 ... 4
    decoupled = [(0.2992 - 0.0002 * i, 0.528 + 0.0018 * i) for i in range(6)]  # scale 0.5 ... 1.0
    for points in (nested, decoupled):
        ax.plot(*zip(*points), marker="o")
    ax.legend(["nested", "decoupled"], loc="lower left")
    fig.tight_layout()
    notes = [(x, y, f"{v:g}", "k") for (x, y), v in zip(nested, (1, 1.5, 2, 2.5, 3, 4))]
    notes += [(x, y, f"{v:g} (1/8 no face)" if v == 1 else f"{v:g}", "k")
              for (x, y), v in zip(decoupled, (0.5, 0.6, 0.7, 0.8, 0.9, 1.0))]
    boxes = place_labels(fig, ax, notes)
    for i, a in enumerate(boxes):
        assert not any(a.overlaps(b) for b in boxes[i + 1 :]), notes[i][2]
        for x, y, *_ in notes:
            px, py = ax.transData.transform((x, y))
            assert not a.contains(px, py), (notes[i][2], x, y)
        assert a.x0 >= ax.get_window_extent().x0 and a.x1 <= ax.get_window_extent().x1
    plt.close(fig)
