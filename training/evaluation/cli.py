"""Evaluate a nested encoder as the paper does (section 5.2): identity and prompt alignment vs baselines.

    python -m training.evaluate --domain tiny --output_dir runs/eval-tiny          # CPU, tiny models, < 1 min
    python -m training.evaluate --domain faces --encoder faces-encoder.safetensors \\
        --subjects data/heldout-faces --output_dir runs/eval-faces     # SDXL etc. from ComfyUI/models
    accelerate launch --num_processes 8 -m training.evaluate ...       # the jobs split over 8 GPUs

For held-out subject images and a prompt set, it generates with ComfyUI's sampler: the model with no
subject (prior), nested attention at λ in {1, 1.5, 2, 2.5, 3, 4}, and IP-Adapter's decoupled
cross-attention with the same encoder's projections at scales 0.5 to 1.0; then scores every image
(CLIP-T, CLIP-I, face identity) and writes metrics.csv, summary.csv, metrics.json, tradeoff.png and
grids/<method>.png into --output_dir. Images already there are not generated again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path

import torch
from accelerate import Accelerator

from nested_attention import load_encoder
from nested_attention.images import from_pil
from nested_attention.logs import LOG_PREFIX as PREFIX
from nested_attention.weights import weights_fingerprint
from training.comfy_env import ComfyNotFoundError, comfy_module, find_comfyui, has_accelerator
from training.data.dataset import open_image
from training.data.images import IMAGE_EXTENSIONS, BadImage
from training.evaluation import metrics, two_subjects
from training.evaluation import prompts as prompts_lib
from training.evaluation.config import EvalConfig
from training.evaluation.method_images import Generator, SampleSettings, Subject, methods
from training.evaluation.metrics import MetricSetupError
from training.evaluation.pipeline import run_evaluation
from training.models import sdxl as models_lib
from training.presets import CLIP_VISION_H_NAMES, PRESETS, SDXL_CHECKPOINT_NAMES
from training.tiny import scorers as tiny_scorers
from training.tiny.models import make_tiny_dataset

log = logging.getLogger("training.evaluate")
glue_attention = comfy_module("nested_attention_comfy.attention")  # the glue shared with the nodes, imported on first use

CLIP_VISION_G_NAMES = (
    "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors",
    "clip_vision_g.safetensors",
    "CLIP-ViT-bigG-14.safetensors",
)
# What makes an image: a run directory whose images were made with other values is refused.
IMAGE_SETTINGS = (
    "domain",
    "encoder_sha256",
    "pretrained_model",
    "steps",
    "cfg",
    "resolution",
    "sampler",
    "scheduler",
    "negative_prompt",
    "token",
    "prompts",
    "subjects",
    "decoupled_uncond",
    "precision",
    "two_subjects",
    "pair_words",
)


def find_model(value: str | None, folder: str, names: tuple, what: str, flag: str, models_dir) -> str:
    if value is not None:
        if not os.path.isfile(value):
            raise SystemExit(f"{PREFIX} --{flag} {value}: no such file ({what}).")
        return value
    candidates = [Path(models_dir) / folder / name for name in names] if models_dir else []
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        where = Path(models_dir) / folder if models_dir else f"<ComfyUI>/models/{folder}"
        raise SystemExit(
            f"{PREFIX} {what} was not found: looked for {', '.join(names)} in {where}. Put it there "
            f"or pass --{flag} PATH."
        )
    return str(found)


def load_subjects(args: EvalConfig, output_dir: Path):
    """The held-out subjects: (name, source, image) from a folder or a manifest; generated for tiny."""
    source = args.subjects
    if source is None:
        if args.domain != "tiny":
            raise SystemExit(
                f"{PREFIX} --subjects is required: a folder of held-out {args.domain} images or a "
                "manifest.jsonl. Use images the encoder was not trained on."
            )
        source = str(make_tiny_dataset(output_dir / "tiny-subjects", count=2, size=64, seed=1))
    path = Path(source)
    entries: list[tuple[str, str]] = []  # (name, image path)
    if path.is_dir():
        for file in sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS):
            entries.append((str(file.relative_to(path).with_suffix("")), str(file)))
    elif path.is_file() and path.suffix == ".jsonl":
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            item = json.loads(line)
            image = item.get("image") or item.get("input")
            if not image:
                raise SystemExit(
                    f'{PREFIX} {path}, line {number}: expected {{"image": path}}, found {line!r}.'
                )
            image = str((path.parent / image) if not os.path.isabs(image) else image)
            entries.append((item.get("name") or Path(image).stem, image))
    else:
        raise SystemExit(f"{PREFIX} --subjects {source}: expected a folder of images or a .jsonl manifest.")
    if args.max_subjects:
        entries = entries[: args.max_subjects]
    if not entries:
        raise SystemExit(f"{PREFIX} no subject images in {source} ({', '.join(IMAGE_EXTENSIONS)}).")
    subjects, seen = [], set()
    for name, file in entries:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        if name in seen:
            raise SystemExit(f"{PREFIX} two subjects are named {name!r}; give them distinct names.")
        seen.add(name)
        try:
            image = from_pil(open_image(file))
        except BadImage as e:
            raise SystemExit(f"{PREFIX} subject image {file}: {e}") from e
        subjects.append(Subject(name=name, source=file, image=image))
    return subjects


def check_resume(output_dir: Path, settings: dict) -> None:
    """Refuse to mix images made with other settings into this run's folder."""
    path = output_dir / "settings.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    new = json.loads(json.dumps(settings))  # as saved: tuples are lists there
    changed = [k for k in IMAGE_SETTINGS if old.get(k) != new.get(k)]
    if changed:
        raise SystemExit(
            f"{PREFIX} {output_dir} holds images made with other settings ({', '.join(changed)} differ), "
            "which a resumed run would mix in. Use a new --output_dir, or delete that folder's images/."
        )


