"""The evaluation's settings, each declared once: the flags of `python -m training.evaluate`.

Every field of `EvalConfig` is a flag declared with `setting(...)` (training.settings, the machinery the
trainer's `TrainConfig` uses too): group and help, default, the domain's value when the flag is not given,
and the rules that reject bad values and combinations right after parsing (argparse's exit status 2).

To add a flag: add a field to `EvalConfig` in the group it belongs to (docs/ARCHITECTURE.md §6).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from training.evaluation.method_images import DECOUPLED_SCALES, LAMBDAS
from training.evaluation.two_subjects import PAIR_WORDS, REGIONS
from training.presets import PRESETS, Preset
from training.settings import build_parser as settings_parser
from training.settings import parse, rule, setting, valid

METHODS = ("prior", "nested", "decoupled")
# The groups of `--help`, in order.
WHAT = "what to evaluate"
MODELS = "models (default: the standard files in ComfyUI/models)"
METRICS = "metrics (local files only; nothing is downloaded)"
SAMPLING = "sampling"
TWO_SUBJECTS = "two subjects (two people in one image: how much identity leaks between them)"


@dataclass(frozen=True)
class EvalConfig:
    """Every setting of one evaluation, as `python -m training.evaluate --help` shows them."""

    domain: str = setting(
        WHAT,
        "'faces' (token 'person', face identity), 'pets' (token 'pet', CLIP-I as identity) or "
        "'tiny' (tiny models built in code, generated subjects; a CPU run of under a minute).",
        required=True,
        choices=sorted(PRESETS),
        check=rule(
            lambda c: c.preset.tiny or c.encoder is not None,
            "--domain {value} needs --encoder (a .safetensors file exported by training.run).",
        ),
    )
    output_dir: str = setting(
        WHAT, "Where images, metrics and plots go. Run again with the same folder to resume.", required=True
    )
    encoder: str | None = setting(
        WHAT,
        "The nested encoder file (.safetensors exported by training.run). Required for faces "
        "and pets; for tiny, a fresh encoder is built in code unless given (e.g. a tiny training "
        "run's tiny-encoder.safetensors).",
        check=valid(os.path.isfile, "{flag} {value}: no such file."),
    )
    subjects: str | None = setting(
        WHAT,
        "Held-out subject images: a folder (every image in it, names from the file names) or a "
        'JSON-lines manifest ({"image": path, "name": optional} per line). Generated for tiny.',
    )
    max_subjects: int | None = setting(WHAT, "Use only the first N subjects.")
    prompts: str | None = setting(
        WHAT,
        "A text file of prompts, one per line, with {token} (or the subject word) where the "
        "subject goes; 'category: prompt' lines set the category. Default: 12 shipped prompts "
        "(clothing, expression, scene, style); 2 for tiny.",
    )
    token: str | None = setting(WHAT, "The subject word (default: the encoder's word).")
    methods: tuple[str, ...] = setting(
        WHAT,
        "Which methods to generate.",
        default=METHODS,
        choices=METHODS,
        check=valid(bool, "--methods: choose at least one."),
    )
    lambdas: tuple[float, ...] = setting(
        WHAT, "λ values of nested attention (the paper's: 1 1.5 2 2.5 3 4).", default=LAMBDAS
    )
    decoupled_scales: tuple[float, ...] = setting(
        WHAT,
        "Scales of the decoupled cross-attention baseline (IP-Adapter's 0.5 to 1.0).",
        default=DECOUPLED_SCALES,
    )
    decoupled_uncond: str = setting(
        WHAT,
        "What the decoupled baseline adds to the unconditional half of guidance: the tokens of a "
        "black image, as IP-Adapter does (default), or nothing, as nested attention does.",
        default="black_image",
        choices=("black_image", "none"),
    )
    seeds: tuple[int, ...] = setting(
        WHAT,
        "Sampling seeds; every method uses the same ones (default 0 1 2 3; tiny: 0).",
        preset=lambda c: (0,) if c.preset.tiny else (0, 1, 2, 3),
    )

    pretrained_model: str | None = setting(MODELS, "SDXL base single-file checkpoint.")
    clip_vision: str | None = setting(
        MODELS, "The CLIP vision file the encoder reads (ViT-H/14); also gives CLIP-I."
    )
    models_dir: str | None = setting(MODELS, "A ComfyUI models folder to look in (default: ComfyUI's).")
    precision: str = setting(
        MODELS,
        "UNet weights dtype (auto: fp16 on a GPU, fp32 on the CPU).",
        default="auto",
        choices=("auto", "fp32", "fp16", "bf16"),
    )

    clip_g_vision: str | None = setting(
        METRICS,
        "The ViT-bigG vision file (CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors): with SDXL's "
        "own CLIP-G text tower it gives CLIP-T in the OpenCLIP ViT-bigG-14 space. Looked for in "
        "ComfyUI/models/clip_vision when not given.",
    )
    open_clip_model: str | None = setting(
        METRICS,
        "CLIP-T (also) in this OpenCLIP model's space: a built-in open_clip name, e.g. ViT-H-14.",
        check=rule(
            lambda c: (c.open_clip_model is None) == (c.open_clip_checkpoint is None),
            "--open_clip_model and --open_clip_checkpoint go together (a built-in name, its local weights).",
        ),
    )
    open_clip_checkpoint: str | None = setting(
        METRICS, "The local .safetensors weights for --open_clip_model."
    )
    identity: str = setting(
        METRICS,
        "Face identity model: dlib's ResNet embedder (pip install dlib-bin face-recognition-models), "
        "or none. CLIP-I is always measured. auto: dlib for faces, none for pets, the stand-in for tiny.",
        default="auto",
        choices=("auto", "dlib", "clip-i", "none"),
        check=rule(
            lambda c: not (c.identity == "dlib" and c.preset.tiny),
            "--identity dlib needs real faces; the tiny domain uses its stand-in (leave --identity auto).",
        ),
    )
    dlib_models: str | None = setting(
        METRICS,
        "A folder with shape_predictor_5_face_landmarks.dat and "
        "dlib_face_recognition_resnet_model_v1.dat (default: the face_recognition_models package's).",
    )

    steps: int = setting(
        SAMPLING,
        "Sampler steps (default 30; tiny 4).",
        preset=lambda c: c.preset.sample_steps if c.preset.tiny else 30,
        check=valid(lambda n: n >= 1, "{flag} {value}: expected at least 1 step."),
    )
    cfg: float = setting(SAMPLING, "Classifier-free guidance scale.", default=5.0)
    resolution: int = setting(
        SAMPLING,
        "Image side in pixels (default 1024; tiny 64).",
        preset=lambda c: c.preset.resolutions[0] if c.preset.tiny else 1024,
        check=valid(lambda r: r >= 8 and r % 8 == 0, "{flag} {value}: expected a positive multiple of 8."),
    )
    sampler: str = setting(SAMPLING, "A ComfyUI sampler name (KSampler's list).", default="euler")
    scheduler: str = setting(SAMPLING, "A ComfyUI scheduler name.", default="normal")
    negative_prompt: str = setting(SAMPLING, "The negative prompt of every image.", default="")
    no_grids: bool = setting(SAMPLING, "Skip the image grids.", default=False)
    cpu_threads: int | None = setting(SAMPLING, "torch CPU threads (default: torch's choice).")

    two_subjects: bool = setting(
        TWO_SUBJECTS,
        "Evaluate two subjects per image instead of one: the subjects in pairs (1st + 2nd, 3rd + 4th, "
        "...), each bound by the same encoder to its own word of two-subject prompts; every detected face is "
        "scored against both reference photos (own vs the other: leakage). Writes the same files, with "
        "identity_own / identity_other columns, and leakage.png instead of tradeoff.png.",
        default=False,
        check=(
            rule(
                lambda c: not c.two_subjects or c.domain in PAIR_WORDS,
                lambda c: f"--two_subjects measures faces: use --domain faces (or tiny), not {c.domain}.",
            ),
            rule(
                lambda c: not (c.two_subjects and c.identity in ("none", "clip-i")),
                "--two_subjects scores each detected face: it needs face identity (--identity auto).",
            ),
            rule(
                lambda c: not (c.two_subjects and c.prompts is not None),
                "--two_subjects has its own prompts (two subject words); --prompts is for one subject.",
            ),
        ),
    )
    regions: tuple[str, ...] | None = setting(
        TWO_SUBJECTS,
        "Region methods to compare (default: all three): none = both subjects on the whole image; "
        "manual = the first subject on the left half, the second on the right (the Apply node's MASK); auto "
        "= each subject's region from its word's cross-attention in the first steps (the Apply node's "
        "region: auto).",
        preset=lambda c: REGIONS if c.two_subjects else None,
        choices=REGIONS,
        convert=lambda given: tuple(dict.fromkeys(given)),  # each once, in the order given
        check=(
            rule(
                lambda c: c.two_subjects or c.regions is None,
                "--regions and --pair_words belong to --two_subjects.",
            ),
        ),
    )
    pair_words: tuple[str, ...] | None = setting(
        TWO_SUBJECTS,
        "The words of the first and second subject of each pair in the prompts (default: faces 'man' "
        "'woman', tiny 'pet' 'toy'). Order the subjects so that each pair's first one fits A.",
        preset=lambda c: PAIR_WORDS.get(c.domain, ()) if c.two_subjects else None,
        nargs=2,
        metavar=("A", "B"),
        check=(
            rule(
                lambda c: c.two_subjects or c.pair_words is None,
                "--regions and --pair_words belong to --two_subjects.",
            ),
            valid(
                lambda words: len({w.lower() for w in words}) == len(words),
                lambda c: f"--pair_words {' '.join(c.pair_words)}: each subject needs its own word.",
            ),
        ),
    )

    @property
    def preset(self) -> Preset:
        return PRESETS[self.domain]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m training.evaluate` (no domain value applied, no validation)."""
    return settings_parser(
        EvalConfig,
        prog="python -m training.evaluate",
        description="Measure identity and prompt alignment of a nested encoder against the model's prior and "
        "decoupled cross-attention (IP-Adapter) with the same weights; write CSV, JSON, a trade-off plot and "
        "image grids.",
    )


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    """Flags -> the domain's values -> validation; exits with status 2 and a message on bad input."""
    return parse(EvalConfig, build_parser(), argv)
