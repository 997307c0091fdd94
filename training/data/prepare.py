"""Turn a folder of photos into training data: `python -m training.prepare --domain faces|pets SRC OUT`.

faces: each photo's largest face is found and aligned FFHQ-style (nested_attention.faces, the same code the
       Encode node runs) into `OUT/inputs/<name>.png`; the photo itself, upright, becomes the target
       `OUT/targets/<name>.jpg`, and the face's box in it is written to the manifest so that the trainer's
       square target crops keep the whole face.
pets:  each photo is put on white outside its alpha channel or its mask (`<name>.mask.png` next to it, or
       `masks/<name>.png` under SRC) into `OUT/images/<name>.png`; input and target are that image.

Captions come from sidecar `<name>.txt` files (Latin-1 ones are read and reported); photos without one get
the trainer's template at training time. `OUT/manifest.jsonl` lists the kept samples; the summary says
what was kept and what was skipped, and why.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from nested_attention import faces
from nested_attention.images import from_pil, to_pil
from nested_attention.logs import LOG_PREFIX as PREFIX
from training.comfy_env import find_comfyui
from training.data.images import IMAGE_EXTENSIONS, MASK_SUFFIX, BadImage, decode_text, load_rgb
from training.data.synthetic_pets import generate
from training.presets import SDXL_CHECKPOINT_NAMES

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The flags of `python -m training.prepare` (the rules between them are parse_args')."""
    p = argparse.ArgumentParser(
        prog="python -m training.prepare",
        description="Make a training manifest from a folder of photos (aligned faces, or pets on white).",
    )
    p.add_argument(
        "--domain",
        choices=("faces", "pets"),
        required=True,
        help="faces: aligned face crop as input, the photo as target; pets: the pet on white as both.",
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="SRC OUT",
        help="SRC: the folder of photos (searched recursively), with optional .txt captions and masks; "
        "OUT: the output folder, which gets manifest.jsonl and the prepared images. With --generate, "
        "only OUT.",
    )
    p.add_argument(
        "--face_size",
        type=int,
        default=512,
        help="Side of the aligned face crops in pixels (the authors' demo uses 512).",
    )
    p.add_argument(
        "--min_face_size",
        type=int,
        default=64,
        help="Skip faces whose detected box is smaller than this many pixels (blurry crops).",
    )
    p.add_argument(
        "--require_mask",
        action="store_true",
        help="pets: skip photos with neither an alpha channel nor a mask, instead of keeping their "
        "background.",
    )
    p.add_argument(
        "--caption_model",
        default=None,
        metavar="DIR",
        help="Caption photos that have no .txt file with an image-to-text model kept in a local folder (a "
        "transformers model such as BLIP, saved with save_pretrained; safetensors weights only, nothing is "
        "downloaded). Without it, they get the trainer's template.",
    )
    p.add_argument("--overwrite", action="store_true", help="Replace an existing OUT/manifest.jsonl.")
    g = p.add_argument_group("synthetic pets (--domain pets --generate N OUT)")
    g.add_argument(
        "--generate",
        type=int,
        default=None,
        metavar="N",
        help="Make N images of pets on a white background with SDXL through ComfyUI's sampler "
        "(species/breed x pose x framing prompts, fixed seeds, captions from the prompts); resumable, "
        "split across processes under accelerate launch.",
    )
    g.add_argument(
        "--pretrained_model",
        default=None,
        help="The SDXL base checkpoint (default: sd_xl_base_1.0.safetensors in "
        "<ComfyUI>/models/checkpoints).",
    )
    g.add_argument(
        "--tiny", action="store_true", help="Use the tiny models built in code (tests, smoke runs)."
    )
    g.add_argument("--resolution", type=int, default=1024, help="Side of the generated images in pixels.")
    g.add_argument("--steps", type=int, default=30, help="Euler steps per image.")
    g.add_argument("--cfg", type=float, default=5.0, help="Classifier-free guidance scale.")
    g.add_argument("--seed", type=int, default=0, help="Seed of the prompt draws and the noise.")
    return p


