"""The trainer's one frozen config: command line, then the domain preset, then validation.

`parse_args(argv)` parses the flags (`training.flags`), fills every flag left unset from the
preset (`training.presets`) and rejects bad values and combinations right away (argparse's exit
status 2, with what to do instead). What it returns is a `TrainConfig`, frozen: nothing changes it
afterwards. `resolve_inputs` (the run's first step) makes a new one with the model and data
paths found.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NoReturn, Optional

from .comfy_env import ComfyNotFoundError, find_comfyui, has_accelerator
from .flags import REPORT_TO, build_parser
from .loss import LossConfig
from .presets import CLIP_VISION_H_NAMES, PRESETS, SDXL_CHECKPOINT_NAMES, Preset
from .schedule import batch_sizes, epochs_to_steps, launcher_world_size

PREFIX = "[nested-attention]"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of one training run: one field per flag (see `python -m training.run --help`), plus
    num_processes, the launch's, which the global batch is split over."""

    # domain and data
    domain: str  # the preset: pets, faces or tiny
    train_data: Optional[str]  # manifest, image folder or tar shards; None: tiny's generated data
    max_train_samples: Optional[int]  # use only the first N records
    min_image_size: int  # images with a shorter side below this are listed in the data summary
    dry_run: bool  # scan the data, write args.json and data-preview/, stop before loading models
    token: str  # the subject word s*
    subject_words: tuple[str, ...]  # caption words that become the token (training.captions)
    caption_template: str  # caption for images without one, with {token}
    resolution: int  # training resolution of the targets, a multiple of 64
    center_crop: bool  # crop targets at their centre (else at random)
    random_flip: bool  # mirror targets at random
    dataloader_num_workers: int  # data loader processes per GPU
    # models
    pretrained_model: Optional[str]  # SDXL base single-file checkpoint
    clip_vision: Optional[str]  # CLIP ViT-H/14 vision model file
    models_dir: Optional[str]  # ComfyUI models folder searched for the two above
    num_tokens: int  # M, the subject tokens the Q-Former outputs
    alpha: float  # norm regularization of the nested value
    init_projections: str  # W_K~ / W_V~ start: "unet" or "random"
    init_from: Optional[str]  # trained weights of any supported layout to start from (M from the file)
    init_encoder: Optional[str]  # an exported encoder file to start from
    # optimization
    output_dir: str  # checkpoints, sample grids, logs, the export
    seed: int  # seed of everything random
    train_batch_size: int  # batch size per device
    global_batch_size: int  # samples per optimizer step = train_batch_size x num_processes x accumulation
    gradient_accumulation_steps: int  # batches per optimizer step
    max_train_steps: Optional[int]  # optimizer steps; None until the data is read, with num_train_epochs
    num_train_epochs: Optional[float]  # passes over the data that set max_train_steps (with_epochs)
    learning_rate: float  # AdamW learning rate after warm-up
    lr_scheduler: str  # schedule after the warm-up
    lr_warmup_steps: int  # optimizer steps of linear warm-up
    adam_beta1: float
    adam_beta2: float
    adam_weight_decay: float
    adam_epsilon: float
    max_grad_norm: float  # global-norm clipping, 0 off
    mixed_precision: str  # no, fp16 or bf16
    gradient_checkpointing: bool  # recompute the frozen UNet's blocks in the backward
    cpu_threads: Optional[int]  # torch intra-op threads; None: torch's choice
    ddp_timeout: int  # seconds a process waits for the others
    allow_tf32: bool  # TF32 matmuls on Ampere and newer
    cache_latents: bool  # VAE latents and CLIP tokens computed once, before training
    cache_dir: str  # where the latent cache goes
    cache_text_embeddings: bool  # encode each distinct caption once
    text_dropout: float  # P(caption reduced to the subject token)
    subject_dropout: float  # P(no subject)
    both_dropout: float  # P(empty caption and no subject)
    use_ema: bool  # keep and export an EMA of the encoder
    ema_decay: float
    snr_gamma: Optional[float]  # min-SNR weighting; None off
    noise_offset: float  # per-channel constant noise, 0 off
    # checkpoints and monitoring
    checkpointing_steps: int  # save_state and export every N steps
    checkpoints_total_limit: int  # keep at most this many checkpoint-N folders; 0 keeps all
    resume_from_checkpoint: Optional[str]  # a checkpoint-N folder or "latest"
    validation_steps: int  # sample grid every N steps, 0 off
    eval_steps: int  # evaluation (training.evaluation) every N steps, 0 off
    validation_prompts: tuple[str, ...]  # with {token}
    validation_images: tuple[str, ...]  # subject images of the grid; (): the first two training inputs
    validation_seeds: tuple[int, ...]  # one column per prompt and seed
    sample_steps: int  # Euler steps of the grid
    sample_cfg: float  # CFG scale of the grid
    report_to: str  # tensorboard, wandb, all or none
    logging_dir: str  # relative to output_dir
    num_processes: int  # not a flag: the processes of the launch ($WORLD_SIZE), the global batch's split

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

    def with_inputs(self, **paths: Optional[str]) -> "TrainConfig":
        """A copy with model / data paths filled in (pretrained_model, clip_vision, train_data)."""
        unknown = set(paths) - {"pretrained_model", "clip_vision", "train_data"}
        if unknown:
            raise TypeError(f"with_inputs sets model and data paths only, not {sorted(unknown)}")
        return dataclasses.replace(self, **paths)

    def with_epochs(self, dataset_size: int) -> "TrainConfig":
        """A copy whose max_train_steps comes from --num_train_epochs and the data set's size (if given)."""
        if self.num_train_epochs is None:
            return self
        if dataset_size < 1:  # tar shards found at the default data path (check_config saw no --train_data)
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


