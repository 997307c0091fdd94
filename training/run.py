"""Train a nested attention encoder: `python -m training.run --domain pets|faces|tiny`.

One GPU:            python -m training.run --domain pets
Several / machines: accelerate launch [--multi_gpu --num_processes N ...] -m training.run --domain faces
CPU smoke run:      python -m training.run --domain tiny --output_dir output/tiny

Frozen SDXL (ComfyUI's model code) and CLIP vision; trainable Q-Former and per-layer projections;
the standard noise-prediction loss through the UNet with the very attention patch the nodes
install. Checkpoints (`save_state`) go to <output_dir>/checkpoint-N with the node weight file
<domain>-encoder.safetensors inside; the final weight file is <output_dir>/<domain>-encoder.safetensors.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import re
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

from .comfy_env import ComfyNotFoundError, find_comfyui, has_accelerator
from .presets import CLIP_VISION_H_NAMES, PRESETS, SDXL_CHECKPOINT_NAMES, Preset

log = logging.getLogger("training")
PREFIX = "[nested-attention]"
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")


# ------------------------------------------------------------------------------------------------
# Arguments


def parse_args(args: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training.run",
        description="Train a nested attention subject encoder for SDXL and export it for the ComfyUI nodes.",
    )
    g = p.add_argument_group("domain and data")
    g.add_argument(
        "--domain",
        required=True,
        choices=sorted(PRESETS),
        help="The preset to start from: 'pets' (token 'pet', M=256, input image = target), 'faces' (token "
        "'person', M=1024, aligned face crop as input, in-the-wild photo as target) or 'tiny' (tiny "
        "models and generated data, for a CPU smoke run of about a minute).",
    )
    g.add_argument(
        "--train_data",
        default=None,
        help="The training data: a JSON-lines manifest, a folder of images (captions from sidecar .txt "
        "files), or tar shards (a .tar file, a folder of them, or a glob). Defaults to ./data/<domain> "
        "(for 'tiny', a data set generated into <output_dir>/tiny-data).",
    )
    g.add_argument(
        "--max_train_samples",
        type=int,
        default=None,
        help="Use only the first N records of a manifest or folder (for quick runs and overfitting checks).",
    )
    g.add_argument(
        "--min_image_size",
        type=int,
        default=None,
        help="Images whose shorter side is below this many pixels are listed in the data summary before "
        "training (they are upscaled to the resolution); default: half the resolution.",
    )
    g.add_argument(
        "--dry_run",
        action="store_true",
        help="Resolve every setting, scan the data, write <output_dir>/args.json and a preview of a few "
        "processed samples (encoder input, target crop, caption with the token) to "
        "<output_dir>/data-preview/, then stop before loading any model.",
    )
    g.add_argument(
        "--token",
        default=None,
        help="The subject word that captions' subject words become and that prompts use at inference "
        "(default: the preset's, 'pet' or 'person').",
    )
    g.add_argument(
        "--subject_words",
        type=lambda text: [w.strip() for w in text.split(",") if w.strip()],
        default=None,
        help="Comma-separated words that name the subject in your captions, e.g. 'dog,corgi,puppy'; the "
        "first one in each caption (singular or plural) becomes the token. Default: the preset's list "
        "(pets: dog, cat, puppy, kitten and common breeds; faces: person, man, woman and common roles).",
    )
    g.add_argument(
        "--caption_template",
        default=None,
        help="Caption for images without one, with {token} for the subject word (default: the preset's, "
        "'a photo of a {token}').",
    )
    g.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Training resolution of the target images, a multiple of 64 (default: the preset's first "
        "phase, 512; train phase two with --resolution 1024 --init_encoder <phase-one export>).",
    )
    g.add_argument(
        "--center_crop",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Crop targets to a square at their centre (--no-center_crop: at a random place; default: "
        "the preset's).",
    )
    g.add_argument(
        "--random_flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Mirror targets at random (default: the preset's).",
    )
    g.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=None,
        help="Data loader worker processes per GPU (default: 4; 0 for 'tiny'). A resumed run must use "
        "the same number to see the same data order.",
    )

    g = p.add_argument_group("models")
    g.add_argument(
        "--pretrained_model",
        default=None,
        help="The SDXL base single-file checkpoint (.safetensors). Defaults to a known SDXL base file "
        "in ComfyUI's models/checkpoints.",
    )
    g.add_argument(
        "--clip_vision",
        default=None,
        help="The CLIP ViT-H/14 vision model file the nodes will load (as for IP-Adapter). Defaults to "
        "a known ViT-H/14 file in ComfyUI's models/clip_vision.",
    )
    g.add_argument(
        "--models_dir",
        default=None,
        help="The ComfyUI models folder searched for the defaults above (default: <ComfyUI>/models).",
    )
    g.add_argument(
        "--num_tokens",
        type=int,
        default=None,
        help="M, the number of subject tokens the Q-Former outputs (default: the preset's, 256 for "
        "pets and 1024 for faces).",
    )
    g.add_argument(
        "--alpha",
        type=float,
        default=2.0,
        help="Norm regularization of the nested value, |v*| = alpha |V[s*]| (the paper uses 2).",
    )
    g.add_argument(
        "--init_projections",
        choices=("unet", "random"),
        default="unet",
        help="Start each layer's W_K~ / W_V~ from the UNet's own to_k / to_v ('unet') or at random.",
    )
    g.add_argument(
        "--init_encoder",
        default=None,
        help="Start from an exported encoder file instead of fresh weights (e.g. phase two at 1024 "
        "from the phase-one export). Its M, layers and CLIP vision model must match.",
    )

    g = p.add_argument_group("optimization")
    g.add_argument(
        "--output_dir",
        default=None,
        help="Where checkpoints, sample grids, logs and the exported encoder go (default: output/<domain>).",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seed of everything random: initialization, data order, crops, dropout, noise and timesteps.",
    )
    g.add_argument(
        "--train_batch_size", type=int, default=None, help="Batch size per device (default: the preset's)."
    )
    g.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=None,
        help="Number of batches whose gradients are accumulated before each optimizer step (default: what "
        "makes the preset's global batch for this resolution with this many processes: faces 32 at 512 px "
        "and 16 at 1024, pets 128 and 32; 1 for tiny).",
    )
    g.add_argument(
        "--num_train_epochs",
        type=float,
        default=None,
        help="Train for this many passes over the data instead of --max_train_steps (steps = epochs x "
        "samples / global batch, counted after the data scan).",
    )
    g.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help="Number of optimizer steps to train for (default: the preset's).",
    )
    g.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help="AdamW learning rate after warm-up (default: the preset's, 1e-4).",
    )
    g.add_argument(
        "--lr_scheduler",
        choices=LR_SCHEDULERS,
        default="constant_with_warmup",
        help="Learning rate schedule after the warm-up.",
    )
    g.add_argument(
        "--lr_warmup_steps",
        type=int,
        default=None,
        help="Optimizer steps of linear learning-rate warm-up (default: the preset's).",
    )
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    g.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW decoupled weight decay.")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    g.add_argument(
        "--max_grad_norm",
        type=float,
        default=1.0,
        help="Clip the gradient's global norm to this value (0 turns clipping off).",
    )
    g.add_argument(
        "--mixed_precision",
        choices=("no", "fp16", "bf16"),
        default=None,
        help="Mixed precision of the forward pass; the frozen UNet is stored in this precision too "
        "(default: the preset's, bf16; 'no' on a machine without a GPU).",
    )
    g.add_argument(
        "--gradient_checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Recompute the frozen UNet's blocks in the backward pass to save memory (default: on for "
        "pets and faces).",
    )
    g.add_argument(
        "--cpu_threads",
        type=int,
        default=None,
        help="Intra-op threads of torch on the CPU (default: $OMP_NUM_THREADS or torch's choice; 1 for "
        "'tiny', whose many small ops gain nothing from more threads and slow down several-fold "
        "when the cores are busy).",
    )
    g.add_argument(
        "--ddp_timeout",
        type=int,
        default=3 * 3600,
        help="Seconds a process of a distributed run waits for the others (e.g. while they build the latent "
        "cache) before giving up.",
    )
    g.add_argument(
        "--allow_tf32",
        action="store_true",
        help="Allow TF32 matrix multiplications on Ampere and newer GPUs (faster, slightly less exact).",
    )
    g.add_argument(
        "--cache_latents",
        action="store_true",
        help="Compute VAE latents and CLIP image tokens once, before training, into --cache_dir (not "
        "for tar shards, which may be larger than the disk).",
    )
    g.add_argument(
        "--cache_dir",
        default=None,
        help="Where --cache_latents writes its cache (default: <output_dir>/cache).",
    )
    g.add_argument(
        "--cache_text_embeddings",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Encode each distinct caption once and keep it in memory (for data sets with few distinct "
        "captions, e.g. captions from the template; default: on for 'tiny').",
    )
    g.add_argument(
        "--text_dropout",
        type=float,
        default=0.05,
        help="Probability that a sample's caption is reduced to the subject token alone (classifier-free "
        "guidance on the text; the subject stays).",
    )
    g.add_argument(
        "--subject_dropout",
        type=float,
        default=0.05,
        help="Probability that a sample is trained without its subject (the caption stays).",
    )
    g.add_argument(
        "--both_dropout",
        type=float,
        default=0.05,
        help="Probability that a sample is trained with an empty caption and no subject.",
    )
    g.add_argument(
        "--use_ema",
        action="store_true",
        help="Keep an exponential moving average of the encoder's weights and export it.",
    )
    g.add_argument(
        "--ema_decay", type=float, default=0.9999, help="Decay of the moving average for --use_ema."
    )
    g.add_argument(
        "--snr_gamma",
        type=float,
        default=None,
        help="Min-SNR loss weighting with this gamma (5 is the usual choice); off when not given.",
    )
    g.add_argument(
        "--noise_offset",
        type=float,
        default=0.0,
        help="Add this much per-channel constant noise (noise offset); 0 turns it off.",
    )

    g = p.add_argument_group("checkpoints and monitoring")
    g.add_argument(
        "--checkpointing_steps",
        type=int,
        default=None,
        help="Save the training state (accelerate save_state) and export the encoder every N steps "
        "(default: the preset's).",
    )
    g.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=None,
        help="Keep at most this many checkpoint-N folders; older ones are deleted (default: keep all).",
    )
    g.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="Continue a run: a checkpoint-N folder, or 'latest' for the newest in --output_dir (a new "
        "run starts when there is none).",
    )
    g.add_argument(
        "--validation_steps",
        type=int,
        default=None,
        help="Write a sample grid every N steps (default: the preset's; 0 turns it off).",
    )
    g.add_argument(
        "--validation_prompts",
        nargs="+",
        default=None,
        help="Prompts of the sample grid, with {token} for the subject word (default: the preset's).",
    )
    g.add_argument(
        "--validation_images",
        nargs="+",
        default=None,
        help="Subject images of the sample grid (default: the inputs of the first two training records).",
    )
    g.add_argument(
        "--validation_seeds",
        nargs="+",
        type=int,
        default=[0],
        help="Sampling seeds of the sample grid, one column per prompt and seed.",
    )
    g.add_argument(
        "--sample_steps",
        type=int,
        default=None,
        help="Sampler steps for the sample grid (Euler; default: the preset's).",
    )
    g.add_argument(
        "--sample_cfg", type=float, default=5.0, help="Classifier-free guidance scale of the sample grid."
    )
    g.add_argument(
        "--report_to",
        default="tensorboard",
        help="Where accelerate sends the loss curves: 'tensorboard', 'wandb', 'all' or 'none'.",
    )
    g.add_argument(
        "--logging_dir",
        default="logs",
        help="Folder for the tensorboard logs and losses.jsonl, relative to --output_dir.",
    )

    args = p.parse_args(args)
    if args.num_train_epochs is not None and args.max_train_steps is not None:
        p.error("give --num_train_epochs or --max_train_steps, not both.")
    if args.num_train_epochs is not None and args.num_train_epochs <= 0:
        p.error(f"--num_train_epochs must be positive, got {args.num_train_epochs}.")
    apply_preset(args, PRESETS[args.domain])
    check_args(p, args)
    return args


def apply_preset(args: argparse.Namespace, preset: Preset) -> None:
    """Fill every flag left unset from the domain preset."""
    defaults = {
        "token": preset.token,
        "caption_template": preset.caption_template,
        "resolution": preset.resolutions[0],
        "center_crop": preset.center_crop,
        "random_flip": preset.random_flip,
        "num_tokens": preset.num_queries,
        "train_batch_size": preset.train_batch_size,
        "max_train_steps": preset.max_train_steps,
        "learning_rate": preset.learning_rate,
        "lr_warmup_steps": preset.lr_warmup_steps,
        "gradient_checkpointing": preset.gradient_checkpointing,
        "checkpointing_steps": preset.checkpointing_steps,
        "validation_steps": preset.validation_steps,
        "sample_steps": preset.sample_steps,
        "dataloader_num_workers": 0 if preset.tiny else 4,
        "cache_text_embeddings": preset.tiny,
        "validation_prompts": list(preset.validation_prompts),
        "output_dir": os.path.join("output", preset.domain),
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.checkpoints_total_limit is None:
        args.checkpoints_total_limit = preset.checkpoints_total_limit
    from .schedule import fill_accumulation

    fill_accumulation(args, preset.global_batch_sizes, preset.resolutions)
    if args.mixed_precision is None:
        args.mixed_precision = preset.mixed_precision if has_accelerator() else "no"
    if args.cpu_threads is None and preset.tiny and "OMP_NUM_THREADS" not in os.environ:
        args.cpu_threads = 1
    if args.cache_dir is None:
        args.cache_dir = os.path.join(args.output_dir, "cache")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad values and combinations right after parsing, with what to do instead."""

    def positive(name: str) -> None:
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}.")

    for name in (
        "train_batch_size",
        "gradient_accumulation_steps",
        "max_train_steps",
        "checkpointing_steps",
        "num_tokens",
        "sample_steps",
    ):
        positive(name)
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        p.error(
            "--checkpoints_total_limit must be at least 1 (or left out to keep all), "
            f"got {args.checkpoints_total_limit}."
        )
    if args.validation_steps < 0:
        p.error("--validation_steps must be 0 (no sample grids) or a positive number of steps.")
    if args.ddp_timeout < 1:
        p.error("--ddp_timeout must be at least 1 second.")
    if args.cpu_threads is not None and args.cpu_threads < 1:
        p.error("--cpu_threads must be at least 1.")
    if args.dataloader_num_workers < 0:
        p.error("--dataloader_num_workers must be 0 or more.")
    if args.resolution < 64 or args.resolution % 64:
        p.error(
            "--resolution must be a positive multiple of 64 (SDXL's latents are 1/8 of it and the "
            f"UNet halves them twice), got {args.resolution}."
        )
    if not args.learning_rate > 0:
        p.error(f"--learning_rate must be positive, got {args.learning_rate}.")
    if args.lr_warmup_steps < 0:
        p.error("--lr_warmup_steps must be 0 or more.")
    if args.max_grad_norm < 0:
        p.error("--max_grad_norm must be 0 (no clipping) or positive.")
    if not args.alpha > 0:
        p.error(f"--alpha must be positive, got {args.alpha}.")
    drops = {
        "text_dropout": args.text_dropout,
        "subject_dropout": args.subject_dropout,
        "both_dropout": args.both_dropout,
    }
    for name, value in drops.items():
        if not 0.0 <= value <= 1.0:
            p.error(f"--{name} is a probability in [0, 1], got {value}.")
    if sum(drops.values()) > 1.0:
        p.error(
            f"--text_dropout + --subject_dropout + --both_dropout must not exceed 1 (they are exclusive "
            f"outcomes of one draw), got {sum(drops.values()):.3f}."
        )
    if args.use_ema and not 0.0 < args.ema_decay < 1.0:
        p.error(f"--ema_decay must be between 0 and 1 (e.g. 0.9999), got {args.ema_decay}.")
    if args.snr_gamma is not None and not args.snr_gamma > 0:
        p.error(
            f"--snr_gamma must be positive (5 is usual), got {args.snr_gamma}; "
            "leave it out to turn min-SNR off."
        )
    if args.noise_offset < 0:
        p.error(f"--noise_offset must be 0 or positive, got {args.noise_offset}.")
    if "{token}" not in args.caption_template:
        p.error(
            "--caption_template must contain {token} (where the subject word goes), "
            f"got {args.caption_template!r}."
        )
    if not re.fullmatch(r"[A-Za-z][A-Za-z\-']*", args.token):
        p.error(f"--token must be one plain word (letters), got {args.token!r}.")
    if args.mixed_precision == "fp16" and not has_accelerator():
        p.error("--mixed_precision fp16 needs a GPU; on the CPU use 'no' (or bf16).")
    if PRESETS[args.domain].tiny:
        for flag in ("pretrained_model", "clip_vision", "models_dir"):
            if getattr(args, flag) is not None:
                p.error(
                    f"--{flag} cannot be used with --domain tiny, which builds its tiny models in code; "
                    "use --domain pets or faces to train on SDXL."
                )
    if args.cache_latents:
        if args.random_flip:
            p.error(
                "--cache_latents stores one crop of each image, so it cannot be combined with --random_flip; "
                "add --no-random_flip or drop --cache_latents."
            )
        if args.train_data is not None:
            from .data import find_shards

            if find_shards(args.train_data):
                p.error(
                    "--cache_latents cannot be used with tar shards (a streamed data set may be larger "
                    "than the disk); drop --cache_latents, or use a manifest or image folder."
                )
    if args.max_train_samples is not None:
        if args.max_train_samples < 1:
            p.error("--max_train_samples must be at least 1.")
        if args.train_data is not None:
            from .data import find_shards

            if find_shards(args.train_data):
                p.error(
                    "--max_train_samples applies to manifests and image folders, not to streamed tar shards."
                )
    if args.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(args.resume_from_checkpoint):
        p.error(
            f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such folder. "
            "Give a checkpoint-N folder "
            "written by this trainer, or 'latest'."
        )
    if args.init_encoder is not None and not os.path.isfile(args.init_encoder):
        p.error(
            f"--init_encoder {args.init_encoder}: no such file. "
            "Give an encoder .safetensors exported by this trainer."
        )
    if args.validation_images:
        missing = [path for path in args.validation_images if not os.path.isfile(path)]
        if missing:
            p.error(f"--validation_images: no such file(s): {', '.join(missing)}.")
    if args.report_to not in ("tensorboard", "wandb", "all", "none"):
        p.error(f"--report_to must be tensorboard, wandb, all or none, got {args.report_to!r}.")