def parse_args(args: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(args)
    if args.generate is not None:
        if args.domain != "pets":
            p.error("--generate makes pets; use it with --domain pets.")
        if len(args.paths) != 1 or args.generate < 1:
            p.error(
                "--generate N takes one folder, OUT, and N >= 1: python -m training.prepare --domain pets "
                "--generate 1000 data/pets-synthetic"
            )
        args.src, args.out = None, args.paths[0]
        if args.resolution % 8:
            p.error(f"--resolution must be a multiple of 8, got {args.resolution}.")
    elif len(args.paths) != 2:
        p.error("give SRC and OUT: python -m training.prepare --domain faces photos/ data/faces")
    else:
        args.src, args.out = args.paths
    if args.face_size < 64:
        p.error(f"--face_size must be at least 64 pixels, got {args.face_size}.")
    return args


def photos(src: Path) -> list[Path]:
    """Images under `src`, masks excluded (`*.mask.*` and anything under a top-level masks/ folder)."""
    masks_dir = src / "masks"
    return sorted(
        p
        for p in src.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not p.stem.lower().endswith(MASK_SUFFIX)
        and masks_dir not in p.parents
    )


def find_mask(src: Path, photo: Path) -> Path | None:
    for candidate in [
        *photo.parent.glob(f"{photo.stem}{MASK_SUFFIX}.*"),
        *(src / "masks" / photo.relative_to(src).parent).glob(f"{photo.stem}.*"),
    ]:
        if candidate.suffix.lower() in IMAGE_EXTENSIONS:
            return candidate
    return None


def has_alpha(path: Path) -> bool:
    with Image.open(path) as image:
        return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def caption_of(photo: Path, notes: list[str]) -> str | None:
    sidecar = photo.with_suffix(".txt")
    if not sidecar.is_file():
        return None
    text, problem = decode_text(sidecar.read_bytes(), str(sidecar))
    if problem:
        notes.append(problem)
    return text.strip() or None


class Captioner:
    """An image-to-text model from a local folder: image -> caption (greedy: a photo always gets the same)."""

    def __init__(self, folder: str, max_new_tokens: int = 40):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if not Path(folder, "config.json").is_file():
            raise SystemExit(
                f"{PREFIX} --caption_model {folder}: no config.json there. Give the folder of a transformers "
                "image-to-text model saved with save_pretrained (e.g. a BLIP captioning model)."
            )
        try:
            self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            self.model = AutoModelForImageTextToText.from_pretrained(
                folder, local_files_only=True, use_safetensors=True
            )
        except (OSError, ValueError) as e:
            raise SystemExit(
                f"{PREFIX} --caption_model {folder} could not be loaded as an image-to-text model with "
                f"safetensors weights ({e})."
            ) from e
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device).eval()
        self.max_new_tokens = max_new_tokens

    def __call__(self, image) -> str:
        inputs = self.processor(images=image, return_tensors="pt").to(self.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.processor.batch_decode(out, skip_special_tokens=True)[0].strip()


def photos_to_prepare(args: argparse.Namespace) -> list[Path]:
    """The photos under SRC; stops first when SRC is not a folder, OUT already holds a manifest (without
    --overwrite), there are no photos, or faces are asked for without dlib."""
    src, manifest = Path(args.src), Path(args.out) / "manifest.jsonl"
    if not src.is_dir():
        raise SystemExit(f"{PREFIX} {src} is not a folder; give the folder that holds the photos.")
    if manifest.exists() and not args.overwrite:
        raise SystemExit(
            f"{PREFIX} {manifest} exists; pass --overwrite to replace it, or choose another OUT."
        )
    items = photos(src)
    if not items:
        raise SystemExit(f"{PREFIX} no photos ({', '.join(IMAGE_EXTENSIONS)}) under {src}.")
    if args.domain == "faces" and not faces.face_tools_available():
        raise SystemExit(f"{PREFIX} --domain faces needs dlib: {faces.INSTALL_HINT}.")
    return items


def whole_face_box(box: Sequence[float], width: int, height: int) -> list[float]:
    """The detector's box (eyebrows to mouth) grown by half its size, inside the photo: forehead and chin
    included, so the trainer's square target crops keep the whole face."""
    left, top, right, bottom = box
    grow_x, grow_y = (right - left) / 4, (bottom - top) / 4
    return [
        max(0.0, left - grow_x),
        max(0.0, top - grow_y),
        min(float(width), right + grow_x),
        min(float(height), bottom + grow_y),
    ]


def prepare(args: argparse.Namespace) -> dict:
    """Prepare every photo; returns {"kept": n, "skipped": Counter(reason), "manifest": path, ...}."""
    src, out = Path(args.src), Path(args.out)
    manifest = out / "manifest.jsonl"
    items = photos_to_prepare(args)
    captioner = Captioner(args.caption_model) if args.caption_model else None
    out.mkdir(parents=True, exist_ok=True)

    skipped: Counter = Counter()
    skipped_names: dict[str, list[str]] = {}
    notes: list[str] = []
    lines: list[str] = []
    several_faces, captions, model_captions, unmasked = 0, 0, 0, 0

    def skip(reason: str, name: str) -> None:
        skipped[reason] += 1
        skipped_names.setdefault(reason, []).append(name)

    for photo in tqdm(items, desc=f"preparing {args.domain}", unit="photo"):
        name = str(photo.relative_to(src))
        stem = str(photo.relative_to(src).with_suffix("")).replace("/", "__")
        try:
            mask = find_mask(src, photo) if args.domain == "pets" else None
            image = load_rgb(str(photo), str(mask) if mask else None)
        except BadImage as e:
            skip(f"unreadable ({e})", name)
            continue
        if args.domain == "faces":
            pixels = from_pil(image)
            found = faces.detect_faces(pixels)
            if not found:
                skip("no face found", name)
                continue
            face = found[0]
            if min(face.box[2] - face.box[0], face.box[3] - face.box[1]) < args.min_face_size:
                skip(f"face smaller than --min_face_size {args.min_face_size} px", name)
                continue
            several_faces += len(found) > 1
            quad = faces.ffhq_quad(face.eye_left, face.eye_right, face.mouth)
            aligned = faces.crop_quad(pixels, quad, args.face_size)
            (out / "inputs").mkdir(exist_ok=True)
            (out / "targets").mkdir(exist_ok=True)
            to_pil(aligned).save(out / "inputs" / f"{stem}.png")
            image.save(out / "targets" / f"{stem}.jpg", quality=95)  # upright: EXIF rotation applied
            entry = {
                "input": f"inputs/{stem}.png",
                "target": f"targets/{stem}.jpg",
                "face_box": [round(v, 1) for v in whole_face_box(face.box, image.width, image.height)],
            }
        else:
            if mask is None and not has_alpha(photo):
                if args.require_mask:
                    skip("no alpha channel or mask (--require_mask)", name)
                    continue
                unmasked += 1
            (out / "images").mkdir(exist_ok=True)
            image.save(out / "images" / f"{stem}.png")
            entry = {"input": f"images/{stem}.png"}
        caption = caption_of(photo, notes)
        if caption is not None:
            entry["caption"] = caption
            captions += 1
        elif captioner is not None:
            entry["caption"] = captioner(image)
            model_captions += 1
        lines.append(json.dumps(entry, ensure_ascii=False))

    manifest.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return {
        "kept": len(lines),
        "skipped": dict(skipped),
        "skipped_names": skipped_names,
        "captions_from_files": captions,
        "captions_from_model": model_captions,
        "captions_from_template": len(lines) - captions - model_captions,
        "several_faces_used_largest": several_faces,
        "pets_without_mask": unmasked,
        "text_problems": notes,
        "manifest": str(manifest),
    }


def describe(summary: dict) -> str:
    lines = [
        (
            f"{PREFIX} kept {summary['kept']}, skipped {sum(summary['skipped'].values())}; "
            f"captions: {summary['captions_from_files']} from .txt files, "
            f"{summary['captions_from_model']} from --caption_model, "
            f"{summary['captions_from_template']} will "
            f"use the trainer's template. Manifest: {summary['manifest']}"
        )
    ]
    for reason, names in summary["skipped_names"].items():
        more = f" ... and {len(names) - 10} more" if len(names) > 10 else ""
        lines.append(f"  skipped, {reason}: {len(names)}: {'; '.join(names[:10])}{more}")
    if summary["several_faces_used_largest"]:
        lines.append(
            f"  {summary['several_faces_used_largest']} photos show several faces: the largest was used"
        )
    if summary["pets_without_mask"]:
        lines.append(
            f"  {summary['pets_without_mask']} pets have no alpha or mask: their background was kept "
            "(use --require_mask to skip them)"
        )
    for note in summary["text_problems"]:
        lines.append(f"  {note}")
    return "\n".join(lines)


def generate_pets(args: argparse.Namespace) -> dict:
    checkpoint = args.pretrained_model
    if not args.tiny and checkpoint is None:
        folder = find_comfyui() / "models" / "checkpoints"
        checkpoint = next((str(folder / n) for n in SDXL_CHECKPOINT_NAMES if (folder / n).is_file()), None)
        if checkpoint is None:
            raise SystemExit(
                f"{PREFIX} SDXL base not found: looked for {', '.join(SDXL_CHECKPOINT_NAMES)} in "
                f"{folder}. Download it there or pass --pretrained_model PATH."
            )

    return generate(
        Path(args.out),
        args.generate,
        seed=args.seed,
        tiny=args.tiny,
        checkpoint=checkpoint,
        resolution=args.resolution,
        steps=args.steps,
        cfg=args.cfg,
    )


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    args = parse_args(argv)
    if args.generate is not None:
        summary = generate_pets(args)
        print(
            f"{PREFIX} generated {summary['made']}, already there {summary['skipped']}; manifest: "
            f"{summary['manifest']}"
        )
        return summary
    summary = prepare(args)
    print(describe(summary))
    return summary