def build_scorers(args, frozen, encoder_clip_name: str, device, models_dir):
    clip_t = []
    if args.domain == "tiny":
        clip_t.append(tiny_scorers.tiny_clip_space(frozen.clip))
    else:
        path = args.clip_g_vision
        if path is None and models_dir is not None:
            path = next(
                (
                    str(Path(models_dir) / "clip_vision" / n)
                    for n in CLIP_VISION_G_NAMES
                    if (Path(models_dir) / "clip_vision" / n).is_file()
                ),
                None,
            )
        if path is not None:
            import comfy.clip_vision

            vision = comfy.clip_vision.load(path)
            if vision is None:
                raise SystemExit(
                    f"{PREFIX} --clip_g_vision {path} is not a CLIP vision model ComfyUI can load."
                )
            clip_t.append(
                metrics.ComfyClipSpace(
                    clip=frozen.clip, clip_vision=vision, name=f"sdxl-clip-g+{Path(path).stem}"
                )
            )
        if args.open_clip_model:
            try:
                clip_t.append(
                    metrics.OpenClipSpace(
                        model_name=args.open_clip_model, checkpoint=args.open_clip_checkpoint, device=device
                    )
                )
            except metrics.MetricSetupError as e:
                raise SystemExit(f"{PREFIX} {e}") from e
        if not clip_t:
            raise SystemExit(
                f"{PREFIX} CLIP-T needs a joint CLIP space from local files: put the ViT-bigG vision "
                f"file ({CLIP_VISION_G_NAMES[0]}) in ComfyUI/models/clip_vision or pass --clip_g_vision "
                "PATH (used with SDXL's own CLIP-G text tower), and/or pass --open_clip_model NAME "
                "--open_clip_checkpoint FILE."
            )
    clip_i = metrics.ClipImageSpace(clip_vision=frozen.clip_vision, name=encoder_clip_name)
    identity = None
    choice = args.identity
    if choice == "auto":
        choice = {"faces": "dlib", "tiny": "tiny"}.get(args.domain, "none")
    try:
        if choice == "dlib":
            identity = metrics.DlibIdentity(models_dir=args.dlib_models)
        elif choice == "tiny":
            identity = tiny_scorers.TinyIdentity()
    except metrics.MetricSetupError as e:
        raise SystemExit(f"{PREFIX} {e}") from e
    return metrics.Scorers(clip_t=clip_t, clip_i=clip_i, identity=identity)


def find_models(args: EvalConfig) -> tuple[EvalConfig, Path | None]:
    """The SDXL checkpoint and CLIP vision files (given, or the standard names in ComfyUI/models) filled in,
    and the models folder (None for tiny, or when ComfyUI is not found)."""
    if args.domain == "tiny":
        return args, None
    try:
        models_dir = Path(args.models_dir) if args.models_dir else find_comfyui() / "models"
    except ComfyNotFoundError:
        models_dir = None
    args = dataclasses.replace(
        args,
        pretrained_model=find_model(
            args.pretrained_model,
            "checkpoints",
            SDXL_CHECKPOINT_NAMES,
            "the SDXL base checkpoint",
            "pretrained_model",
            models_dir,
        ),
        clip_vision=find_model(
            args.clip_vision,
            "clip_vision",
            CLIP_VISION_H_NAMES,
            "the CLIP vision model of the encoder",
            "clip_vision",
            models_dir,
        ),
    )
    return args, models_dir


