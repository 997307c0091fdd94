"""Regenerate the shipped workflows (workflows/*.json) by building them in the real ComfyUI frontend.

    PYTHONPATH=/tmp/skimage .venv/bin/python tests/e2e/make_workflows.py

Starts ComfyUI with this pack (a throw-away --base-directory), opens its frontend in headless Chromium,
builds each graph with the frontend's own LiteGraph API (createNode, connect, widget values), and saves
`app.graph.serialize()`: exactly the format the frontend saves. Each file is then loaded back through the
frontend and must come back with no missing node and no refused widget value. Also writes a thumbnail per
workflow (`workflows/<name>.jpg`, which the template browser shows).

This file is the one place that names the model files the workflows use (MODELS) and their example photos.
The photos (`workflows/input/`) are copied from scikit-image's sample data, public domain and CC0 (see
workflows/README.md); scikit-image is needed only to remake them (`pip install --target /tmp/skimage
scikit-image`), never at run time. Existing photos are kept.
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

from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

# ------------------------------------------------------------------------------------------------
# The model files the workflows name, with where each comes from. Each loader node carries its entry in
# `properties.models` ([{name, url, directory}]), which the frontend's Missing Models dialog reads: it lists
# the entries whose name is the node's current widget value and whose file is not in that models folder, with
# a Download button (the ComfyUI desktop app saves the file under `name` in that folder; a browser saves it
# under the URL's last segment). The frontend accepts only https://huggingface.co/, https://civitai.com/
# and localhost URLs of .safetensors/.sft names, and drops an entry whose URL another entry already uses.

CHECKPOINT = "sd_xl_base_1.0.safetensors"
CLIP_VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
FACES_ENCODER = "faces-encoder.safetensors"
PETS_ENCODER = "pets-encoder.safetensors"
IPADAPTER_FACE = "ip-adapter-plus-face_sdxl_vit-h.safetensors"
IPADAPTER_PLUS = "ip-adapter-plus_sdxl_vit-h.safetensors"

HF = "https://huggingface.co"
MODELS = {
    CHECKPOINT: {"url": f"{HF}/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/{CHECKPOINT}",
                 "directory": "checkpoints"},
    # The ViT-H/14 image encoder IP-Adapter publishes; ComfyUI users keep it under the OpenCLIP name.
    CLIP_VISION: {"url": f"{HF}/h94/IP-Adapter/resolve/main/models/image_encoder/model.safetensors",
                  "directory": "clip_vision"},
    # No encoder in this pack's own format is published. Faces: the authors' release (CC BY-NC-SA 4.0);
    # pets: IP-Adapter Plus (Apache-2.0), the general-purpose file. Load Nested Encoder reads them by content.
    FACES_ENCODER: {"url": f"{HF}/orpatashnik/NestedAttentionEncoder/resolve/main/personalization_encoder/"
                           "model.safetensors", "directory": "nested_attention"},
    PETS_ENCODER: {"url": f"{HF}/h94/IP-Adapter/resolve/main/sdxl_models/"
                          "ip-adapter-plus_sdxl_vit-h.safetensors", "directory": "nested_attention"},
    # An alternative face encoder (Apache-2.0) that IPAdapter_plus users already keep; declared at the
    # workflow level (no widget names it), so the dialog offers it next to the authors' file.
    IPADAPTER_FACE: {"url": f"{HF}/h94/IP-Adapter/resolve/main/sdxl_models/{IPADAPTER_FACE}",
                     "directory": "ipadapter"},
    # The general IP-Adapter Plus file under its own name, where IPAdapter_plus users keep it (the same URL as
    # PETS_ENCODER's: a workflow names one or the other, never both).
    IPADAPTER_PLUS: {"url": f"{HF}/h94/IP-Adapter/resolve/main/sdxl_models/{IPADAPTER_PLUS}",
                     "directory": "ipadapter"},
}
# The files the loaders name, by models folder (the e2e server gets stand-ins for all of them).
MODEL_FILES = {"checkpoints": [CHECKPOINT], "clip_vision": [CLIP_VISION],
               "nested_attention": [FACES_ENCODER, PETS_ENCODER],
               "ipadapter": [IPADAPTER_FACE, IPADAPTER_PLUS]}


def model_entry(name: str) -> dict:
    """One `properties.models` entry, as the frontend reads it."""
    return {"name": name, **MODELS[name]}


# ------------------------------------------------------------------------------------------------
# Example photos (scikit-image's sample data: public domain and CC0)

PERSON_IMAGES = [f"nested_attention_person_{i}.jpg" for i in (1, 2, 3)]
PET_IMAGE = "nested_attention_pet.jpg"
NEGATIVE = "blurry, lowres, deformed, disfigured, watermark, text, signature"
SEED = 20250101
THUMBNAIL_WIDTH = 640


def make_example_images(folder: Path) -> None:
    """The person (astronaut Eileen Collins, NASA, public domain) and the pet (Chelsea the cat, CC0).

    The several-photos workflow gets three views of the one public-domain portrait (the whole photo, a
    closer crop of the face, the mirror image): a stand-in for several photos of one person.
    """
    if all((folder / name).is_file() for name in [*PERSON_IMAGES, PET_IMAGE]):
        return
    try:
        from skimage import data
    except ImportError as error:
        raise SystemExit("the example photos come from scikit-image's sample data: pip install --target "
                         "/tmp/skimage scikit-image, then run with PYTHONPATH=/tmp/skimage") from error
    folder.mkdir(parents=True, exist_ok=True)
    person = Image.fromarray(data.astronaut())  # 512 x 512
    views = [person, person.crop((112, 0, 368, 256)), ImageOps.mirror(person)]  # (256 x 256: not enlarged)
    for name, image in zip(PERSON_IMAGES, views):
        image.save(folder / name, quality=90, optimize=True)
    Image.fromarray(data.chelsea()).save(folder / PET_IMAGE, quality=90, optimize=True)  # 451 x 300, as shot


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

# Layout: columns of nodes, left to right as the data flows: loaders and photos in column A, the subject
# encoding in B, prompts and Apply nodes in C, sampling in D, decoding and saving in E; the notes above.
# Compact enough that a whole single-subject graph fits a 1600 x 1000 browser window at VIEW_SCALE.
XA, XB, XC = 0, 340, 660
XD, XE = XC + 440, XC + 760
NOTE_TOP, NOTE_HEIGHT = -230, 190  # the notes' title bars start 30 units higher
PHOTO_SIZE = (300, 320)
APPLY_SIZE = (400, 330)  # with its own prompt box
APPLY_LINKED_SIZE = (300, 250)  # prompt from a shared String node
BRANCH = 320  # the λ sweep's branch columns
# The zoom a workflow opens at (its saved extra.ds): the whole graph if it fits the reference window at
# VIEW_SCALE or more, else VIEW_SCALE on its top-left corner (notes and loaders). The frontend draws nodes
# without text below 8 px / (14 px * sqrt(devicePixelRatio)), i.e. a zoom of 0.571 at most (its default
# "Zoom Node Level of Detail - font size threshold", LiteGraph.Canvas.MinFontSizeForLOD = 8).
VIEW_SCALE, MAX_SCALE = 0.75, 1.0


def _read_me(about: str, extra: str = "") -> str:
    return f"""