# ------------------------------------------------------------------------------------------------
# Finding the models and the data


def resolve_inputs(args: argparse.Namespace, preset: Preset) -> None:
    """Fill in default model and data paths; stop with one message naming all that is missing, and where."""
    problems = []
    if not preset.tiny:
        try:
            models_dir = Path(args.models_dir) if args.models_dir else find_comfyui() / "models"
        except ComfyNotFoundError as e:
            models_dir = None
            problems.append(str(e))
        for flag, folder, names, what in (
            ("pretrained_model", "checkpoints", SDXL_CHECKPOINT_NAMES, "the SDXL base checkpoint"),
            ("clip_vision", "clip_vision", CLIP_VISION_H_NAMES, "the CLIP ViT-H/14 vision model"),
        ):
            value = getattr(args, flag)
            if value is not None:
                if not os.path.isfile(value):
                    problems.append(f"--{flag} {value}: no such file ({what}).")
                continue
            candidates = [models_dir / folder / name for name in names] if models_dir else []
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                where = f"{models_dir / folder}" if models_dir else f"<ComfyUI>/models/{folder}"
                problems.append(
                    f"{what} was not found: looked for {', '.join(names)} in {where}. Download it there "
                    f"or pass --{flag} PATH."
                )
            else:
                setattr(args, flag, str(found))
    if args.train_data is None and not preset.tiny:
        args.train_data = os.path.join("data", preset.domain)
    if args.train_data is not None:
        from .data import describe_source

        try:
            describe_source(args.train_data)
        except FileNotFoundError:
            layout = (
                "a folder of images with optional sidecar .txt captions, a manifest.jsonl, or .tar shards"
                if args.domain == "pets"
                else 'a manifest.jsonl with {"input": aligned face crop, "target": in-the-wild photo, '
                '"caption": text} per line (`python -m training.prepare --domain faces PHOTOS OUT` makes '
                "one), or .tar shards"
            )
            problems.append(
                f"the training data {os.path.abspath(args.train_data)} does not exist. Put {layout} there, "
                "or pass --train_data PATH."
            )
    if problems and args.dry_run and args.train_data is not None and os.path.exists(args.train_data):
        # A dry run looks at the data only: missing models are worth saying, not worth stopping for.
        log.warning("%s a real run could not start:\n  - %s", PREFIX, "\n  - ".join(problems))
    elif problems:
        raise SystemExit(f"{PREFIX} cannot start training:\n  - " + "\n  - ".join(problems))