def load_models(args: EvalConfig):
    """The frozen models at the run's precision; returns (frozen, precision). A wrong file stops with why."""
    precision = args.precision
    if precision == "auto":
        precision = "fp16" if torch.cuda.is_available() else "fp32"
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    try:
        frozen = models_lib.load_frozen(
            tiny=args.domain == "tiny",
            checkpoint=args.pretrained_model,
            clip_vision_path=args.clip_vision,
            weight_dtype=weight_dtype,
            seed=0,
        )
    except ValueError as e:
        raise SystemExit(f"{PREFIX} cannot load the models: {e}") from e
    return frozen, precision


def load_or_build_encoder(args: EvalConfig, frozen, device):
    """--encoder checked against the loaded models, or (tiny) an untrained one built in code; returns
    (encoder in eval mode on `device`, its name for the report)."""
    if args.encoder:
        encoder = load_encoder(args.encoder)
        cfg = encoder.config
        if cfg.layers != frozen.layers or not cfg.clip_vision.same_architecture(frozen.clip_vision_spec):
            raise SystemExit(
                f"{PREFIX} {args.encoder} was trained for {len(cfg.layers)} layers and CLIP vision "
                f"{cfg.clip_vision.describe()}; the loaded models have {len(frozen.layers)} layers and "
                f"{frozen.clip_vision_spec.describe()}."
            )
        encoder_name = os.path.basename(args.encoder)
    else:
        preset = PRESETS[args.domain]
        encoder = models_lib.make_encoder(
            domain=preset.domain,
            token=preset.token,
            qformer=preset.qformer,
            frozen=frozen,
            alpha=2.0,
            init_from_unet=True,
            seed=0,
        )
        encoder_name = "tiny encoder (untrained, built in code)"
    return encoder.float().to(device).eval().requires_grad_(False), encoder_name


def run_settings(args: EvalConfig, *, frozen, encoder, encoder_name: str, precision: str, token: str,
                 prompts: list, subjects: list, processes: int) -> dict:
    """What the run is made with (settings.json): a resumed run must match it (IMAGE_SETTINGS)."""
    return {
        "domain": args.domain,
        "encoder": encoder_name,
        "encoder_sha256": weights_fingerprint(encoder),
        "pretrained_model": os.path.basename(args.pretrained_model)
        if args.pretrained_model
        else "tiny (built in)",
        "clip_vision": os.path.basename(args.clip_vision)
        if args.clip_vision
        else frozen.clip_vision_spec.name,
        "steps": args.steps,
        "cfg": args.cfg,
        "resolution": args.resolution,
        "sampler": args.sampler,
        "scheduler": args.scheduler,
        "negative_prompt": args.negative_prompt,
        "token": token,
        "precision": precision,
        "decoupled_uncond": args.decoupled_uncond,
        "prompts": prompts_lib.describe(prompts),
        "subjects": [{"name": s.name, "source": s.source} for s in subjects],
        "seeds": args.seeds,
        "lambdas": args.lambdas,
        "decoupled_scales": args.decoupled_scales,
        "processes": processes,
        "two_subjects": args.two_subjects,
    }


def pair_up_subjects(args: EvalConfig, subjects: list, settings: dict) -> tuple[list, list]:
    """Two-subject mode (issue 23): its own prompts, the subject pairs and region methods, recorded in
    `settings`; returns (pairs, pair prompts)."""
    tiny = args.domain == "tiny"
    pair_prompts = list(two_subjects.TINY_PAIR_PROMPTS if tiny else two_subjects.PAIR_PROMPTS)
    try:
        pairs = two_subjects.pair_up(len(subjects))
    except ValueError as e:
        raise SystemExit(f"{PREFIX} --two_subjects: {e} Give --subjects with two photos or more.") from e
    settings.update(
        prompts=[{"template": q.template, "category": q.category, "clip_t_text": q.without_subjects()}
                 for q in pair_prompts],
        pair_words=args.pair_words,
        regions=args.regions,
        pairs=[[subjects[i].name for i in pair] for pair in pairs],
    )
    settings.pop("decoupled_scales")
    if "decoupled" in args.methods:
        log.warning("%s --two_subjects: the decoupled baseline is not measured (it binds no word)",
                    PREFIX)
    return pairs, pair_prompts


