"""The trainer's settings, each declared once, and its one frozen config.

Every field of `TrainConfig` is a flag of `python -m training.run` declared with `setting(...)`
(training.settings): its group and help, its default, what the domain preset (training.presets) gives it
when the flag is not given, and its validity rules, those over several settings included. `parse_args(argv)`
parses the flags, fills the rest and rejects bad values and combinations right away (argparse's exit
status 2, with what to do instead). What it returns is frozen: nothing changes it afterwards.
`resolve_inputs` (the run's first step) makes a new one with the model and data paths found.

To add a flag: add a field to `TrainConfig` in the group it belongs to (docs/ARCHITECTURE.md §6).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from nested_attention.logs import LOG_PREFIX as PREFIX
from training.comfy_env import ComfyNotFoundError, find_comfyui, has_accelerator
from training.data.dataset import describe_source, find_shards
from training.loop.loss import LossConfig
from training.loop.schedule import batch_sizes, epochs_to_steps, launcher_world_size
from training.presets import CLIP_VISION_H_NAMES, PRESETS, SDXL_CHECKPOINT_NAMES, Preset
from training.settings import at_least, derived, parse, positive, rule, setting, valid
from training.settings import build_parser as settings_parser

log = logging.getLogger(__name__)

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
REPORT_TO = ("tensorboard", "wandb", "all", "none")
# The groups of `--help`, in order.
DATA = "domain and data"
MODELS = "models"
OPTIMIZATION = "optimization"
MONITORING = "checkpoints and monitoring"


# ------------------------------------------------------------------------------------------------
# What the declarations below share: presets computed from several settings, and rule messages


def words(texts: list[str]) -> tuple[str, ...]:
    """--subject_words as given: separate words and comma-separated lists alike ('dog corgi', 'dog,corgi')."""
    return tuple(w for w in (w.strip() for text in texts for w in text.split(",")) if w)


BATCH = ("train_batch_size", "global_batch_size", "gradient_accumulation_steps")


def batch_split(name: str):
    """The preset of one of the BATCH settings: those given, and the preset's global batch for the
    resolution's phase, split over the processes (training.loop.schedule.batch_sizes)."""

    def fill(c) -> int:
        values = {n: c.given(n) for n in BATCH}
        values.update(resolution=c.resolution, num_processes=c.num_processes)
        return batch_sizes(c.preset, values)[name]

    return fill


def streamed(train_data: str | None) -> bool:
    """Whether --train_data names tar shards (streamed: their size is unknown until read)."""
    return train_data is not None and bool(find_shards(train_data))


def batch_product(c) -> str:
    world = c.num_processes
    return (
        f"--global_batch_size {c.global_batch_size} must be --train_batch_size {c.train_batch_size} x "
        f"{world} process(es) x --gradient_accumulation_steps (derived when not given; "
        f"{c.gradient_accumulation_steps} here), a multiple of {c.train_batch_size * world}; choose a global "
        "batch that divides evenly, or another --train_batch_size (or leave it out: the preset's is lowered "
        "to fit)."
    )


def dropout_sum(c) -> float:
    return c.text_dropout + c.subject_dropout + c.both_dropout


def missing_files(paths) -> list[str]:
    return [path for path in paths if not os.path.isfile(path)]


PROBABILITY = valid(lambda p: 0.0 <= p <= 1.0, "{flag} is a probability in [0, 1], got {value}.")
AT_LEAST_ONE = at_least(1)
NOT_FOR_TINY = (
    "{flag} cannot be used with --domain tiny, which builds its tiny models in code; use --domain pets or "
    "faces to train on SDXL."
)


