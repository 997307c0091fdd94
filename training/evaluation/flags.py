"""The command line of `python -m training.evaluate`: every flag with its help, defaults by domain, and the
checks of bad values and combinations right after parsing."""

from __future__ import annotations

import argparse
import os
from typing import Optional

from ..presets import PRESETS
from .generation import DECOUPLED_SCALES, LAMBDAS
from .two_subjects import AUTO_REGIONS_CONNECTED, AUTO_REGIONS_MISSING, PAIR_WORDS, REGIONS


def parse_args(args: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description="Measure identity and prompt alignment of a nested encoder against the model's prior and "
        "decoupled cross-attention (IP-Adapter) with the same weights; write CSV, JSON, a trade-off plot and "
        "image grids.",
    )
    g = p.add_argument_group("what to evaluate")
    g.add_argument(
        "--domain",
        required=True,
        choices=["faces", "pets", "tiny"],
        help="'faces' (token 'person', face identity), 'pets' (token 'pet', CLIP-I as identity) or "
        "'tiny' (tiny models built in code, generated subjects; a CPU run of under a minute).",
    )
    g.add_argument(
        "--output_dir",
        required=True,
        help="Where images, metrics and plots go. Run again with the same folder to resume.",
    )
    g.add_argument(
        "--encoder",
        default=None,
        help="The nested encoder file (.safetensors exported by training.run). Required for faces "
        "and pets; for tiny, a fresh encoder is built in code unless given (e.g. a tiny training "
        "run's tiny-encoder.safetensors).",
    )
    g.add_argument(
        "--subjects",
        default=None,
        help="Held-out subject images: a folder (every image in it, names from the file names) or a "
        'JSON-lines manifest ({"image": path, "name": optional} per line). Generated for tiny.',
    )
    g.add_argument("--max_subjects", type=int, default=None, help="Use only the first N subjects.")
    g.add_argument(
        "--prompts",
        default=None,
        help="A text file of prompts, one per line, with {token} (or the subject word) where the "
        "subject goes; 'category: prompt' lines set the category. Default: 12 shipped prompts "
        "(clothing, expression, scene, style); 2 for tiny.",
    )
    g.add_argument("--token", default=None, help="The subject word (default: the encoder's word).")
    g.add_argument(
        "--methods",
        nargs="+",
        default=["prior", "nested", "decoupled"],
        choices=["prior", "nested", "decoupled"],
        help="Which methods to generate.",
    )
    g.add_argument(
        "--lambdas",
        nargs="+",
        type=float,
        default=list(LAMBDAS),
        help="λ values of nested attention (the paper's: 1 1.5 2 2.5 3 4).",
    )
    g.add_argument(
        "--decoupled_scales",
        nargs="+",
        type=float,
        default=list(DECOUPLED_SCALES),
        help="Scales of the decoupled cross-attention baseline (IP-Adapter's 0.5 to 1.0).",
    )
    g.add_argument(
        "--decoupled_uncond",
        choices=["black_image", "none"],
        default="black_image",
        help="What the decoupled baseline adds to the unconditional half of guidance: the tokens of a "
        "black image, as IP-Adapter does (default), or nothing, as nested attention does.",
    )
    g.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help="Sampling seeds; every method uses the same ones (default 0 1 2 3; tiny: 0).",
    )

    g = p.add_argument_group("models (default: the standard files in ComfyUI/models)")
    g.add_argument("--pretrained_model", default=None, help="SDXL base single-file checkpoint.")
    g.add_argument(
        "--clip_vision",
        default=None,
        help="The CLIP vision file the encoder reads (ViT-H/14); also gives CLIP-I.",
    )
    g.add_argument(
        "--models_dir", default=None, help="A ComfyUI models folder to look in (default: ComfyUI's)."
    )
    g.add_argument(
        "--precision",
        choices=["auto", "fp32", "fp16", "bf16"],
        default="auto",
        help="UNet weights dtype (auto: fp16 on a GPU, fp32 on the CPU).",
    )

    g = p.add_argument_group("metrics (local files only; nothing is downloaded)")
    g.add_argument(
        "--clip_g_vision",
        default=None,
        help="The ViT-bigG vision file (CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors): with SDXL's "
        "own CLIP-G text tower it gives CLIP-T in the OpenCLIP ViT-bigG-14 space. Looked for in "
        "ComfyUI/models/clip_vision when not given.",
    )
    g.add_argument(
        "--open_clip_model",
        default=None,
        help="CLIP-T (also) in this OpenCLIP model's space: a built-in open_clip name, e.g. ViT-H-14.",
    )
    g.add_argument(
        "--open_clip_checkpoint", default=None, help="The local .safetensors weights for --open_clip_model."
    )
    g.add_argument(
        "--identity",
        choices=["auto", "dlib", "clip-i", "none"],
        default="auto",
        help="Face identity model: dlib's ResNet embedder (pip install dlib-bin face-recognition-models), "
        "or none. CLIP-I is always measured. auto: dlib for faces, none for pets, the stand-in for tiny.",
    )
    g.add_argument(
        "--dlib_models",
        default=None,
        help="A folder with shape_predictor_5_face_landmarks.dat and "
        "dlib_face_recognition_resnet_model_v1.dat (default: the face_recognition_models package's).",
    )

    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=int, default=None, help="Sampler steps (default 30; tiny 4).")
    g.add_argument("--cfg", type=float, default=5.0, help="Classifier-free guidance scale.")
    g.add_argument(
        "--resolution", type=int, default=None, help="Image side in pixels (default 1024; tiny 64)."
    )
    g.add_argument("--sampler", default="euler", help="A ComfyUI sampler name (KSampler's list).")
    g.add_argument("--scheduler", default="normal", help="A ComfyUI scheduler name.")
    g.add_argument("--negative_prompt", default="", help="The negative prompt of every image.")
    g.add_argument("--no_grids", action="store_true", help="Skip the image grids.")
    g.add_argument(
        "--cpu_threads", type=int, default=None, help="torch CPU threads (default: torch's choice)."
    )

    # ---- Two-subject mode (issue 23): its flags and checks in one block, for the flag restructure ----
    g = p.add_argument_group("two subjects (two people in one image: how much identity leaks between them)")
    g.add_argument(
        "--two_subjects",
        action="store_true",
        help="Evaluate two subjects per image instead of one: the subjects in pairs (1st + 2nd, 3rd + 4th, "
        "...), each bound by the same encoder to its own word of two-subject prompts; every detected face is "
        "scored against both reference photos (own vs the other: leakage). Writes the same files, with "
        "identity_own / identity_other columns, and leakage.png instead of tradeoff.png.",
    )
    g.add_argument(
        "--regions",
        nargs="+",
        choices=REGIONS,
        default=None,
        help="Region methods to compare (default: none manual): none = both subjects on the whole image; "
        "manual = the first subject on the left half, the second on the right (the Apply node's MASK); auto "
        "= each subject's region from its word's cross-attention in the first steps (refused until that "
        "option is part of the build).",
    )
    g.add_argument(
        "--pair_words",
        nargs=2,
        metavar=("A", "B"),
        default=None,
        help="The words of the first and second subject of each pair in the prompts (default: faces 'man' "
        "'woman', tiny 'pet' 'toy'). Order the subjects so that each pair's first one fits A.",
    )
    args = p.parse_args(args)
    if args.two_subjects:
        if args.domain not in PAIR_WORDS:
            p.error(f"--two_subjects measures faces: use --domain faces (or tiny), not {args.domain}.")
        if args.identity in ("none", "clip-i"):
            p.error("--two_subjects scores each detected face: it needs face identity (--identity auto).")
        if args.prompts is not None:
            p.error("--two_subjects has its own prompts (two subject words); --prompts is for one subject.")
        args.regions = list(dict.fromkeys(args.regions or ["none", "manual"]))
        if "auto" in args.regions and not AUTO_REGIONS_CONNECTED:
            p.error(AUTO_REGIONS_MISSING)
        args.pair_words = list(args.pair_words or PAIR_WORDS[args.domain])
        if args.pair_words[0].lower() == args.pair_words[1].lower():
            p.error(f"--pair_words {' '.join(args.pair_words)}: each subject needs its own word.")
    elif args.regions is not None or args.pair_words is not None:
        p.error("--regions and --pair_words belong to --two_subjects.")
    # ---- end of the two-subject block ----

    tiny = args.domain == "tiny"
    args.steps = args.steps or (PRESETS["tiny"].sample_steps if tiny else 30)
    args.resolution = args.resolution or (PRESETS["tiny"].resolutions[0] if tiny else 1024)
    if args.seeds is None:
        args.seeds = [0] if tiny else [0, 1, 2, 3]
    if args.resolution % 8 or args.resolution < 8:
        p.error(f"--resolution {args.resolution}: expected a positive multiple of 8.")
    if not tiny and args.encoder is None:
        p.error(f"--domain {args.domain} needs --encoder (a .safetensors file exported by training.run).")
    if args.encoder is not None and not os.path.isfile(args.encoder):
        p.error(f"--encoder {args.encoder}: no such file.")
    if (args.open_clip_model is None) != (args.open_clip_checkpoint is None):
        p.error(
            "--open_clip_model and --open_clip_checkpoint go together (a built-in name, its local weights)."
        )
    if args.identity == "dlib" and tiny:
        p.error(
            "--identity dlib needs real faces; the tiny domain uses its stand-in (leave --identity auto)."
        )
    if "nested" not in args.methods and "decoupled" not in args.methods and "prior" not in args.methods:
        p.error("--methods: choose at least one.")
    return args