def make_generator(args: EvalConfig, frozen, encoder, subjects: list, prompts: list, token: str) -> Generator:
    """The one-subject image maker of every job: the run's sampler settings, ComfyUI's attention as the host."""
    return Generator(
        frozen=frozen,
        encoder=encoder,
        text=models_lib.TextEncoder(frozen.clip, token),
        subjects=subjects,
        prompts=prompts,
        token=token,
        settings=SampleSettings(
            steps=args.steps,
            cfg=args.cfg,
            resolution=args.resolution,
            sampler=args.sampler,
            scheduler=args.scheduler,
            negative_prompt=args.negative_prompt,
        ),
        host=glue_attention.comfy_attention,
        decoupled_uncond=args.decoupled_uncond == "black_image",
    )


def main(args: EvalConfig) -> dict | None:
    """Run the evaluation; returns the report (metrics.json's content) on the main process."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("training").setLevel(logging.INFO)
    accelerator = Accelerator(cpu=not has_accelerator())
    # ComfyUI is imported on first use (training.comfy_env), after this: its device choice sees the device
    # accelerate gave this process.
    if args.cpu_threads is not None:
        torch.set_num_threads(args.cpu_threads)
    output_dir = Path(args.output_dir)
    tiny = args.domain == "tiny"
    args, models_dir = find_models(args)
    frozen, precision = load_models(args)
    encoder, encoder_name = load_or_build_encoder(args, frozen, accelerator.device)
    token = args.token or encoder.config.token
    prompts = (
        prompts_lib.load_prompts(args.prompts, token)
        if args.prompts
        else list(prompts_lib.TINY_PROMPTS if tiny else prompts_lib.DEFAULT_PROMPTS)
    )
    subjects = load_subjects(args, output_dir)
    settings = run_settings(
        args, frozen=frozen, encoder=encoder, encoder_name=encoder_name, precision=precision, token=token,
        prompts=prompts, subjects=subjects, processes=accelerator.num_processes,
    )
    if args.two_subjects:
        pairs, pair_prompts = pair_up_subjects(args, subjects, settings)
    if accelerator.is_main_process:
        check_resume(output_dir, settings)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "settings.json").write_text(json.dumps(settings, indent=1, ensure_ascii=False))
    accelerator.wait_for_everyone()

    scorers = build_scorers(args, frozen, settings["clip_vision"], accelerator.device, models_dir)
    generator = make_generator(args, frozen, encoder, subjects, prompts, token)
    nested = args.lambdas if "nested" in args.methods else ()
    if args.two_subjects:  # the same run with the two-subject jobs, scores and report
        run = two_subjects.run_pair_evaluation
        generator = two_subjects.PairGenerator(generator, pairs, pair_prompts, args.pair_words)
        chosen = two_subjects.pair_methods(prior="prior" in args.methods, lambdas=nested, regions=args.regions)
    else:
        run = run_evaluation
        chosen = methods(
            prior="prior" in args.methods,
            lambdas=nested,
            scales=args.decoupled_scales if "decoupled" in args.methods else (),
        )
    try:
        result = run(
            generator=generator,
            scorers=scorers,
            methods=chosen,
            seeds=args.seeds,
            output_dir=output_dir,
            settings=settings,
            accelerator=accelerator,
            grids=not args.no_grids,
            progress=True,
        )
    except MetricSetupError as e:  # e.g. a subject photo with no detectable face
        raise SystemExit(f"{PREFIX} {e}") from e
    if result is not None:
        print_summary(result)
    accelerator.end_training()
    return result


def print_summary(result: dict) -> None:
    """The per-method means as a table; short column names, each figure's space listed below it."""
    metrics = result["metrics"]
    short = [m.split("[", 1)[0] for m in metrics]
    print(f"{result['generated']} images generated, {result['skipped']} already there (resumed)")
    widths = [max(12, len(s) + 2) for s in short]
    print(f"{'method':<22}" + "".join(f"{s:>{w}}" for s, w in zip(short, widths)) + f"{'no face':>10}")
    for e in result["summary"]:
        label = e["method"] if e["value"] is None else f"{e['method']} {e['parameter']}={e['value']:g}"
        if e.get("region"):  # the two-subject mode
            label = f"regions {e['region']} λ={e['value']:g}"
        values = ["-" if e[m] is None else format(e[m], ".4f") for m in metrics]
        cells = "".join(f"{v:>{w}}" for v, w in zip(values, widths))
        faces = f"{e['face_failures']}/{e['rows']}" if "face_failures" in e else ""
        print(f"{label:<22}{cells}{faces:>10}")
    for s, m in zip(short, metrics):
        print(f"  {s}: {m}")
    for name, path in result["files"].items():
        print(f"{name}: {path if isinstance(path, str) else f'{len(path)} files in {Path(path[0]).parent}'}")