## {about}

Put the model files where the **Models** note says (or pick your own in the loaders), then press **Run**.
The example photos are in the pack's `workflows/input/` (`python3 dev.py serve` copies them into ComfyUI's
input folder): a NASA portrait (public domain) and a cat photo (CC0). Load your own photos instead: a clear,
well-lit photo of the subject; pets ideally on a white background.

**Apply Nested Attention**: the prompt must contain the subject word (the *token* field). Its
CONDITIONING output is the KSampler's positive prompt: do not encode the prompt again. λ = 1 is the trained
behaviour; a higher λ gives a stronger likeness and follows the rest of the prompt less.
{extra}"""


def _models_note(encoders: list[str]) -> str:
    lines = [
        "Missing files are listed under *Missing Models* when the workflow opens (a dialog; in newer "
        "ComfyUI, the Errors panel that *View details* opens), each with a Download button. In a "
        "browser, save each download under the name shown, in the folder shown "
        "(under `ComfyUI/models/`):",
        f"- `checkpoints/{CHECKPOINT}`: [SDXL base 1.0]({MODELS[CHECKPOINT]['url']}) "
        "(or any SDXL checkpoint)",
        f"- `clip_vision/{CLIP_VISION}`: the [ViT-H/14 image encoder]({MODELS[CLIP_VISION]['url']}); "
        "it downloads as `model.safetensors`: **rename it**",
    ]
    if FACES_ENCODER in encoders:
        lines.append(
            f"- `nested_attention/{FACES_ENCODER}`: the authors' "
            f"[face encoder]({MODELS[FACES_ENCODER]['url']}) (CC BY-NC-SA 4.0, non-commercial; downloads as "
            f"`model.safetensors`: rename it), or [IP-Adapter Plus face]({MODELS[IPADAPTER_FACE]['url']}) "
            "(Apache-2.0) in `ipadapter/`, picked in Load Nested Encoder")
    if PETS_ENCODER in encoders:
        lines.append(
            f"- `nested_attention/{PETS_ENCODER}`: no pet encoder is published; train one "
            "(`python -m training.run --domain pets`) or use [IP-Adapter Plus]"
            f"({MODELS[PETS_ENCODER]['url']}) (Apache-2.0) under this name")
    if IPADAPTER_FACE in encoders:
        lines.append(f"- `ipadapter/{IPADAPTER_FACE}`: "
                     f"[IP-Adapter Plus face]({MODELS[IPADAPTER_FACE]['url']}) (Apache-2.0), for the person")
    if IPADAPTER_PLUS in encoders:
        lines.append(f"- `ipadapter/{IPADAPTER_PLUS}`: [IP-Adapter Plus]({MODELS[IPADAPTER_PLUS]['url']}) "
                     "(Apache-2.0), for the pet")
    if {IPADAPTER_FACE, IPADAPTER_PLUS} & set(encoders):
        lines.append("`models/ipadapter` is the folder ComfyUI_IPAdapter_plus reads too: files already there "
                     "need no second copy.")
    return "\n".join(lines)


def _notes(g: Graph, width: int, about: str, encoders: list[str], extra: str = "") -> None:
    """The "Read me" note (what the workflow does, how to use it) and the "Models" note beside it."""
    read_me_width = max(560, width - 700)
    g.node("MarkdownNote", (XA, NOTE_TOP), title="Read me", size=(read_me_width, NOTE_HEIGHT),
           text=_read_me(about, extra).strip())
    g.node("MarkdownNote", (XA + read_me_width + 40, NOTE_TOP),
           title="Models: what to download, where to put it",
           size=(width - read_me_width - 40, NOTE_HEIGHT), text=_models_note(encoders))


def _loaders(g: Graph) -> tuple[int, int]:
    """Checkpoint and CLIP vision loaders at the top of column A; returns their node indices."""
    ckpt = g.node("CheckpointLoaderSimple", (XA, 0), size=(300, 100), ckpt_name=CHECKPOINT,
                  properties={"models": [model_entry(CHECKPOINT)]})
    vision = g.node("CLIPVisionLoader", (XA, 140), size=(300, 60), clip_name=CLIP_VISION,
                    properties={"models": [model_entry(CLIP_VISION)]})
    return ckpt, vision


def _encoder(g: Graph, vision: int, encoder_file: str, pos: tuple) -> int:
    encoder = g.node("NestedAttentionLoadEncoder", pos, size=(300, 80), encoder_name=encoder_file,
                     properties={"models": [model_entry(encoder_file)]})
    g.link(vision, 0, encoder, "clip_vision")
    return encoder


def _encode(g: Graph, encoder: int, image: int, pos: tuple, title: str) -> int:
    encode = g.node("NestedAttentionEncodeSubject", pos, size=(280, 138), title=f"Encode {title}")
    g.link(encoder, 0, encode, "encoder")
    g.link(image, 0, encode, "image")
    return encode


def _subject(g: Graph, vision: int, encoder_file: str, image: str, *, y: int, title: str,
             photo_size: tuple = PHOTO_SIZE) -> int:
    """Load Nested Encoder, Load Image and Encode Subject Image(s); returns the Encode node."""
    encoder = _encoder(g, vision, encoder_file, (XA, y))
    photo = g.node("LoadImage", (XA, y + 120), size=photo_size, image=image, title=f"{title} photo")
    return _encode(g, encoder, photo, (XB, y), title)


def _apply(g: Graph, model: tuple[int, int], ckpt: int, subject: int, pos: tuple, *, text: str | None,
           token: str, lambda_: float = 1.0, title: str | None = None) -> int:
    widgets = {"token": token, "λ": lambda_, "start_percent": 0.0, "end_percent": 1.0}
    if text is not None:
        widgets["text"] = text
    apply = g.node("NestedAttentionApply", pos, title=title,
                   size=APPLY_SIZE if text is not None else APPLY_LINKED_SIZE, **widgets)
    g.link(model[0], model[1], apply, "model")
    g.link(ckpt, 1, apply, "clip")
    g.link(subject, 0, apply, "subject")
    return apply


def _negative(g: Graph, ckpt: int, pos: tuple, size: tuple = (400, 130)) -> int:
    negative = g.node("CLIPTextEncode", pos, title="Negative prompt", size=size, text=NEGATIVE)
    g.link(ckpt, 1, negative, "clip")
    return negative


def _latent(g: Graph, pos: tuple) -> int:
    return g.node("EmptyLatentImage", pos, size=(280, 110), width=1024, height=1024, batch_size=1)


def _sampler(g: Graph, model: tuple[int, int], positive: tuple[int, int], negative: int, latent: int,
             pos: tuple, *, seed: int = SEED, control: str = "randomize", title: str | None = None) -> int:
    sampler = g.node("KSampler", pos, title=title, size=(280, 270), seed=seed, control_after_generate=control,
                     steps=30, cfg=6.0, sampler_name="dpmpp_2m", scheduler="karras", denoise=1.0)
    g.link(model[0], model[1], sampler, "model")
    g.link(positive[0], positive[1], sampler, "positive")
    g.link(negative, 0, sampler, "negative")
    g.link(latent, 0, sampler, "latent_image")
    return sampler


def _decode_save(g: Graph, sampler: int, ckpt: int, pos: tuple, *, prefix: str, title: str | None = None,
                 size: tuple = (340, 380)) -> None:
    decode = g.node("VAEDecode", pos, size=(200, 50))
    g.link(sampler, 0, decode, "samples")
    g.link(ckpt, 2, decode, "vae")
    save = g.node("SaveImage", (pos[0], pos[1] + 100), title=title, size=size, filename_prefix=prefix)
    g.link(decode, 0, save, "images")


def _sample_and_save(g: Graph, ckpt: int, model: tuple, positive: tuple, negative: int, prefix: str) -> None:
    """Columns D and E: latent, KSampler, VAE Decode, Save Image."""
    latent = _latent(g, (XD, 320))
    sampler = _sampler(g, model, positive, negative, latent, (XD, 0))
    _decode_save(g, sampler, ckpt, (XE, 0), prefix=prefix)


SINGLE_WIDTH = XE + 340


def _single(name: str, title: str, encoder_file: str, image: str, token: str, text: str, about: str) -> Graph:
    """One subject from one photo: the person and pet workflows."""
    g = Graph()
    ckpt, vision = _loaders(g)
    encode = _subject(g, vision, encoder_file, image, y=260, title=title)
    apply = _apply(g, (ckpt, 0), ckpt, encode, (XC, 0), text=text, token=token)
    negative = _negative(g, ckpt, (XC, 380))
    _sample_and_save(g, ckpt, (apply, 0), (apply, 1), negative, f"nested_attention/{name}")
    _notes(g, SINGLE_WIDTH, about, [encoder_file])
    return g


def person_one_photo() -> Graph:
    return _single("person_one_photo", "person", FACES_ENCODER, PERSON_IMAGES[0], "person",
                   "a photo of a person as an astronaut floating inside a space station, soft window light, "
                   "detailed",
                   "One person from one photo: the word *person* in the prompt becomes the person in the "
                   "photo")


def pet_one_photo() -> Graph:
    return _single("pet_one_photo", "pet", PETS_ENCODER, PET_IMAGE, "pet",
                   "a photo of a pet wearing a tiny wizard hat, sitting on a stack of books in a cozy "
                   "library",
                   "One pet from one photo: the word *pet* in the prompt becomes the animal in the photo")


def person_several_photos() -> Graph:
    g = Graph()
    ckpt, vision = _loaders(g)
    encoder = _encoder(g, vision, FACES_ENCODER, (XA, 260))
    size = (200, 320)  # the frontend's smallest Load Image with a preview
    photos = [g.node("LoadImage", (XA + i * (size[0] + 20), 400), size=size, image=name,
                     title=f"person photo {i + 1}") for i, name in enumerate(PERSON_IMAGES)]
    image = photos[0]
    for i, other in enumerate(photos[1:]):  # several photos of one subject: one IMAGE batch
        batch = g.node("ImageBatch", (XB, 150 + 100 * i), size=(280, 70))
        g.link(image, 0, batch, "image1")
        g.link(other, 0, batch, "image2")
        image = batch
    encode = _encode(g, encoder, image, (XB, 0), "person")
    apply = _apply(g, (ckpt, 0), ckpt, encode, (XC, 0), token="person",
                   text="a watercolor painting of a person reading a book in a sunlit cafe")
    negative = _negative(g, ckpt, (XC, 380))
    _sample_and_save(g, ckpt, (apply, 0), (apply, 1), negative, "nested_attention/person_several_photos")
    _notes(g, SINGLE_WIDTH, "One person from several photos", [FACES_ENCODER], """