# ------------------------------------------------------------------------------------------------
# Helpers


def lr_lambda(name: str, warmup: int, total: int):
    def f(step: int) -> float:
        if name != "constant" and step < warmup:
            return (step + 1) / (warmup + 1)
        if name in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if name == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def checkpoint_steps(output_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in output_dir.glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def flat_config(args: argparse.Namespace) -> dict:
    """The run's flags for the trackers (scalars only)."""
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, (list, tuple)):
            v = " | ".join(str(x) for x in v)
        out[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


# ------------------------------------------------------------------------------------------------
# Training


def main(args: argparse.Namespace) -> dict:
    """Train; returns a summary {"global_step", "losses", "encoder_path", "output_dir"}."""
    preset = PRESETS[args.domain]
    # Our messages at INFO; ComfyUI's (root logger) and accelerate's only from WARNING on.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("training").setLevel(logging.INFO)
    resolve_inputs(args, preset)

    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration
    from tqdm.auto import tqdm

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
        cpu=not has_accelerator(),
        # Ranks wait for each other while one builds its part of the latent cache or draws a sample grid.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))],
    )
    # ComfyUI is imported only now, so its device choice sees the device accelerate gave this process.
    from nested_attention import load_encoder, save_encoder

    from . import data as data_lib
    from . import models as models_lib

    if args.cpu_threads is not None:
        torch.set_num_threads(args.cpu_threads)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    is_main = accelerator.is_main_process
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    rank, world = accelerator.process_index, accelerator.num_processes

    # The data, read and checked once before any model loads (training.scan: one summary, unreadable dropped).
    if preset.tiny and args.train_data is None:
        from .tiny import make_tiny_dataset

        args.train_data = str(output_dir / "tiny-data")
        if is_main:
            make_tiny_dataset(args.train_data, size=max(args.resolution, 64))
        accelerator.wait_for_everyone()
    captions = data_lib.CaptionRule(
        token=args.token,
        subject_words=tuple(args.subject_words or preset.subject_words) + (args.token,),
        template=args.caption_template,
    )
    from .scan import scan_data

    scan = scan_data(
        args.train_data,
        captions,
        min_size=args.min_image_size or args.resolution // 2,
        max_samples=args.max_train_samples,
        progress=is_main,
    )
    kind, source, records = scan.kind, scan.source, scan.records
    if args.num_train_epochs is not None:
        from .schedule import epochs_to_steps

        args.max_train_steps = epochs_to_steps(args, scan.readable, accelerator.num_processes)
        if is_main:
            log.info("%s %g epochs of %d samples: %d steps", PREFIX, args.num_train_epochs, scan.readable,
                     args.max_train_steps)
    if kind != "shards" and not records:
        raise SystemExit(
            f"{PREFIX} no readable training images in {args.train_data} ({kind}); expected "
            f"{', '.join(data_lib.IMAGE_EXTENSIONS)} files or manifest lines."
        )
    if args.dry_run:  # settings and a preview of processed samples, no model loaded
        from .preview import dry_run

        return dry_run(args, scan, captions, output_dir) if is_main else {"dry_run": True}

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision)
    try:
        frozen = models_lib.load_frozen(
            tiny=preset.tiny,
            checkpoint=args.pretrained_model,
            clip_vision_path=args.clip_vision,
            weight_dtype=weight_dtype,
            seed=0,
        )
    except ValueError as e:  # a file that is not SDXL base / not a CLIP vision model: say which, no traceback
        raise SystemExit(f"{PREFIX} cannot start training: {e}") from e
    base = frozen.base

    # (the tar stream is built later, once the resume position is known)
    sample_config = data_lib.SampleConfig(
        resolution=args.resolution,
        clip_size=frozen.clip_vision_spec.image_size,
        center_crop=args.center_crop,
        random_flip=args.random_flip,
        captions=captions,
        seed=args.seed,
    )

    # The trainable encoder.
    qformer = copy.deepcopy(preset.qformer)
    qformer.num_queries = args.num_tokens
    if args.init_encoder:
        encoder = load_encoder(args.init_encoder)
        cfg = encoder.config
        if (
            cfg.layers != frozen.layers
            or cfg.num_tokens != args.num_tokens
            or not cfg.clip_vision.same_architecture(frozen.clip_vision_spec)
        ):
            raise SystemExit(
                f"{PREFIX} --init_encoder {args.init_encoder} was trained for M={cfg.num_tokens}, "
                f"{len(cfg.layers)} layers and CLIP vision {cfg.clip_vision.describe()}; this run has "
                f"M={args.num_tokens}, {len(frozen.layers)} layers and {frozen.clip_vision_spec.describe()}."
            )
        encoder.config.token, encoder.config.alpha = args.token, args.alpha
        encoder.requires_grad_(True).train()
    else:
        encoder = models_lib.make_encoder(
            domain=preset.domain,
            token=args.token,
            qformer=qformer,
            frozen=frozen,
            alpha=args.alpha,
            init_from_unet=args.init_projections == "unet",
            seed=args.seed,
        )
    encoder.float().train()
    if args.gradient_checkpointing:
        models_lib.enable_gradient_checkpointing(base.diffusion_model)
    module = models_lib.NestedTrainingModule(encoder, base)

    optimizer = torch.optim.AdamW(
        encoder.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    # accelerate steps a prepared scheduler once per process per optimizer step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(args.lr_scheduler, args.lr_warmup_steps * world, args.max_train_steps * world)
    )
    ema = models_lib.EMA(encoder, args.ema_decay) if args.use_ema else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    module, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
    encoder = accelerator.unwrap_model(module).encoder

    def export_encoder(path: Path, step: int) -> None:
        """The node weight file (DESIGN 5): the EMA weights when --use_ema, else the trained ones."""
        out = encoder
        if ema is not None:
            out = copy.deepcopy(encoder)
            ema.copy_to(out)
        save_encoder(
            str(path),
            out,
            extra={
                "trainer_step": str(step),
                "trainer_resolution": str(args.resolution),
                "trainer_domain": args.domain,
            },
        )
        log.info("%s exported %s", PREFIX, path)

    def save_hook(models, weights, folder):
        if accelerator.is_main_process:
            export_encoder(Path(folder) / f"{preset.domain}-encoder.safetensors", global_step)

    accelerator.register_save_state_pre_hook(save_hook)

    # Resume.
    global_step, batches_done = 0, 0
    if args.resume_from_checkpoint:
        path = None
        if args.resume_from_checkpoint == "latest":
            found = checkpoint_steps(output_dir)
            path = found[-1][1] if found else None
            if path is None:
                log.info("%s no checkpoint in %s; starting a new run", PREFIX, output_dir)
        else:
            path = Path(args.resume_from_checkpoint)
        if path is not None:
            if args.init_encoder:
                log.info("%s resuming from %s; --init_encoder is not used", PREFIX, path)
            accelerator.load_state(str(path))
            state_file = path / f"trainer_state-{rank}.json"
            state = json.loads(state_file.read_text()) if state_file.is_file() else {}
            global_step = int(state.get("global_step", re.fullmatch(r"checkpoint-(\d+)", path.name).group(1)))
            batches_done = int(state.get("batches", global_step * args.gradient_accumulation_steps))
            from .schedule import resume_warnings

            for warning in resume_warnings(state, args, world) if is_main else ():
                log.warning("%s %s", PREFIX, warning)
            log.info("%s resumed from %s at step %d", PREFIX, path, global_step)

    # Data loader, from the resume position on.
    loader_kwargs = dict(
        num_workers=args.dataloader_num_workers,
        collate_fn=data_lib.collate,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )
    if kind == "shards":
        stream = data_lib.TarShardStream(
            source, sample_config, args.train_batch_size, rank=rank, world=world, start_batch=batches_done
        )
        loader = torch.utils.data.DataLoader(stream, batch_size=args.train_batch_size, **loader_kwargs)
    else:
        if args.cache_latents:
            cache = build_cache(
                accelerator, frozen, records, sample_config, Path(args.cache_dir), args, data_lib
            )
            dataset = data_lib.CachedDataset(cache, records, captions)
        else:
            dataset = data_lib.RecordDataset(records, sample_config)
        sampler = data_lib.StepBatchSampler(
            len(dataset), args.train_batch_size, args.seed, rank=rank, world=world, start=batches_done
        )
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **loader_kwargs)

    text = models_lib.TextEncoder(frozen.clip, args.token, cache=args.cache_text_embeddings)
    validation_images = load_validation_images(args, records, data_lib) if args.validation_steps else []
    validation_prompts = [prompt.format(token=args.token) for prompt in args.validation_prompts]

    if is_main and args.report_to != "none":
        accelerator.init_trackers("nested-attention", config=flat_config(args))
    loss_log = output_dir / args.logging_dir / "losses.jsonl"
    if is_main:
        loss_log.parent.mkdir(parents=True, exist_ok=True)

    def sample(step: int) -> None:
        if not (is_main and validation_images):
            return
        out = copy.deepcopy(encoder)
        if ema is not None:
            ema.copy_to(out)
        from .samples import sample_grid

        path = sample_grid(
            frozen,
            out,
            text,
            validation_images,
            validation_prompts,
            args.validation_seeds,
            args.resolution,
            args.sample_steps,
            args.sample_cfg,
            output_dir / f"samples-{step}.png",
        )
        log.info("%s sample grid %s", PREFIX, path)

    def save_checkpoint(step: int) -> None:
        if is_main and args.checkpoints_total_limit is not None:
            existing = [p for s, p in checkpoint_steps(output_dir) if s != step]
            for _, old in zip(range(len(existing) - args.checkpoints_total_limit + 1), existing):
                log.info(
                    "%s removing old checkpoint %s (--checkpoints_total_limit %d)",
                    PREFIX,
                    old,
                    args.checkpoints_total_limit,
                )
                shutil.rmtree(old)
        folder = output_dir / f"checkpoint-{step}"
        accelerator.save_state(str(folder))  # the save hook exports the encoder into it
        accelerator.wait_for_everyone()
        folder.mkdir(parents=True, exist_ok=True)  # machines without a shared file system
        # Per process: where its data stream stands (for an exact resume), and what it holds.
        (folder / f"trainer_state-{rank}.json").write_text(
            json.dumps(
                {
                    "global_step": step,
                    "batches": batches_done,
                    "world": world,
                    "train_batch_size": args.train_batch_size,
                    "gradient_accumulation_steps": args.gradient_accumulation_steps,
                    "weights_sha256": weights_fingerprint(encoder),
                    "initial_weights_sha256": initial_fingerprint,
                    "batch_keys": last_keys,
                },
                indent=1,
            )
        )

    log.info(
        "%s training %s: %d steps, batch %d x %d accumulation x %d processes, resolution %d, "
        "M=%d, %d layers, "
        "%d records (%s)",
        PREFIX,
        preset.domain,
        args.max_train_steps,
        args.train_batch_size,
        args.gradient_accumulation_steps,
        world,
        args.resolution,
        args.num_tokens,
        len(frozen.layers),
        len(records),
        kind,
    )
    initial_fingerprint = weights_fingerprint(encoder)
    last_keys: list = []
    progress = tqdm(total=args.max_train_steps, initial=global_step, desc="steps", disable=not is_main)
    losses: dict[int, float] = {}
    step_loss = 0.0
    batches = iter(loader)
    device = accelerator.device
    started = time.perf_counter()
    empty_in_a_row = 0
    while global_step < args.max_train_steps:
        batch = next(batches)
        batches_done += 1
        if batch is None:  # every image of the batch was unreadable (logged by the data set)
            empty_in_a_row += 1
            if empty_in_a_row >= 100:
                raise SystemExit(
                    f"{PREFIX} 100 batches in a row had no readable image; check the training data "
                    f"{args.train_data} (the warnings above name the files)."
                )
            continue
        empty_in_a_row = 0
        last_keys = list(batch["key"])
        # Keep ComfyUI's memory management from leaving the UNet offloaded after VAE / CLIP / sampling use.
        comfy_load(frozen.unet)
        with accelerator.accumulate(module):
            loss = training_loss(module, frozen, text, batch, args, rank, batches_done - 1, device)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(module.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        step_loss += accelerator.gather(loss.detach()[None]).mean().item() / args.gradient_accumulation_steps
        if accelerator.sync_gradients:
            if ema is not None:
                ema.update(encoder)
            global_step += 1
            progress.update(1)
            lr = scheduler.get_last_lr()[0]
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            losses[global_step] = step_loss
            if args.report_to != "none":
                accelerator.log({"loss": step_loss, "lr": lr}, step=global_step)
            if is_main:
                with open(loss_log, "a") as f:
                    f.write(json.dumps({"step": global_step, "loss": step_loss, "lr": lr}) + "\n")
            step_loss = 0.0
            if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
                save_checkpoint(global_step)
            if args.validation_steps and (
                global_step % args.validation_steps == 0 or global_step == args.max_train_steps
            ):
                sample(global_step)
    progress.close()

    accelerator.wait_for_everyone()
    final = output_dir / f"{preset.domain}-encoder.safetensors"
    if is_main:
        export_encoder(final, global_step)
        log.info(
            "%s done: %d steps in %.1f s; encoder for the nodes: %s "
            "(copy it to ComfyUI/models/nested_attention)",
            PREFIX,
            global_step,
            time.perf_counter() - started,
            final,
        )
    accelerator.end_training()
    return {
        "global_step": global_step,
        "losses": losses,
        "encoder_path": str(final),
        "output_dir": str(output_dir),
    }


def weights_fingerprint(module) -> str:
    """SHA-256 of a module's parameters: equal on every process of a distributed run after each step."""
    import hashlib

    digest = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def comfy_load(unet) -> None:
    import comfy.model_management

    comfy.model_management.load_models_gpu([unet], force_full_load=True)


def training_loss(
    module, frozen, text, batch: dict, args: argparse.Namespace, rank: int, batch_index: int, device
):
    """The epsilon-prediction loss of one batch; dropout, noise and timesteps from (seed, rank, batch)."""
    import torch

    from .data import mix_seed
    from .models import align_subjects, sdxl_adm

    base = frozen.base
    generator = torch.Generator().manual_seed(mix_seed(args.seed, "batch", rank, batch_index))
    captions = list(batch["caption"])
    n = len(captions)
    with torch.no_grad():
        if "latents" in batch:
            latents = batch["latents"].float()
            clip_tokens = batch["clip_tokens"]
        else:
            latents = frozen.vae.encode(batch["pixels"])
            clip_tokens = frozen.clip_vision.encode_image(batch["clip_pixels"], crop=True)[
                "last_hidden_state"
            ]
        latents = base.process_latent_in(latents.float().cpu())

    # Classifier-free dropout: one draw per sample picks text only, subject only, both, or neither.
    u = torch.rand(n, generator=generator)
    t_drop, s_drop, b_drop = args.text_dropout, args.subject_dropout, args.both_dropout
    text_only = u < t_drop
    subject_only = (u >= t_drop) & (u < t_drop + s_drop)
    both = (u >= t_drop + s_drop) & (u < t_drop + s_drop + b_drop)
    for i in range(n):
        if text_only[i]:
            captions[i] = args.token  # the prompt is the subject alone
        elif both[i]:
            captions[i] = ""
    keep_subject = ~(subject_only | both)
    context, pooled, positions = text.encode(captions)
    adm = sdxl_adm(base, pooled, batch["time_ids"])

    noise = torch.randn(latents.shape, generator=generator)
    if args.noise_offset:
        noise = noise + args.noise_offset * torch.randn(
            latents.shape[0], latents.shape[1], 1, 1, generator=generator
        )
    timesteps = torch.randint(0, len(base.model_sampling.sigmas), (n,), generator=generator)
    sigmas = base.model_sampling.sigmas.cpu()[timesteps].float()
    x_noisy = latents + noise * sigmas.view(-1, 1, 1, 1)  # ComfyUI's EPS noise_scaling
    context, groups = align_subjects(context, positions, keep_subject)

    eps = module(
        clip_tokens.to(device),
        x_noisy.to(device),
        sigmas.to(device),
        context.to(device),
        adm.to(device),
        groups,
    )
    mse = (eps.float() - noise.to(device)).pow(2).mean(dim=(1, 2, 3))
    if args.snr_gamma is not None:  # min-SNR for epsilon prediction: min(SNR, gamma) / SNR, SNR = 1 / sigma^2
        mse = mse * (args.snr_gamma * sigmas.to(device) ** 2).clamp(max=1.0)
    return mse.mean()


def load_validation_images(args, records, data_lib) -> list:
    """(H, W, 3) images for the sample grid: --validation_images, else the first two training inputs."""
    sources = [(path, None) for path in args.validation_images or []]
    if not sources:  # the first two training inputs as the encoder sees them (masks applied; shards too)
        sources = [(r.input, r.mask) for r in records[:2] or data_lib.first_records(args.train_data, 2)]
    images = []
    for source, mask in sources:
        try:
            images.append(data_lib.to_comfy_image(data_lib.open_image(source, mask)))
        except data_lib.BadImage as e:
            log.warning(
                "%s validation image %s skipped: %s", PREFIX, source if isinstance(source, str) else "?", e
            )
    return images


def build_cache(accelerator, frozen, records, config, root: Path, args, data_lib) -> Path:
    """VAE latents and CLIP tokens of every record, computed once (split over processes) into safetensors."""
    import hashlib

    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    identity = json.dumps(
        {
            "records": [
                [
                    r.key,
                    r.input if isinstance(r.input, str) else len(r.input),
                    r.target if isinstance(r.target, str) or r.target is None else len(r.target),
                ]
                for r in records
            ],
            "resolution": config.resolution,
            "center_crop": config.center_crop,
            "seed": config.seed,
            "model": args.pretrained_model or "tiny",
            "clip_vision": frozen.clip_vision_spec.describe(),
        },
        sort_keys=True,
    )
    folder = root / hashlib.sha256(identity.encode()).hexdigest()[:16]
    done = folder / "complete.json"
    if done.is_file():
        log.info("%s using the latent cache %s", PREFIX, folder)
        return folder
    rank, world = accelerator.process_index, accelerator.num_processes
    folder.mkdir(parents=True, exist_ok=True)
    mine = list(range(rank, len(records), world))
    rows = {"index": [], "latents": [], "clip_tokens": [], "time_ids": []}
    chunk = max(1, args.train_batch_size)
    for start in tqdm(
        range(0, len(mine), chunk), desc="caching latents", disable=not accelerator.is_main_process
    ):
        samples = [
            (i, data_lib.load_sample(records[i], config, position=i)) for i in mine[start : start + chunk]
        ]
        samples = [(i, s) for i, s in samples if s is not None]
        if not samples:
            continue
        with torch.no_grad():
            pixels = torch.stack([s["pixels"] for _, s in samples])
            latents = frozen.vae.encode(pixels).float().cpu()
            clip = frozen.clip_vision.encode_image(
                torch.stack([s["clip_pixels"] for _, s in samples]), crop=True
            )["last_hidden_state"].cpu()
        rows["index"].append(torch.tensor([i for i, _ in samples]))
        rows["latents"].append(latents)
        rows["clip_tokens"].append(clip)
        rows["time_ids"].append(torch.stack([s["time_ids"] for _, s in samples]))
    if rows["index"]:
        save_file(
            {k: torch.cat(v).contiguous() for k, v in rows.items()},
            str(folder / f"cache-{rank:04d}.safetensors"),
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        done.write_text(json.dumps({"records": len(records), "processes": world}))
    accelerator.wait_for_everyone()
    return folder


if __name__ == "__main__":
    main(parse_args())