# ------------------------------------------------------------------------------------------------
# The settings


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of one training run, as `python -m training.run --help` shows them: one field per flag,
    plus num_processes, the launch's, which the global batch is split over."""

    domain: str = setting(
        DATA,
        "The preset to start from: 'pets' (token 'pet', M=256, input image = target), 'faces' (token "
        "'person', M=1024, aligned face crop as input, in-the-wild photo as target) or 'tiny' (tiny "
        "models and generated data, for a CPU smoke run of about a minute).",
        required=True,
        choices=sorted(PRESETS),
    )
    train_data: str | None = setting(
        DATA,
        "The training data: a JSON-lines manifest, a folder of images (captions from sidecar .txt "
        "files), or tar shards (a .tar file, a folder of them, or a glob). Defaults to ./data/<domain> "
        "(for 'tiny', a data set generated into <output_dir>/tiny-data).",
    )
    max_train_samples: int | None = setting(
        DATA,
        "Use only the first N records of a manifest or folder (for quick runs and overfitting checks).",
        check=(
            at_least(1, "{flag} must be at least 1."),
            rule(
                lambda c: c.max_train_samples is None or not streamed(c.train_data),
                "--max_train_samples applies to manifests and image folders, not to streamed tar shards.",
            ),
        ),
    )
    min_image_size: int = setting(
        DATA,
        "Images whose shorter side is below this many pixels are listed in the data summary before "
        "training (they are upscaled to the resolution); default: half the resolution.",
        preset=lambda c: c.resolution // 2,
    )
    dry_run: bool = setting(
        DATA,
        "Resolve every setting, scan the data, write <output_dir>/args.json (every run writes it) and "
        "a labelled preview of the first 4 processed samples (encoder input as CLIP sees it, target crop "
        "as the UNet sees it, caption with the token) to <output_dir>/data-preview/, then stop before "
        "loading any model.",
        default=False,
    )
    token: str = setting(
        DATA,
        "The subject word that captions' subject words become and that prompts use at inference "
        "(default: the preset's, 'pet' or 'person').",
        preset=lambda c: c.preset.token,
        check=valid(
            lambda t: re.fullmatch(r"[A-Za-z][A-Za-z\-']*", t) is not None,
            "{flag} must be one plain word (letters), got {value!r}.",
        ),
    )
    subject_words: tuple[str, ...] = setting(
        DATA,
        "Words that name the subject in captions, as separate words or comma-separated "
        "('dog corgi' or 'dog,corgi'; quote a two-word breed: 'shih tzu'); the first run of them in a "
        "caption becomes --token (case-insensitive, whole words; a caption with them only in the plural, "
        "'two dogs', is not rewritten: the template is put in front and the data summary counts it). "
        "Default: the preset's (pets: dog, cat, puppy, kitten, pet and common breed words; faces: man, "
        "woman, person, boy, girl, lady, guy, ...).",
        preset=lambda c: c.preset.subject_words,
        convert=words,
        check=valid(
            lambda ws: bool(ws) and all(w.strip() for w in ws),
            "{flag} needs at least one word (no empty words).",
        ),
    )
    caption_template: str = setting(
        DATA,
        "Caption for images without one, with {token} for the subject word (default: the preset's, "
        "'a photo of a {token}').",
        preset=lambda c: c.preset.caption_template,
        check=valid(
            lambda t: "{token}" in t,
            "{flag} must contain {{token}} (where the subject word goes), got {value!r}.",
        ),
    )
    resolution: int = setting(
        DATA,
        "Training resolution of the target images, a multiple of 64 (default: the preset's first "
        "phase, 512; train phase two with --resolution 1024 --init_encoder <phase-one export>).",
        preset=lambda c: c.preset.resolutions[0],
        check=valid(
            lambda r: r >= 64 and r % 64 == 0,
            "{flag} must be a positive multiple of 64 (SDXL's latents are 1/8 of it and the UNet halves "
            "them twice), got {value}.",
        ),
    )
    center_crop: bool = setting(
        DATA,
        "Crop targets to a square at their centre (--no-center_crop: at a random place; default: "
        "the preset's).",
        preset=lambda c: c.preset.center_crop,
    )
    random_flip: bool = setting(
        DATA,
        "Mirror targets at random (default: the preset's).",
        preset=lambda c: c.preset.random_flip,
    )
    dataloader_num_workers: int = setting(
        DATA,
        "Data loader worker processes per GPU (default: 4; 0 for 'tiny'). A resumed run must use "
        "the same number to see the same data order.",
        preset=lambda c: 0 if c.preset.tiny else 4,
        check=at_least(0, "{flag} must be 0 or more."),
    )

    pretrained_model: str | None = setting(
        MODELS,
        "The SDXL base single-file checkpoint (.safetensors). Defaults to a known SDXL base file "
        "in ComfyUI's models/checkpoints.",
        check=rule(lambda c: c.pretrained_model is None or not c.preset.tiny, NOT_FOR_TINY),
    )
    clip_vision: str | None = setting(
        MODELS,
        "The CLIP ViT-H/14 vision model file the nodes will load (as for IP-Adapter). Defaults to "
        "a known ViT-H/14 file in ComfyUI's models/clip_vision.",
        check=rule(lambda c: c.clip_vision is None or not c.preset.tiny, NOT_FOR_TINY),
    )
    models_dir: str | None = setting(
        MODELS,
        "The ComfyUI models folder searched for the defaults above (default: <ComfyUI>/models).",
        check=rule(lambda c: c.models_dir is None or not c.preset.tiny, NOT_FOR_TINY),
    )
    num_tokens: int = setting(
        MODELS,
        "M, the number of subject tokens the Q-Former outputs (default: the preset's, 256 for "
        "pets and 1024 for faces).",
        preset=lambda c: c.preset.num_tokens,
        check=AT_LEAST_ONE,
    )
    alpha: float = setting(
        MODELS,
        "Norm regularization of the nested value, |v*| = alpha |V[s*]| (the paper uses 2).",
        default=2.0,
        check=positive(),
    )
    init_projections: str = setting(
        MODELS,
        "Start each layer's W_K~ / W_V~ from the UNet's own to_k / to_v ('unet') or at random.",
        default="unet",
        choices=("unet", "random"),
    )
    init_from: str | None = setting(
        MODELS,
        "Warm start from trained weights of any layout the pack reads: an IP-Adapter Plus SDXL file, the "
        "Nested Attention authors' release, or an export of this trainer. M, the Q-Former's shape and the "
        "CLIP hidden layer come from the file; the export is in the pack's format (training/warm_start.py).",
        check=(
            rule(
                lambda c: c.init_from is None or c.init_encoder is None,
                "--init_from and --init_encoder both choose the starting weights; give one.",
            ),
            valid(os.path.isfile, "{flag} {value}: no such file."),
        ),
    )
    init_encoder: str | None = setting(
        MODELS,
        "Start from an exported encoder file instead of fresh weights (e.g. phase two at 1024 "
        "from the phase-one export). Its M, layers and CLIP vision model must match.",
        check=valid(
            os.path.isfile,
            "{flag} {value}: no such file. Give an encoder .safetensors exported by this trainer.",
        ),
    )

    output_dir: str = setting(
        OPTIMIZATION,
        "Where checkpoints, sample grids, logs and the exported encoder go (default: output/<domain>).",
        preset=lambda c: os.path.join("output", c.domain),
    )
    seed: int = setting(
        OPTIMIZATION,
        "Seed of everything random: initialization, data order, crops, dropout, noise and timesteps.",
        default=0,
    )
    train_batch_size: int = setting(
        OPTIMIZATION,
        "Batch size per device (default: the preset's, 4, lowered to fit the preset's global batch).",
        preset=batch_split("train_batch_size"),
        check=AT_LEAST_ONE,
    )
    global_batch_size: int = setting(
        OPTIMIZATION,
        "Samples per optimizer step over all processes: --train_batch_size x processes x accumulation, "
        "the accumulation derived (must divide evenly). Default: the preset's phase, as in the paper (faces "
        "32 at 512 and 16 at 1024; pets 128 and 32); none for 'tiny'.",
        preset=batch_split("global_batch_size"),
        check=(
            AT_LEAST_ONE,
            rule(
                lambda c: (
                    c.train_batch_size * c.num_processes * c.gradient_accumulation_steps
                    == c.global_batch_size
                ),
                batch_product,
            ),
        ),
    )
    gradient_accumulation_steps: int = setting(
        OPTIMIZATION,
        "Number of batches whose gradients are accumulated before each optimizer step (default: "
        "derived from the global batch, else 1; given with --global_batch_size, the two must agree).",
        preset=batch_split("gradient_accumulation_steps"),
        check=AT_LEAST_ONE,
    )
    max_train_steps: int | None = setting(
        OPTIMIZATION,
        "Number of optimizer steps to train for (default: the preset's; not with --num_train_epochs).",
        preset=lambda c: c.preset.max_train_steps if c.num_train_epochs is None else None,
        check=AT_LEAST_ONE,
    )
    num_train_epochs: float | None = setting(
        OPTIMIZATION,
        "Train for this many passes over the data instead (the paper: 100 per phase): sets "
        "--max_train_steps = ceil(epochs x data set size / global batch) once the data is read. Not for "
        "tar shards (their size is unknown) and not together with --max_train_steps.",
        check=(
            rule(
                lambda c: c.num_train_epochs is None or c.max_train_steps is None,
                "--num_train_epochs and --max_train_steps both set the run's length; give one, not both.",
            ),
            positive(),
            rule(
                lambda c: c.num_train_epochs is None or not streamed(c.train_data),
                "--num_train_epochs needs the data set's size, which tar shards do not tell (they "
                "stream); give --max_train_steps instead.",
            ),
        ),
    )
    learning_rate: float = setting(
        OPTIMIZATION,
        "AdamW learning rate after warm-up (default: the preset's, 1e-4).",
        preset=lambda c: c.preset.learning_rate,
        check=positive(),
    )
    lr_scheduler: str = setting(
        OPTIMIZATION,
        "Learning rate schedule after the warm-up.",
        default="constant_with_warmup",
        choices=LR_SCHEDULERS,
    )
    lr_warmup_steps: int = setting(
        OPTIMIZATION,
        "Optimizer steps of linear learning-rate warm-up (default: the preset's).",
        preset=lambda c: c.preset.lr_warmup_steps,
        check=at_least(0, "{flag} must be 0 or more."),
    )
    adam_beta1: float = setting(OPTIMIZATION, "AdamW beta1.", default=0.9)
    adam_beta2: float = setting(OPTIMIZATION, "AdamW beta2.", default=0.999)
    adam_weight_decay: float = setting(OPTIMIZATION, "AdamW decoupled weight decay.", default=1e-2)
    adam_epsilon: float = setting(OPTIMIZATION, "AdamW epsilon.", default=1e-8)
    max_grad_norm: float = setting(
        OPTIMIZATION,
        "Clip the gradient's global norm to this value (0 turns clipping off).",
        default=1.0,
        check=at_least(0, "{flag} must be 0 (no clipping) or positive."),
    )
    mixed_precision: str = setting(
        OPTIMIZATION,
        "Mixed precision of the forward pass; the frozen UNet is stored in this precision too "
        "(default: the preset's, bf16; 'no' on a machine without a GPU).",
        preset=lambda c: c.preset.mixed_precision if has_accelerator() else "no",
        choices=("no", "fp16", "bf16"),
        check=valid(
            lambda m: m != "fp16" or has_accelerator(),
            "--mixed_precision fp16 needs a GPU; on the CPU use 'no' (or bf16).",
        ),
    )
    gradient_checkpointing: bool = setting(
        OPTIMIZATION,
        "Recompute the frozen UNet's blocks in the backward pass to save memory (default: on for "
        "pets and faces).",
        preset=lambda c: c.preset.gradient_checkpointing,
    )
    cpu_threads: int | None = setting(
        OPTIMIZATION,
        "Intra-op threads of torch on the CPU (default: $OMP_NUM_THREADS or torch's choice; 1 for "
        "'tiny', whose many small ops gain nothing from more threads and slow down several-fold "
        "when the cores are busy).",
        preset=lambda c: 1 if c.preset.tiny and "OMP_NUM_THREADS" not in os.environ else None,
        check=at_least(1, "{flag} must be at least 1."),
    )
    ddp_timeout: int = setting(
        OPTIMIZATION,
        "Seconds a process of a distributed run waits for the others (e.g. while they build the latent "
        "cache) before giving up.",
        default=3 * 3600,
        check=at_least(1, "{flag} must be at least 1 second."),
    )
    allow_tf32: bool = setting(
        OPTIMIZATION,
        "Allow TF32 matrix multiplications on Ampere and newer GPUs (faster, slightly less exact).",
        default=False,
    )
    cache_latents: bool = setting(
        OPTIMIZATION,
        "Compute VAE latents and CLIP image tokens once, before training, into --cache_dir (not "
        "for tar shards, which may be larger than the disk).",
        default=False,
        check=(
            rule(
                lambda c: not (c.cache_latents and c.random_flip),
                "--cache_latents stores one crop of each image, so it cannot be combined with --random_flip; "
                "add --no-random_flip or drop --cache_latents.",
            ),
            rule(
                lambda c: not (c.cache_latents and streamed(c.train_data)),
                "--cache_latents cannot be used with tar shards (a streamed data set may be larger "
                "than the disk); drop --cache_latents, or use a manifest or image folder.",
            ),
        ),
    )
    cache_dir: str = setting(
        OPTIMIZATION,
        "Where --cache_latents writes its cache (default: <output_dir>/cache).",
        preset=lambda c: os.path.join(c.output_dir, "cache"),
    )
    cache_text_embeddings: bool = setting(
        OPTIMIZATION,
        "Encode each distinct caption once and keep it in memory (for data sets with few distinct "
        "captions, e.g. captions from the template; default: on for 'tiny').",
        preset=lambda c: c.preset.tiny,
    )
    text_dropout: float = setting(
        OPTIMIZATION,
        "Probability that a sample's caption is reduced to the subject token alone (classifier-free "
        "guidance on the text; the subject stays).",
        default=0.05,
        check=PROBABILITY,
    )
    subject_dropout: float = setting(
        OPTIMIZATION,
        "Probability that a sample is trained without its subject (the caption stays).",
        default=0.05,
        check=PROBABILITY,
    )
    both_dropout: float = setting(
        OPTIMIZATION,
        "Probability that a sample is trained with an empty caption and no subject.",
        default=0.05,
        check=(
            PROBABILITY,
            rule(
                lambda c: dropout_sum(c) <= 1.0,
                lambda c: (
                    "--text_dropout + --subject_dropout + --both_dropout must not exceed 1 (they are "
                    f"exclusive outcomes of one draw), got {dropout_sum(c):.3f}."
                ),
            ),
        ),
    )
    use_ema: bool = setting(
        OPTIMIZATION,
        "Keep an exponential moving average of the encoder's weights and export it.",
        default=False,
    )
    ema_decay: float = setting(
        OPTIMIZATION,
        "Decay of the moving average for --use_ema.",
        default=0.9999,
        check=rule(
            lambda c: not c.use_ema or 0.0 < c.ema_decay < 1.0,
            "{flag} must be between 0 and 1 (e.g. 0.9999), got {value}.",
        ),
    )
    snr_gamma: float | None = setting(
        OPTIMIZATION,
        "Min-SNR loss weighting with this gamma (5 is the usual choice); off when not given.",
        check=positive(
            "{flag} must be positive (5 is usual), got {value}; leave it out to turn min-SNR off."
        ),
    )
    noise_offset: float = setting(
        OPTIMIZATION,
        "Add this much per-channel constant noise (noise offset); 0 turns it off.",
        default=0.0,
        check=at_least(0, "{flag} must be 0 or positive, got {value}."),
    )

    checkpointing_steps: int = setting(
        MONITORING,
        "Save the training state (accelerate save_state) and export the encoder every N steps "
        "(default: the preset's).",
        preset=lambda c: c.preset.checkpointing_steps,
        check=AT_LEAST_ONE,
    )
    checkpoints_total_limit: int = setting(
        MONITORING,
        "Keep at most this many checkpoint-N folders, each about 6 GB at SDXL size; older ones are "
        "deleted (default: 3; 0 keeps all).",
        preset=lambda c: c.preset.checkpoints_total_limit,
        check=at_least(0, "{flag} must be 0 (keep all) or a positive number, got {value}."),
    )
    resume_from_checkpoint: str | None = setting(
        MONITORING,
        "Continue a run: a checkpoint-N folder, or 'latest' for the newest in --output_dir (a new "
        "run starts when there is none).",
        check=valid(
            lambda path: path == "latest" or os.path.isdir(path),
            "{flag} {value}: no such folder. Give a checkpoint-N folder written by this trainer, or "
            "'latest'.",
        ),
    )
    validation_steps: int = setting(
        MONITORING,
        "Write a sample grid every N steps (default: the preset's; 0 turns it off).",
        preset=lambda c: c.preset.validation_steps,
        check=at_least(0, "{flag} must be 0 (no sample grids) or a positive number of steps."),
    )
    eval_steps: int = setting(
        MONITORING,
        "Every N steps, evaluate on the --validation_images (use held-out images) with the validation "
        "prompts and seeds: prior and nested attention at λ=1, CLIP-I, face identity (faces, with dlib) "
        "and, for tiny, CLIP-T; metrics and grids go to <output_dir>/eval/step-N and the trackers (0: off).",
        default=0,
        check=at_least(0, "{flag} must be 0 (no evaluation) or a positive number of steps."),
    )
    validation_prompts: tuple[str, ...] = setting(
        MONITORING,
        "Prompts of the sample grid, with {token} for the subject word (default: the preset's).",
        preset=lambda c: c.preset.validation_prompts,
    )
    validation_images: tuple[str, ...] = setting(
        MONITORING,
        "Subject images of the sample grid (default: the inputs of the first two training records).",
        check=valid(
            lambda paths: not missing_files(paths),
            lambda c: (
                f"--validation_images: no such file(s): {', '.join(missing_files(c.validation_images))}."
            ),
        ),
    )
    validation_seeds: tuple[int, ...] = setting(
        MONITORING,
        "Sampling seeds of the sample grid, one column per prompt and seed.",
        default=(0,),
    )
    sample_steps: int = setting(
        MONITORING,
        "Sampler steps for the sample grid (Euler; default: the preset's).",
        preset=lambda c: c.preset.sample_steps,
        check=AT_LEAST_ONE,
    )
    sample_cfg: float = setting(MONITORING, "Classifier-free guidance scale of the sample grid.", default=5.0)
    report_to: str = setting(
        MONITORING,
        "Where accelerate sends the loss curves: 'tensorboard', 'wandb', 'all' or 'none'.",
        default="tensorboard",
        check=valid(
            lambda v: v in REPORT_TO, "{flag} must be tensorboard, wandb, all or none, got {value!r}."
        ),
    )
    logging_dir: str = setting(
        MONITORING,
        "Folder for the tensorboard logs and losses.jsonl, relative to --output_dir.",
        default="logs",
    )
    # Not a flag: the processes of the launch ($WORLD_SIZE), which the global batch is split over.
    num_processes: int = derived(lambda c: launcher_world_size())

    @property
    def preset(self) -> Preset:
        return PRESETS[self.domain]

    @property
    def loss(self) -> LossConfig:
        """What the per-step loss needs, and nothing else."""
        return LossConfig(
            seed=self.seed,
            token=self.token,
            text_dropout=self.text_dropout,
            subject_dropout=self.subject_dropout,
            both_dropout=self.both_dropout,
            noise_offset=self.noise_offset,
            snr_gamma=self.snr_gamma,
        )

    def with_inputs(self, **paths: str | None) -> TrainConfig:
        """A copy with model / data paths filled in (pretrained_model, clip_vision, train_data)."""
        unknown = set(paths) - {"pretrained_model", "clip_vision", "train_data"}
        if unknown:
            raise TypeError(f"with_inputs sets model and data paths only, not {sorted(unknown)}")
        return dataclasses.replace(self, **paths)

    def with_epochs(self, dataset_size: int) -> TrainConfig:
        """A copy whose max_train_steps comes from --num_train_epochs and the data set's size (if given)."""
        if self.num_train_epochs is None:
            return self
        if dataset_size < 1:  # tar shards found at the default data path (parsing saw no --train_data)
            raise SystemExit(
                f"{PREFIX} --num_train_epochs needs the data set's size, which tar shards do not tell (they "
                "stream); give --max_train_steps instead."
            )
        steps = epochs_to_steps(self.num_train_epochs, dataset_size, self.global_batch_size)
        return dataclasses.replace(self, max_train_steps=steps)

    def for_trackers(self) -> dict:
        """The run's settings as scalars (lists joined), for accelerate's trackers."""
        out = {}
        for k, v in dataclasses.asdict(self).items():
            if isinstance(v, (list, tuple)):
                v = " | ".join(str(x) for x in v)
            out[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
        return out


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m training.run` (no preset applied, no validation)."""
    return settings_parser(
        TrainConfig,
        prog="python -m training.run",
        description="Train a nested attention subject encoder for SDXL and export it for the ComfyUI nodes.",
    )


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Flags -> preset defaults -> validation; exits with status 2 and a message on bad input."""
    return parse(TrainConfig, build_parser(), argv)


def resolve_inputs(config: TrainConfig) -> TrainConfig:
    """Find the default model and data paths; stop with one message naming all that is missing, and where."""
    preset = config.preset
    problems = []
    found: dict[str, str | None] = {}
    if not preset.tiny:
        try:
            models_dir = Path(config.models_dir) if config.models_dir else find_comfyui() / "models"
        except ComfyNotFoundError as e:
            models_dir = None
            problems.append(str(e))
        for flag, folder, names, what in (
            ("pretrained_model", "checkpoints", SDXL_CHECKPOINT_NAMES, "the SDXL base checkpoint"),
            ("clip_vision", "clip_vision", CLIP_VISION_H_NAMES, "the CLIP ViT-H/14 vision model"),
        ):
            value = getattr(config, flag)
            if value is not None:
                if not os.path.isfile(value):
                    problems.append(f"--{flag} {value}: no such file ({what}).")
                continue
            candidates = [models_dir / folder / name for name in names] if models_dir else []
            path = next((c for c in candidates if c.is_file()), None)
            if path is None:
                where = f"{models_dir / folder}" if models_dir else f"<ComfyUI>/models/{folder}"
                problems.append(
                    f"{what} was not found: looked for {', '.join(names)} in {where}. Download it there "
                    f"or pass --{flag} PATH."
                )
            else:
                found[flag] = str(path)
    train_data = config.train_data
    if train_data is None and not preset.tiny:
        train_data = found["train_data"] = os.path.join("data", preset.domain)
    if train_data is not None:
        try:
            describe_source(train_data)
        except FileNotFoundError:
            layout = (
                "a folder of images with optional sidecar .txt captions, a manifest.jsonl, or .tar shards"
                if config.domain == "pets"
                else 'a manifest.jsonl with {"input": aligned face crop, "target": in-the-wild photo, '
                '"caption": text} per line (`python -m training.prepare --domain faces PHOTOS OUT` makes '
                "one), or .tar shards"
            )
            problems.append(
                f"the training data {os.path.abspath(train_data)} does not exist. Put {layout} there, "
                "or pass --train_data PATH."
            )
    if problems and config.dry_run and train_data is not None and os.path.exists(train_data):
        # A dry run looks at the data only: missing models are worth saying, not worth stopping for.
        log.warning("%s a real run could not start:\n  - %s", PREFIX, "\n  - ".join(problems))
    elif problems:
        raise SystemExit(f"{PREFIX} cannot start training:\n  - " + "\n  - ".join(problems))
    return config.with_inputs(**found)