**Image Batch** joins the photos into one IMAGE batch; **Encode Subject Image(s)** encodes each photo and
concatenates their tokens (the paper's multi-image form), which usually gives a steadier likeness than one
photo. Add photos with more Load Image + Image Batch nodes. (The examples are three views of one
portrait.)""")
    return g


def _person_and_pet(person_file: str, pet_file: str, text: str, prefix: str, about: str, extra: str) -> Graph:
    """A person and a pet on one model: two encoders, two Apply nodes chained, one prompt for both."""
    g = Graph()
    ckpt, vision = _loaders(g)
    person_encoder = _encoder(g, vision, person_file, (XA, 260))
    person_photo = g.node("LoadImage", (XA, 380), size=PHOTO_SIZE, image=PERSON_IMAGES[0],
                          title="person photo")
    person = _encode(g, person_encoder, person_photo, (XB, 0), "person")
    pet = g.node("NestedAttentionEncodeSubject", (XB, 170), size=(280, 138), title="Encode pet")
    pet_encoder = g.node("NestedAttentionLoadEncoder", (XB, 340), size=(280, 80), encoder_name=pet_file,
                         properties={"models": [model_entry(pet_file)]})
    g.link(vision, 0, pet_encoder, "clip_vision")
    pet_photo = g.node("LoadImage", (XB, 460), size=(280, 320), image=PET_IMAGE, title="pet photo")
    g.link(pet_encoder, 0, pet, "encoder")
    g.link(pet_photo, 0, pet, "image")
    prompt = g.node("PrimitiveStringMultiline", (XC, 0), title="Prompt (shared by both Apply nodes)",
                    size=(400, 120), value=text)
    apply_person = _apply(g, (ckpt, 0), ckpt, person, (XC, 170), text=None, token="person",
                          title="Apply Nested Attention: person")
    apply_pet = _apply(g, (apply_person, 0), ckpt, pet, (XC, 460), text=None, token="pet",
                       title="Apply Nested Attention: pet")
    g.link(prompt, 0, apply_person, "text")
    g.link(prompt, 0, apply_pet, "text")
    negative = _negative(g, ckpt, (XD, 480), size=(280, 110))
    _sample_and_save(g, ckpt, (apply_pet, 0), (apply_pet, 1), negative, prefix)
    _notes(g, SINGLE_WIDTH, about, [person_file, pet_file], extra)
    return g


def person_and_pet() -> Graph:
    return _person_and_pet(
        FACES_ENCODER, PETS_ENCODER,
        "a photo of a person hugging their pet on a beach at sunset, golden hour",
        "nested_attention/person_and_pet", "A person and a pet in one picture", """
Two subjects of different domains on one model: the first Apply node binds *person* to the person's encoder,
the second takes its MODEL and binds *pet*. Both get the same prompt (one String node feeds both), the last
Apply node's CONDITIONING goes to the KSampler, and their order does not matter.""")


def ip_adapter_person_and_pet() -> Graph:
    """A person and a pet with IP-Adapter Plus files as the encoders (no trained pack encoder needed)."""
    return _person_and_pet(
        IPADAPTER_FACE, IPADAPTER_PLUS,
        "a photo of a person walking their pet through a snowy park, winter coat, soft light, bokeh",
        "nested_attention/ip_adapter_person_and_pet", "A person and a pet with IP-Adapter Plus files", """
Load Nested Encoder also lists `models/ipadapter` and reads an IP-Adapter Plus SDXL file as a nested encoder.
Unlike IP-Adapter, which adds the image to every word, each image is bound to one word (*person* to the face
file, *pet* to the general one), so the rest of the prompt keeps its meaning. The two Apply nodes are chained
and share one prompt. Quality with these weights has not been measured yet: try λ between 1 and 3.""")


def lambda_sweep() -> Graph:
    g = Graph()
    ckpt, vision = _loaders(g)
    encode = _subject(g, vision, FACES_ENCODER, PERSON_IMAGES[0], y=260, title="person")
    seed = SEED
    prompt = g.node("PrimitiveStringMultiline", (XC, 0), title="Prompt (shared by all branches)",
                    size=(400, 140),
                    value="a pencil sketch of a person as a medieval knight in armour, castle in the "
                          "background")
    plain = g.node("CLIPTextEncode", (XC, 200), title="The prompt without nested attention", size=(400, 80))
    g.link(ckpt, 1, plain, "clip")
    g.link(prompt, 0, plain, "text")
    negative = _negative(g, ckpt, (XC, 340))
    latent = _latent(g, (XC, 530))
    branches = [(None, "reference: no nested attention")]
    branches += [(lam, f"λ = {lam:.1f}") for lam in (1.0, 2.0, 3.0, 4.0)]
    x0 = XC + 440
    for i, (lam, label) in enumerate(branches):
        x = x0 + i * BRANCH
        if lam is None:
            model, positive = (ckpt, 0), (plain, 0)
        else:
            apply = _apply(g, (ckpt, 0), ckpt, encode, (x, 0), text=None, token="person", lambda_=lam,
                           title=f"Apply Nested Attention ({label})")
            g.link(prompt, 0, apply, "text")
            model, positive = (apply, 0), (apply, 1)
        sampler = _sampler(g, model, positive, negative, latent, (x, 300), seed=seed, control="fixed",
                           title=f"KSampler ({label})")
        tag = "reference" if lam is None else f"lambda_{lam:.1f}"
        _decode_save(g, sampler, ckpt, (x, 620), prefix=f"nested_attention/lambda_sweep_{tag}",
                     title=f"Save ({label})", size=(300, 300))
    _notes(g, SINGLE_WIDTH, "A λ sweep: likeness against prompt", [FACES_ENCODER], f"""
One subject, one prompt, one fixed seed ({seed}); each branch to the right applies nested attention with
another λ (1 = as trained; higher = more attention on the subject word). The first branch samples the same
prompt without nested attention, for reference. Change the seed on all KSamplers together.""")
    return g


# File name -> graph. The template browser shows a custom node pack's workflows by file name only (as the
# card's title, and with - and _ as spaces as its description; no index.json or extra field is read for
# them), so the names say what each workflow does.
WORKFLOWS = {
    "Person from one photo": person_one_photo,
    "Pet from one photo": pet_one_photo,
    "Person from several photos": person_several_photos,
    "Person and pet in one picture": person_and_pet,
    "Likeness vs prompt, lambda sweep": lambda_sweep,
    "Person and pet with IP-Adapter Plus": ip_adapter_person_and_pet,
}
# Declared for the whole workflow (the frontend reads a top-level `models` list too): files no widget names,
# here the alternative to the authors' face encoder, for the workflows that name that one.
WORKFLOW_MODELS = {name: [model_entry(IPADAPTER_FACE)] for name, make in WORKFLOWS.items()
                   if make not in (pet_one_photo, ip_adapter_person_and_pet)}

# Runs in the page: the saved view. The whole graph in the reference window (its margins: left, top, right,
# bottom) at up to MAX_SCALE; if that needs less than VIEW_SCALE, VIEW_SCALE on the top-left corner instead.
_VIEW_JS = """
([[left, top, right, bottom], minScale, maxScale]) => {
  const app = window.app, canvas = app.canvas, nodes = app.graph.nodes;
  const title = window.LiteGraph.NODE_TITLE_HEIGHT;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  const w = canvas.canvas.width / window.devicePixelRatio - left - right;
  const h = canvas.canvas.height / window.devicePixelRatio - top - bottom;
  const fit = Math.min(w / (x1 - x0), h / (y1 - y0), maxScale);
  const scale = fit >= minScale ? fit : minScale;
  canvas.ds.scale = scale;
  canvas.ds.offset = fit >= minScale
    ? [left / scale + (w / scale - (x1 - x0)) / 2 - x0, top / scale + (h / scale - (y1 - y0)) / 2 - y0]
    : [left / scale - x0, top / scale - y0];
  canvas.setDirty(true, true);
  return {scale, fits: fit >= minScale};
}
"""


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
        # The test pack registers the ipadapter folder as IPAdapter_plus does (a workflow names a file there).
        harness.prepare_base_dir(base, {harness.PACK_NAME: harness.REPO,
                                        harness.TINY_PACK_NAME: harness.TINY_PACK_DIR})
        for image in (args.out / "input").iterdir():
            (base / "input" / image.name).write_bytes(image.read_bytes())
        server = harness.ComfyServer(find_comfyui(), base, Path(tmp) / "server.log").start()
        try:
            with harness.Frontend(server) as frontend:
                for name in names:
                    graph = WORKFLOWS[name]()
                    frontend.evaluate(_BUILD_JS, graph.spec())
                    view = frontend.evaluate(_VIEW_JS, [list(harness.FIT_MARGINS), VIEW_SCALE, MAX_SCALE])
                    workflow = frontend.serialize()
                    for wanted, node in zip(graph.nodes, workflow["nodes"]):
                        if wanted["size"] and [round(v) for v in node["size"]] != wanted["size"]:
                            raise SystemExit(f"{name}: node #{node['id']} {node['type']} has size {node['size']}, "
                                             f"expected {wanted['size']}")
                    # A stable id per workflow, so that regenerating does not change files needlessly.
                    workflow["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{harness.PACK_NAME}/{name}"))
                    if WORKFLOW_MODELS.get(name):
                        workflow["models"] = WORKFLOW_MODELS[name]
                    report = frontend.load_workflow(workflow, name)
                    problems = frontend.problems(report)
                    if problems:
                        raise SystemExit(f"{name}: the frontend does not load the generated workflow "
                                         f"cleanly: {problems}")
                    frontend.screenshot(harness.ARTIFACTS_DIR.parent / "workflows" / f"{name}.png")
                    text = json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"
                    (args.out / f"{name}.json").write_text(text)
                    # The thumbnail: the whole graph, drawn in full detail however small (a card, not a view).
                    frontend.evaluate("() => { window.app.extensionManager.focusMode = true;"
                                      " window.app.canvas.min_font_size_for_lod = 0; }")
                    frontend.fit_view(harness.FOCUS_MODE_MARGINS)
                    _thumbnail(frontend.page.screenshot(), args.out / f"{name}.jpg")
                    frontend.evaluate("() => { window.app.extensionManager.focusMode = false;"
                                      " window.app.canvas.min_font_size_for_lod = 8; }")
                    print(f"[nested-attention] wrote {args.out / name}.json ({report['nodes']} nodes, "
                          f"{report['links']} links; opens at {view['scale']:.2f}"
                          f"{', whole graph in view' if view['fits'] else ', top-left corner'})")
        finally:
            server.stop()


if __name__ == "__main__":
    main(parse_args())