def parse_args(argv: Optional[list[str]] = None) -> TrainConfig:
    """Flags -> preset defaults -> validation; exits with status 2 and a message on bad input."""
    parser = build_parser()
    config = from_flags(parser.parse_args(argv))
    check_config(config, parser.error)
    return config


def from_flags(flags: argparse.Namespace) -> TrainConfig:
    """Fill every flag left unset from the domain preset (the namespace itself is not changed)."""
    preset = PRESETS[flags.domain]
    values = dict(vars(flags))
    values["num_processes"] = launcher_world_size()
    defaults = {
        "token": preset.token,
        "caption_template": preset.caption_template,
        "resolution": preset.resolutions[0],
        "center_crop": preset.center_crop,
        "random_flip": preset.random_flip,
        "num_tokens": preset.num_tokens,
        "checkpoints_total_limit": preset.checkpoints_total_limit,
        "learning_rate": preset.learning_rate,
        "lr_warmup_steps": preset.lr_warmup_steps,
        "gradient_checkpointing": preset.gradient_checkpointing,
        "checkpointing_steps": preset.checkpointing_steps,
        "validation_steps": preset.validation_steps,
        "sample_steps": preset.sample_steps,
        "dataloader_num_workers": 0 if preset.tiny else 4,
        "cache_text_embeddings": preset.tiny,
        "validation_prompts": preset.validation_prompts,
        "output_dir": os.path.join("output", preset.domain),
        "mixed_precision": preset.mixed_precision if has_accelerator() else "no",
    }
    for name, value in defaults.items():
        if values[name] is None:
            values[name] = value
    if flags.subject_words is None:
        values["subject_words"] = preset.subject_words
    else:  # words and comma-separated lists alike: --subject_words dog corgi / "dog,corgi" / "shih tzu"
        words = (w.strip() for text in flags.subject_words for w in text.split(","))
        values["subject_words"] = tuple(w for w in words if w)
    if values["min_image_size"] is None:
        values["min_image_size"] = values["resolution"] // 2
    if values["num_train_epochs"] is None and values["max_train_steps"] is None:
        values["max_train_steps"] = preset.max_train_steps
    values.update(batch_sizes(preset, values))
    if values["cpu_threads"] is None and preset.tiny and "OMP_NUM_THREADS" not in os.environ:
        values["cpu_threads"] = 1
    if values["cache_dir"] is None:
        values["cache_dir"] = os.path.join(values["output_dir"], "cache")
    for name in ("subject_words", "validation_prompts", "validation_images", "validation_seeds"):
        values[name] = tuple(values[name] or ())
    return TrainConfig(**values)


