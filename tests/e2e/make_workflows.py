"""Regenerate the shipped workflows (workflows/*.json) by building them in the real ComfyUI frontend.

    .venv/bin/python tests/e2e/make_workflows.py

Starts ComfyUI with this pack (a throw-away --base-directory), opens its frontend in headless Chromium,
builds each graph with the frontend's own LiteGraph API (createNode, connect, widget values), and saves
`app.graph.serialize()`: exactly the format the frontend saves. Each file is then loaded back through the
frontend and must come back with no missing node and no refused widget value. Also writes a thumbnail per
workflow (`workflows/<name>.jpg`, which the template browser shows) and the example subject images
(`workflows/input/*.png`).

The example images are simple drawings made here with PIL (placeholders, dedicated to the public domain
under CC0 1.0); they show how a workflow is wired, not what a trained encoder can do with a real photo.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import CHECKPOINT, CLIP_VISION, FACES_ENCODER, PETS_ENCODER  # noqa: E402

PERSON_IMAGES = [f"nested_attention_person_{i}.png" for i in (1, 2, 3)]
PET_IMAGE = "nested_attention_pet.png"
CHECKPOINT_URL = f"https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/{CHECKPOINT}"
CLIP_VISION_URL = "https://huggingface.co/h94/IP-Adapter/resolve/main/models/image_encoder/model.safetensors"
NEGATIVE = "blurry, lowres, deformed, disfigured, watermark, text, signature"
SEED = 20250101
IMAGE_SIZE = 512  # example images: 512 x 512
THUMBNAIL_WIDTH = 640

# ------------------------------------------------------------------------------------------------
# Example subject images (synthetic, CC0)


def _draw_person(bg_top, bg_bottom, shirt, hair, head_dx: int, smile: float) -> Image.Image:
    s = 2 * IMAGE_SIZE  # drawn at twice the size, then downsampled (anti-aliasing)
    image = Image.new("RGB", (s, s))
    d = ImageDraw.Draw(image)
    for y in range(s):  # a vertical gradient background
        t = y / (s - 1)
        d.line([(0, y), (s, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(bg_top, bg_bottom)))
    skin = (224, 172, 138)
    cx = s // 2 + head_dx
    d.ellipse([cx - 420, 760, cx + 420, 1400], fill=shirt)  # shoulders
    d.rectangle([cx - 70, 600, cx + 70, 800], fill=(205, 152, 118))  # neck
    d.ellipse([cx - 210, 230, cx + 210, 720], fill=skin)  # face
    d.chord([cx - 230, 190, cx + 230, 560], 180, 360, fill=hair)  # hair
    d.ellipse([cx - 235, 400, cx - 185, 500], fill=skin)  # ears
    d.ellipse([cx + 185, 400, cx + 235, 500], fill=skin)
    for ex in (cx - 85, cx + 85):  # eyes and brows
        d.ellipse([ex - 38, 420, ex + 38, 468], fill=(250, 250, 250))
        d.ellipse([ex - 17, 427, ex + 17, 461], fill=(70, 45, 30))
        d.line([(ex - 45, 385), (ex + 45, 380)], fill=hair, width=14)
    d.line([(cx, 470), (cx - 18, 550), (cx + 10, 556)], fill=(180, 120, 95), width=8)  # nose
    mouth = [cx - 90, 540 - 40 * smile, cx + 90, 620 + 20 * smile]
    d.arc(mouth, 20, 160, fill=(150, 60, 60), width=12)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)


def _draw_pet() -> Image.Image:
    s = 2 * IMAGE_SIZE
    image = Image.new("RGB", (s, s), (255, 255, 255))  # white background, as the pets encoder prefers
    d = ImageDraw.Draw(image)
    fur, dark_fur, light = (196, 140, 82), (120, 78, 40), (238, 214, 180)
    d.arc([700, 420, 960, 760], 200, 330, fill=dark_fur, width=40)  # tail
    d.ellipse([250, 520, 820, 860], fill=fur)  # body
    for x in (300, 420, 620, 720):  # legs and paws
        d.rounded_rectangle([x, 760, x + 80, 960], radius=30, fill=fur)
        d.ellipse([x - 10, 920, x + 90, 980], fill=light)
    d.ellipse([150, 180, 530, 560], fill=fur)  # head
    d.ellipse([110, 220, 230, 480], fill=dark_fur)  # floppy ears
    d.ellipse([450, 220, 570, 480], fill=dark_fur)
    d.ellipse([240, 380, 440, 540], fill=light)  # snout
    d.ellipse([305, 395, 375, 445], fill=(30, 25, 25))  # nose
    for ex in (270, 410):  # eyes
        d.ellipse([ex - 30, 300, ex + 30, 360], fill=(30, 25, 25))
        d.ellipse([ex - 12, 310, ex + 4, 326], fill=(255, 255, 255))
    d.arc([290, 440, 390, 510], 20, 160, fill=(30, 25, 25), width=8)  # mouth
    d.rounded_rectangle([220, 540, 470, 580], radius=18, fill=(200, 40, 60))  # collar
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)


def make_example_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    people = [
        _draw_person((150, 190, 235), (235, 240, 250), (60, 90, 160), (70, 45, 30), 0, 1.0),
        _draw_person((200, 225, 190), (250, 250, 235), (160, 60, 60), (70, 45, 30), -60, 0.4),
        _draw_person((240, 210, 180), (250, 240, 230), (60, 130, 100), (70, 45, 30), 50, 0.8),
    ]
    for name, image in zip(PERSON_IMAGES, people):
        image.save(folder / name, optimize=True)
    _draw_pet().save(folder / PET_IMAGE, optimize=True)


# ------------------------------------------------------------------------------------------------
# Graph specs, built in the page by _BUILD_JS


@dataclass
class Graph:
    nodes: list = field(default_factory=list)
    links: list = field(default_factory=list)
    groups: list = field(default_factory=list)

    def node(self, type_: str, pos: tuple, *, title: str | None = None, size: tuple | None = None,
             properties: dict | None = None, **widgets: Any) -> int:
        self.nodes.append({"type": type_, "pos": list(pos), "title": title,
                           "size": list(size) if size else None, "properties": properties or {},
                           "widgets": widgets})
        return len(self.nodes) - 1

    def link(self, src: int, output: int | str, dst: int, input_name: str) -> None:
        self.links.append([src, output, dst, input_name])

    def note(self, pos: tuple, size: tuple, text: str, title: str = "Read me") -> int:
        return self.node("Note", pos, title=title, size=size, text=text.strip())

    def group(self, title: str, bounding: tuple, color: str = "#3f789e") -> None:
        self.groups.append({"title": title, "bounding": list(bounding), "color": color})

    def spec(self) -> dict:
        return {"nodes": self.nodes, "links": self.links, "groups": self.groups}


_BUILD_JS = """
async (spec) => {
  const app = window.app, LG = window.LiteGraph;
  // A new blank workflow tab: a cleared graph would still share per-node state (by node id) with the last one.
  await app.extensionManager.command.execute('Comfy.NewBlankWorkflow');
  const made = [];
  for (const s of spec.nodes) {
    const n = LG.createNode(s.type);
    if (!n) throw new Error(`the frontend does not know the node type ${s.type}`);
    app.graph.add(n);
    n.pos = s.pos;
    if (s.title) n.title = s.title;
    for (const [name, value] of Object.entries(s.widgets)) {
      const w = n.widgets?.find((w) => w.name === name);
      if (!w) throw new Error(`${s.type} has no widget ${name} (it has ${n.widgets?.map((w) => w.name)})`);
      w.value = value;
    }
    if (s.size) n.setSize(s.size);
    Object.assign(n.properties, s.properties);
    made.push(n);
  }
  for (const [a, output, b, input] of spec.links) {
    const src = made[a], dst = made[b];
    const slot = typeof output === 'number' ? output : src.findOutputSlot(output);
    const target = dst.findInputSlot(input);
    if (slot < 0 || target < 0 || !src.connect(slot, dst, target))
      throw new Error(`cannot connect ${src.type}[${output}] to ${dst.type}.${input}`);
  }
  // The frontend may still grow nodes while image previews load; then the sizes of the spec win.
  await new Promise((r) => setTimeout(r, 1500));
  made.forEach((n, i) => { if (spec.nodes[i].size) n.setSize(spec.nodes[i].size); });
  for (const g of spec.groups) {
    const group = new LG.LGraphGroup(g.title, g.color);
    group.pos = [g.bounding[0], g.bounding[1]];
    group.size = [g.bounding[2], g.bounding[3]];
    app.graph.add(group);
  }
  app.graph.setDirtyCanvas(true, true);
}
"""

# Layout: columns of nodes, left to right as the data flows. Loaders in column A, the subject encoding in B,
# prompts and Apply nodes in C, sampling in D, decoding and saving in E.
XA, XB, XC = 0, 360, 680
COLUMN = 480  # width of one column of the C, D, E part
NOTE_POS, NOTE_HEIGHT = (0, -480), 420
PHOTO_SIZE = (320, 400)
APPLY_SIZE = (440, 360)

MODELS_NOTE = f"""
Models (standard file names; pick yours in the loaders if they differ):
- models/checkpoints/{CHECKPOINT} (SDXL base 1.0; SDXL fine-tunes work too)
- models/clip_vision/{CLIP_VISION} (the CLIP ViT-H/14 image encoder IP-Adapter uses: {CLIP_VISION_URL}, saved under that name)
- models/nested_attention/: the encoders exported by this pack's trainer, {FACES_ENCODER} (python -m training.run --domain faces) and {PETS_ENCODER} (--domain pets)
"""

PHOTOS_NOTE = """
Photos: the Load Image nodes name the pack's example images (workflows/input/ in the pack's folder). They are simple synthetic drawings (CC0), placeholders only: copy them into ComfyUI/input/ to run the graph as shipped, or better, load your own photos (a clear, well-lit photo of the subject; pets ideally on a white background).
"""

APPLY_NOTE = """
Apply Nested Attention: write the prompt in its text box; it must contain the subject word (the token field; empty = the encoder's own word). Its CONDITIONING output is the positive prompt of the KSampler: do not encode the prompt a second time. λ = 1 is the trained behaviour; a higher λ gives a stronger likeness and follows the rest of the prompt less.
"""


def _loaders(g: Graph) -> tuple[int, int]:
    """Checkpoint and CLIP vision loaders at the top of column A; returns their node indices."""
    # `models` lets the frontend offer the download when the file is missing (its "missing models" dialog).
    ckpt = g.node("CheckpointLoaderSimple", (XA, 0), size=(320, 100), ckpt_name=CHECKPOINT,
                  properties={"models": [{"name": CHECKPOINT, "url": CHECKPOINT_URL,
                                          "directory": "checkpoints"}]})
    vision = g.node("CLIPVisionLoader", (XA, 150), size=(320, 60), clip_name=CLIP_VISION)
    return ckpt, vision


def _subject(g: Graph, vision: int, encoder_file: str, images: list[str], *, y: int,
             title: str) -> tuple[int, int]:
    """Load Nested Encoder, Load Image(s), Image Batch (several photos) and Encode Subject Image(s).

    Returns (the Encode node, the x where the next column starts).
    """
    encoder = g.node("NestedAttentionLoadEncoder", (XA, y), size=(320, 80), encoder_name=encoder_file)
    g.link(vision, 0, encoder, "clip_vision")
    photos = [g.node("LoadImage", (XA + i * (PHOTO_SIZE[0] + 20), y + 130), size=PHOTO_SIZE, image=name,
                     title=f"{title} photo {i + 1}" if len(images) > 1 else f"{title} photo")
              for i, name in enumerate(images)]
    x = XB + (len(images) - 1) * (PHOTO_SIZE[0] + 20)
    image = photos[0]
    for i, other in enumerate(photos[1:]):  # several photos of one subject: one IMAGE batch
        batch = g.node("ImageBatch", (x, y + 180 + 100 * i), size=(280, 70))
        g.link(image, 0, batch, "image1")
        g.link(other, 0, batch, "image2")
        image = batch
    encode = g.node("NestedAttentionEncodeSubject", (x, y), size=(280, 138), title=f"Encode {title}")
    g.link(encoder, 0, encode, "encoder")
    g.link(image, 0, encode, "image")
    return encode, x + 320


def _apply(g: Graph, model: tuple[int, int], ckpt: int, subject: int, pos: tuple, *, text: str | None,
           token: str, lambda_: float = 1.0, title: str | None = None) -> int:
    widgets = {"token": token, "lambda_": lambda_, "start_percent": 0.0, "end_percent": 1.0}
    if text is not None:
        widgets["text"] = text
    apply = g.node("NestedAttentionApply", pos, title=title, size=APPLY_SIZE, **widgets)
    g.link(model[0], model[1], apply, "model")
    g.link(ckpt, 1, apply, "clip")
    g.link(subject, 0, apply, "subject")
    return apply


def _negative(g: Graph, ckpt: int, pos: tuple) -> int:
    negative = g.node("CLIPTextEncode", pos, title="Negative prompt", size=(440, 150), text=NEGATIVE)
    g.link(ckpt, 1, negative, "clip")
    return negative


def _latent(g: Graph, pos: tuple) -> int:
    return g.node("EmptyLatentImage", pos, size=(300, 110), width=1024, height=1024, batch_size=1)


def _sampler(g: Graph, model: tuple[int, int], positive: tuple[int, int], negative: int, latent: int,
             pos: tuple, *, seed: int = SEED, control: str = "randomize", title: str | None = None) -> int:
    sampler = g.node("KSampler", pos, title=title, size=(300, 270), seed=seed, control_after_generate=control,
                     steps=30, cfg=6.0, sampler_name="dpmpp_2m", scheduler="karras", denoise=1.0)
    g.link(model[0], model[1], sampler, "model")
    g.link(positive[0], positive[1], sampler, "positive")
    g.link(negative, 0, sampler, "negative")
    g.link(latent, 0, sampler, "latent_image")
    return sampler


def _decode_save(g: Graph, sampler: int, ckpt: int, pos: tuple, *, prefix: str,
                 title: str | None = None) -> None:
    decode = g.node("VAEDecode", pos, size=(200, 50))
    g.link(sampler, 0, decode, "samples")
    g.link(ckpt, 2, decode, "vae")
    save = g.node("SaveImage", (pos[0], pos[1] + 100), title=title, size=(440, 480), filename_prefix=prefix)
    g.link(decode, 0, save, "images")


def _single(name: str, title: str, encoder_file: str, images: list[str], token: str, text: str,
            about: str) -> Graph:
    """One subject, one image: the person, pet and several-photos workflows."""
    g = Graph()
    ckpt, vision = _loaders(g)
    encode, xc = _subject(g, vision, encoder_file, images, y=260, title=title)
    apply = _apply(g, (ckpt, 0), ckpt, encode, (xc, 0), text=text, token=token)
    negative = _negative(g, ckpt, (xc, 440))
    latent = _latent(g, (xc + COLUMN, 330))
    sampler = _sampler(g, (apply, 0), (apply, 1), negative, latent, (xc + COLUMN, 0))
    _decode_save(g, sampler, ckpt, (xc + COLUMN + 340, 0), prefix=f"nested_attention/{name}")
    g.note(NOTE_POS, (xc + 440, NOTE_HEIGHT),
           f"Nested Attention: {about}\n{MODELS_NOTE}{PHOTOS_NOTE}{APPLY_NOTE}")
    return g


def person_one_photo() -> Graph:
    return _single("person_one_photo", "person", FACES_ENCODER, PERSON_IMAGES[:1], "person",
                   "a photo of a person as an astronaut floating inside a space station, soft window light, "
                   "detailed",
                   "one person from one photo. The word 'person' in the prompt is rendered as the person in "
                   "the photo.")


def pet_one_photo() -> Graph:
    return _single("pet_one_photo", "pet", PETS_ENCODER, [PET_IMAGE], "pet",
                   "a photo of a pet wearing a tiny wizard hat, sitting on a stack of books in a cozy "
                   "library",
                   "one pet from one photo. The word 'pet' in the prompt is rendered as the animal in the "
                   "photo.")


def person_several_photos() -> Graph:
    return _single("person_several_photos", "person", FACES_ENCODER, PERSON_IMAGES, "person",
                   "a watercolor painting of a person reading a book in a sunlit cafe",
                   "one person from several photos. Image Batch joins the photos into one IMAGE batch; "
                   "Encode Subject Image(s) encodes each photo and concatenates their tokens (the paper's "
                   "multi-image form), which usually gives a steadier likeness than one photo. Add photos "
                   "with more Load Image + Image Batch nodes.")


def person_and_pet() -> Graph:
    g = Graph()
    ckpt, vision = _loaders(g)
    person, xc = _subject(g, vision, FACES_ENCODER, PERSON_IMAGES[:1], y=260, title="person")
    pet, _ = _subject(g, vision, PETS_ENCODER, [PET_IMAGE], y=860, title="pet")
    prompt = g.node("PrimitiveStringMultiline", (xc, 0), title="Prompt (shared by both Apply nodes)",
                    size=(440, 200),
                    value="a photo of a person hugging their pet on a beach at sunset, golden hour")
    apply_person = _apply(g, (ckpt, 0), ckpt, person, (xc, 260), text=None, token="person",
                          title="Apply Nested Attention: person")
    apply_pet = _apply(g, (apply_person, 0), ckpt, pet, (xc, 680), text=None, token="pet",
                       title="Apply Nested Attention: pet")
    g.link(prompt, 0, apply_person, "text")
    g.link(prompt, 0, apply_pet, "text")
    negative = _negative(g, ckpt, (xc, 1100))
    latent = _latent(g, (xc + COLUMN, 330))
    sampler = _sampler(g, (apply_pet, 0), (apply_pet, 1), negative, latent, (xc + COLUMN, 0))
    _decode_save(g, sampler, ckpt, (xc + COLUMN + 340, 0), prefix="nested_attention/person_and_pet")
    g.note(NOTE_POS, (xc + 440, NOTE_HEIGHT), f"""
Nested Attention: a person and a pet in one image. Two subjects of different domains are chained on one model: the first Apply node binds the word 'person' to the person's encoder, the second takes the first one's MODEL and binds 'pet' to the pet's encoder. Both must get the same prompt (here one String node feeds both text inputs), and the last Apply node's CONDITIONING goes to the KSampler. The order of the two Apply nodes does not matter.
{MODELS_NOTE}{PHOTOS_NOTE}""")
    return g


def lambda_sweep() -> Graph:
    g = Graph()
    ckpt, vision = _loaders(g)
    encode, xc = _subject(g, vision, FACES_ENCODER, PERSON_IMAGES[:1], y=260, title="person")
    seed = SEED
    prompt = g.node("PrimitiveStringMultiline", (xc, 0), title="Prompt (shared by all branches)",
                    size=(440, 200),
                    value="a pencil sketch of a person as a medieval knight in armour, castle in the "
                          "background")
    plain = g.node("CLIPTextEncode", (xc, 260), title="The prompt without nested attention", size=(440, 110))
    g.link(ckpt, 1, plain, "clip")
    g.link(prompt, 0, plain, "text")
    negative = _negative(g, ckpt, (xc, 430))
    latent = _latent(g, (xc, 640))
    branches = [(None, "reference: no nested attention")]
    branches += [(lam, f"λ = {lam:.1f}") for lam in (1.0, 2.0, 3.0, 4.0)]
    for i, (lam, label) in enumerate(branches):
        x = xc + COLUMN + i * COLUMN
        if lam is None:
            model, positive = (ckpt, 0), (plain, 0)
        else:
            apply = _apply(g, (ckpt, 0), ckpt, encode, (x, 0), text=None, token="person", lambda_=lam,
                           title=f"Apply Nested Attention ({label})")
            g.link(prompt, 0, apply, "text")
            model, positive = (apply, 0), (apply, 1)
        sampler = _sampler(g, model, positive, negative, latent, (x, 420), seed=seed, control="fixed",
                           title=f"KSampler ({label})")
        tag = "reference" if lam is None else f"lambda_{lam:.1f}"
        _decode_save(g, sampler, ckpt, (x, 740), prefix=f"nested_attention/lambda_sweep_{tag}",
                     title=f"Save ({label})")
    g.note(NOTE_POS, (xc + 440, NOTE_HEIGHT), f"""
Nested Attention: a λ sweep, the identity / prompt trade-off. One subject, one prompt, one fixed seed; each branch applies nested attention with another λ (1 = as trained; higher = more attention on the subject word: a stronger likeness, less of the rest of the prompt). The first branch samples the same prompt without nested attention, for reference. The KSamplers share the seed {seed} (control: fixed): change it on all of them together, or edit the λ of each Apply node.
{MODELS_NOTE}{PHOTOS_NOTE}""")
    return g


WORKFLOWS = {
    "person_one_photo": person_one_photo,
    "pet_one_photo": pet_one_photo,
    "person_several_photos": person_several_photos,
    "person_and_pet": person_and_pet,
    "lambda_sweep": lambda_sweep,
}


def _thumbnail(png: bytes, path: Path) -> None:
    image = Image.open(BytesIO(png)).convert("RGB")
    height = round(image.height * THUMBNAIL_WIDTH / image.width)
    image.resize((THUMBNAIL_WIDTH, height), Image.LANCZOS).save(path, quality=82, optimize=True)


def parse_args(args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"Workflows to regenerate, of: {', '.join(WORKFLOWS)} (default: all of them).")
    parser.add_argument("--out", type=Path, default=harness.WORKFLOWS_DIR,
                        help="Folder to write the workflows, thumbnails and input/ images to.")
    parsed = parser.parse_args(args)
    unknown = [n for n in parsed.names if n not in WORKFLOWS]
    if unknown:
        parser.error(f"unknown workflow(s) {', '.join(unknown)}; choose from {', '.join(WORKFLOWS)}")
    return parsed


def main(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(harness.REPO / "tests"))
    from tiny_models import find_comfyui  # the same ComfyUI the tests use

    make_example_images(args.out / "input")
    names = args.names or list(WORKFLOWS)
    with tempfile.TemporaryDirectory(prefix="nested-attention-workflows-") as tmp:
        base = Path(tmp) / "base"
        harness.prepare_base_dir(base, {harness.PACK_NAME: harness.REPO})
        for image in (args.out / "input").iterdir():
            (base / "input" / image.name).write_bytes(image.read_bytes())
        server = harness.ComfyServer(find_comfyui(), base, Path(tmp) / "server.log").start()
        try:
            with harness.Frontend(server) as frontend:
                for name in names:
                    graph = WORKFLOWS[name]()
                    frontend.evaluate(_BUILD_JS, graph.spec())
                    frontend.fit_view()
                    workflow = frontend.serialize()
                    for wanted, node in zip(graph.nodes, workflow["nodes"]):
                        if wanted["size"] and [round(v) for v in node["size"]] != wanted["size"]:
                            raise SystemExit(f"{name}: node #{node['id']} {node['type']} has size {node['size']}, "
                                             f"expected {wanted['size']}")
                    # A stable id per workflow, so that regenerating does not change files needlessly.
                    workflow["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{harness.PACK_NAME}/{name}"))
                    report = frontend.load_workflow(workflow, name)
                    problems = frontend.problems(report)
                    if problems:
                        raise SystemExit(f"{name}: the frontend does not load the generated workflow "
                                         f"cleanly: {problems}")
                    frontend.fit_view()
                    frontend.screenshot(harness.ARTIFACTS_DIR.parent / "workflows" / f"{name}.png")
                    text = json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"
                    (args.out / f"{name}.json").write_text(text)
                    frontend.evaluate("() => { window.app.extensionManager.focusMode = true; }")  # graph only
                    frontend.fit_view(harness.FOCUS_MODE_MARGINS)
                    _thumbnail(frontend.page.screenshot(), args.out / f"{name}.jpg")
                    frontend.evaluate("() => { window.app.extensionManager.focusMode = false; }")
                    print(f"[nested-attention] wrote {args.out / name}.json ({report['nodes']} nodes, "
                          f"{report['links']} links)")
        finally:
            server.stop()


if __name__ == "__main__":
    main(parse_args())
