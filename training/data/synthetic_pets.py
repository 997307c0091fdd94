"""Synthetic pets on white with SDXL through ComfyUI's own sampler: `python -m training.prepare --domain pets
--generate N OUT`.

The paper's pet data is mostly 50k SDXL images of pets on a white background. Sample i gets a prompt from
(species/breed x pose x framing), chosen by a seeded draw, a seed of its own, and a caption written from
the prompt (without the background words, which every sample shares). Each image and its record
(`images/<i>.png`, `images/<i>.json`) are written as soon as they exist, so a run that stops continues
where it was (`OUT` again, same --seed): finished samples are skipped. Under `accelerate launch` process r
makes the samples i with i % processes == r; the main process writes `manifest.jsonl` from every record.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from accelerate import PartialState
from tqdm.auto import tqdm

from nested_attention.images import to_pil
from training.data.dataset import mix_seed
from training.models import sdxl as models_lib
from training.models.sampling import sample_image
from training.tiny import models as tiny_models

log = logging.getLogger(__name__)

# (words in the prompt, the caption's subject word)
SUBJECTS = (
    ("golden retriever dog", "dog"),
    ("labrador dog", "dog"),
    ("corgi dog", "dog"),
    ("beagle dog", "dog"),
    ("french bulldog", "bulldog"),
    ("german shepherd dog", "dog"),
    ("poodle dog", "dog"),
    ("pug dog", "dog"),
    ("dachshund dog", "dog"),
    ("husky dog", "dog"),
    ("shiba inu dog", "dog"),
    ("border collie dog", "dog"),
    ("chihuahua dog", "dog"),
    ("jack russell terrier dog", "dog"),
    ("mixed breed puppy", "puppy"),
    ("tabby cat", "cat"),
    ("black cat", "cat"),
    ("white cat", "cat"),
    ("siamese cat", "cat"),
    ("maine coon cat", "cat"),
    ("british shorthair cat", "cat"),
    ("ginger cat", "cat"),
    ("calico cat", "cat"),
    ("fluffy kitten", "kitten"),
    ("lop-eared rabbit", "rabbit"),
    ("hamster", "hamster"),
    ("parrot", "parrot"),
)
POSES = (
    "sitting",
    "lying down",
    "standing",
    "walking",
    "looking up",
    "tilting its head",
    "curled up",
    "playing",
    "yawning",
    "sleeping",
)
FRAMINGS = ("full body", "close-up portrait", "three-quarter view", "side view", "front view", "from above")
BACKGROUND = "isolated on a plain pure white background, studio photo, soft even light, high detail"
NEGATIVE = "background scenery, floor, shadow clutter, text, watermark, blurry, deformed, extra legs"


def plan(index: int, seed: int) -> dict:
    """Sample `index`'s prompt, caption, subject word and sampling seed: a pure function of (seed, index)."""
    rng = random.Random(mix_seed(seed, "generate", index))
    words, subject = rng.choice(SUBJECTS)
    pose, framing = rng.choice(POSES), rng.choice(FRAMINGS)
    caption = f"a photo of a {words} {pose}, {framing}"
    return {
        "prompt": f"{caption}, {BACKGROUND}",
        "caption": caption,
        "subject": subject,
        "seed": mix_seed(seed, "noise", index) % (2**32),
    }


def generate(
    out: Path,
    count: int,
    *,
    seed: int = 0,
    tiny: bool = False,
    checkpoint: str | None = None,
    resolution: int = 1024,
    steps: int = 30,
    cfg: float = 5.0,
    progress: bool = True,
) -> dict:
    """Make (or finish making) `count` samples in `out`; returns {"made", "skipped", "manifest"}."""
    state = PartialState()  # first: ComfyUI, imported next, picks the device accelerate gave this process

    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    mine = [i for i in range(count) if i % state.num_processes == state.process_index]
    todo = [i for i in mine if not (images / f"{i:06d}.json").is_file()]  # the json is written last
    made = 0
    if todo:
        if tiny:
            unet, clip, vae = (
                tiny_models.tiny_sdxl_unet(seed=0),
                tiny_models.tiny_sdxl_clip(seed=0),
                tiny_models.tiny_vae(seed=0),
            )
        else:
            unet, clip, vae = models_lib.load_sdxl(checkpoint, None)
        for module in (unet.model, clip.cond_stage_model, vae.first_stage_model):
            module.requires_grad_(False).eval()
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(NEGATIVE))
        for i in tqdm(todo, desc=f"generating pets (process {state.process_index})", disable=not progress):
            item = plan(i, seed)
            positive = clip.encode_from_tokens_scheduled(clip.tokenize(item["prompt"]))
            pixels = sample_image(
                unet, vae, positive, negative, item["seed"], steps=steps, cfg=cfg, resolution=resolution
            )  # (H, W, 3)
            to_pil(pixels).save(images / f"{i:06d}.png")
            record = {
                "input": f"images/{i:06d}.png",
                "caption": item["caption"],
                "subject": item["subject"],
                "prompt": item["prompt"],
                "seed": item["seed"],
                "index": i,
            }
            (images / f"{i:06d}.json").write_text(json.dumps(record) + "\n")
            made += 1
    state.wait_for_everyone()
    manifest = out / "manifest.jsonl"
    if state.is_main_process:
        records = [
            json.loads((images / f"{i:06d}.json").read_text())
            for i in range(count)
            if (images / f"{i:06d}.json").is_file()
        ]
        manifest.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    state.wait_for_everyone()
    return {"made": made, "skipped": len(mine) - len(todo), "manifest": str(manifest)}