def check_config(config: TrainConfig, error: Callable[[str], NoReturn]) -> None:
    """Reject bad values and combinations right after parsing, with what to do instead."""

    def positive(name: str) -> None:
        if getattr(config, name) < 1:
            error(f"--{name} must be at least 1, got {getattr(config, name)}.")

    for name in (
        "train_batch_size",
        "gradient_accumulation_steps",
        "global_batch_size",
        "checkpointing_steps",
        "num_tokens",
        "sample_steps",
    ):
        positive(name)
    world = config.num_processes
    if config.train_batch_size * world * config.gradient_accumulation_steps != config.global_batch_size:
        error(
            f"--global_batch_size {config.global_batch_size} must be --train_batch_size "
            f"{config.train_batch_size} x {world} process(es) x --gradient_accumulation_steps (derived when "
            f"not given; {config.gradient_accumulation_steps} here), a multiple of "
            f"{config.train_batch_size * world}; choose a global batch that divides evenly, or another "
            "--train_batch_size (or leave it out: the preset's is lowered to fit)."
        )
    if config.num_train_epochs is not None:
        if config.max_train_steps is not None:
            error("--num_train_epochs and --max_train_steps both set the run's length; give one, not both.")
        if not config.num_train_epochs > 0:
            error(f"--num_train_epochs must be positive, got {config.num_train_epochs}.")
        if config.train_data is not None:
            from .data import find_shards

            if find_shards(config.train_data):
                error(
                    "--num_train_epochs needs the data set's size, which tar shards do not tell (they "
                    "stream); give --max_train_steps instead."
                )
    elif config.max_train_steps < 1:
        error(f"--max_train_steps must be at least 1, got {config.max_train_steps}.")
    if config.checkpoints_total_limit < 0:
        error(
            "--checkpoints_total_limit must be 0 (keep all) or a positive number, "
            f"got {config.checkpoints_total_limit}."
        )
    if not config.subject_words or not all(w.strip() for w in config.subject_words):
        error("--subject_words needs at least one word (no empty words).")
    if config.eval_steps < 0:
        error("--eval_steps must be 0 (no evaluation) or a positive number of steps.")
    if config.validation_steps < 0:
        error("--validation_steps must be 0 (no sample grids) or a positive number of steps.")
    if config.ddp_timeout < 1:
        error("--ddp_timeout must be at least 1 second.")
    if config.cpu_threads is not None and config.cpu_threads < 1:
        error("--cpu_threads must be at least 1.")
    if config.dataloader_num_workers < 0:
        error("--dataloader_num_workers must be 0 or more.")
    if config.resolution < 64 or config.resolution % 64:
        error(
            "--resolution must be a positive multiple of 64 (SDXL's latents are 1/8 of it and the "
            f"UNet halves them twice), got {config.resolution}."
        )
    if not config.learning_rate > 0:
        error(f"--learning_rate must be positive, got {config.learning_rate}.")
    if config.lr_warmup_steps < 0:
        error("--lr_warmup_steps must be 0 or more.")
    if config.max_grad_norm < 0:
        error("--max_grad_norm must be 0 (no clipping) or positive.")
    if not config.alpha > 0:
        error(f"--alpha must be positive, got {config.alpha}.")
    drops = {
        "text_dropout": config.text_dropout,
        "subject_dropout": config.subject_dropout,
        "both_dropout": config.both_dropout,
    }
    for name, value in drops.items():
        if not 0.0 <= value <= 1.0:
            error(f"--{name} is a probability in [0, 1], got {value}.")
    if sum(drops.values()) > 1.0:
        error(
            f"--text_dropout + --subject_dropout + --both_dropout must not exceed 1 (they are exclusive "
            f"outcomes of one draw), got {sum(drops.values()):.3f}."
        )
    if config.use_ema and not 0.0 < config.ema_decay < 1.0:
        error(f"--ema_decay must be between 0 and 1 (e.g. 0.9999), got {config.ema_decay}.")
    if config.snr_gamma is not None and not config.snr_gamma > 0:
        error(
            f"--snr_gamma must be positive (5 is usual), got {config.snr_gamma}; "
            "leave it out to turn min-SNR off."
        )
    if config.noise_offset < 0:
        error(f"--noise_offset must be 0 or positive, got {config.noise_offset}.")
    if "{token}" not in config.caption_template:
        error(
            "--caption_template must contain {token} (where the subject word goes), "
            f"got {config.caption_template!r}."
        )
    if not re.fullmatch(r"[A-Za-z][A-Za-z\-']*", config.token):
        error(f"--token must be one plain word (letters), got {config.token!r}.")
    if config.mixed_precision == "fp16" and not has_accelerator():
        error("--mixed_precision fp16 needs a GPU; on the CPU use 'no' (or bf16).")
    if config.preset.tiny:
        for flag in ("pretrained_model", "clip_vision", "models_dir"):
            if getattr(config, flag) is not None:
                error(
                    f"--{flag} cannot be used with --domain tiny, which builds its tiny models in code; "
                    "use --domain pets or faces to train on SDXL."
                )
    if config.cache_latents:
        if config.random_flip:
            error(
                "--cache_latents stores one crop of each image, so it cannot be combined with --random_flip; "
                "add --no-random_flip or drop --cache_latents."
            )
        if config.train_data is not None:
            from .data import find_shards

            if find_shards(config.train_data):
                error(
                    "--cache_latents cannot be used with tar shards (a streamed data set may be larger "
                    "than the disk); drop --cache_latents, or use a manifest or image folder."
                )
    if config.max_train_samples is not None:
        if config.max_train_samples < 1:
            error("--max_train_samples must be at least 1.")
        if config.train_data is not None:
            from .data import find_shards

            if find_shards(config.train_data):
                error(
                    "--max_train_samples applies to manifests and image folders, not to streamed tar shards."
                )
    if config.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(
        config.resume_from_checkpoint
    ):
        error(
            f"--resume_from_checkpoint {config.resume_from_checkpoint}: no such folder. "
            "Give a checkpoint-N folder "
            "written by this trainer, or 'latest'."
        )
    if config.init_from is not None and (config.init_encoder is not None or not os.path.isfile(config.init_from)):
        error(
            f"--init_from {config.init_from}: no such file."
            if config.init_encoder is None
            else "--init_from and --init_encoder both choose the starting weights; give one."
        )
    if config.init_encoder is not None and not os.path.isfile(config.init_encoder):
        error(
            f"--init_encoder {config.init_encoder}: no such file. "
            "Give an encoder .safetensors exported by this trainer."
        )
    if config.validation_images:
        missing = [path for path in config.validation_images if not os.path.isfile(path)]
        if missing:
            error(f"--validation_images: no such file(s): {', '.join(missing)}.")
    if config.report_to not in REPORT_TO:
        error(f"--report_to must be tensorboard, wandb, all or none, got {config.report_to!r}.")


def resolve_inputs(config: TrainConfig) -> TrainConfig:
    """Find the default model and data paths; stop with one message naming all that is missing, and where."""
    preset = config.preset
    problems = []
    found: dict[str, Optional[str]] = {}
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
        from .data import describe_source

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
