"""The trainer's command line: every flag with its help, grouped as `--help` shows them.

Flags left unset (default None) are filled from the domain preset by `training.config`, which also
rejects bad values and combinations; this module only declares them.
"""

from __future__ import annotations

import argparse

from .presets import PRESETS

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
REPORT_TO = ("tensorboard", "wandb", "all", "none")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m training.run` (no preset applied, no validation)."""
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
        help="Resolve every setting, scan the data, write <output_dir>/args.json (every run writes it) and "
        "a labelled preview of the first 4 processed samples (encoder input as CLIP sees it, target crop "
        "as the UNet sees it, caption with the token) to <output_dir>/data-preview/, then stop before "
        "loading any model.",
    )
    g.add_argument(
        "--token",
        default=None,
        help="The subject word that captions' subject words become and that prompts use at inference "
        "(default: the preset's, 'pet' or 'person').",
    )
    g.add_argument(
        "--subject_words",
        nargs="+",
        default=None,
        help="Words that name the subject in captions, as separate words or comma-separated "
        "('dog corgi' or 'dog,corgi'; quote a two-word breed: 'shih tzu'); the first run of them in a "
        "caption becomes --token (case-insensitive, whole words; a caption with them only in the plural, "
        "'two dogs', is not rewritten: the template is put in front and the data summary counts it). "
        "Default: the preset's (pets: dog, cat, puppy, kitten, pet and common breed words; faces: man, "
        "woman, person, boy, girl, lady, guy, ...).",
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
        "--init_from",
        default=None,
        help="Warm start from trained weights of any layout the pack reads: an IP-Adapter Plus SDXL file, the "
        "Nested Attention authors' release, or an export of this trainer. M, the Q-Former's shape and the CLIP "
        "hidden layer come from the file; the export is in the pack's format (training/warm_start.py).",
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
        "--train_batch_size",
        type=int,
        default=None,
        help="Batch size per device (default: the preset's, 4, lowered to fit the preset's global batch).",
    )
    g.add_argument(
        "--global_batch_size",
        type=int,
        default=None,
        help="Samples per optimizer step over all processes: --train_batch_size x processes x accumulation, "
        "the accumulation derived (must divide evenly). Default: the preset's phase, as in the paper (faces "
        "32 at 512 and 16 at 1024; pets 128 and 32); none for 'tiny'.",
    )
    g.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=None,
        help="Number of batches whose gradients are accumulated before each optimizer step (default: "
        "derived from the global batch, else 1; given with --global_batch_size, the two must agree).",
    )
    g.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help="Number of optimizer steps to train for (default: the preset's; not with --num_train_epochs).",
    )
    g.add_argument(
        "--num_train_epochs",
        type=float,
        default=None,
        help="Train for this many passes over the data instead (the paper: 100 per phase): sets "
        "--max_train_steps = ceil(epochs x data set size / global batch) once the data is read. Not for "
        "tar shards (their size is unknown) and not together with --max_train_steps.",
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
        help="Keep at most this many checkpoint-N folders, each about 6 GB at SDXL size; older ones are "
        "deleted (default: 3; 0 keeps all).",
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
        "--eval_steps",
        type=int,
        default=0,
        help="Every N steps, evaluate on the --validation_images (use held-out images) with the validation "
        "prompts and seeds: prior and nested attention at λ=1, CLIP-I, face identity (faces, with dlib) "
        "and, for tiny, CLIP-T; metrics and grids go to <output_dir>/eval/step-N and the trackers (0: off).",
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

    return p
