"""Build the shipped workflows (workflows/*.json and their thumbnails) in the real ComfyUI frontend.

    python3 dev.py workflows [NAME ...]        all of them, or the ones named
    python3 dev.py workflows --check           build them and compare with the files, writing nothing

Starts ComfyUI with this pack (a throw-away --base-directory), opens its frontend in headless Chromium
(tests/e2e/harness.py, the browser driver the e2e tests use), builds each graph with the frontend's own
LiteGraph API (createNode, connect, widget values) and saves `app.graph.serialize()`: exactly the format the
frontend saves. Each file is then loaded back through the frontend and must come back with no missing node and
no refused widget value. Also writes a thumbnail per workflow (`workflows/<name>.jpg`, which the template
browser shows). tests/e2e/test_workflow_files.py builds them again in the frontend the tests run and checks
the shipped files are what this file makes.

Each workflow is one function below (WORKFLOWS); the layout helpers stack nodes with room for what both of the
frontend's renderers draw around them (tests/e2e/test_workflow_layout.py checks it on every frontend tested).
This file is the one place that names the model files the workflows use (MODELS) and their example photos.
The photos (`workflows/input/`) are copied from scikit-image's sample data, public domain and CC0 (see
workflows/README.md); scikit-image is needed only to remake them (`pip install --target /tmp/skimage
scikit-image`), never at run time. Existing photos are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from nested_attention.logs import LOG_PREFIX

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS_DIR = REPO / "workflows"
# The browser driver the e2e tests use (a real server, headless Chromium): one implementation for both.
HARNESS_DIR = REPO / "tests" / "e2e"

# ------------------------------------------------------------------------------------------------
# The model files the loaders name, with where each comes from. Each loader node carries its entry in
# `properties.models` ([{name, url, directory}]), which the frontend's Missing Models list reads: it lists the
# entries whose name is the node's current widget value and whose file is not in that models folder, with a
# Download button (the ComfyUI desktop app saves the file under `name` in that folder; a browser saves it under
# the URL's last segment). The frontend accepts only https://huggingface.co/, https://civitai.com/ and
# localhost URLs of .safetensors/.sft names. Only files a loader names are listed: an optional file would
# show up there as if it were needed (frontend 1.32 lists a workflow's top-level `models` too).

CHECKPOINT = "sd_xl_base_1.0.safetensors"
CLIP_VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
IPADAPTER_FACE = "ip-adapter-plus-face_sdxl_vit-h.safetensors"
IPADAPTER_PLUS = "ip-adapter-plus_sdxl_vit-h.safetensors"
SDXL_INPAINTING = "sdxl-inpainting-0.1-unet.fp16.safetensors"

HF = "https://huggingface.co"
MODELS = {
    CHECKPOINT: {"url": f"{HF}/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/{CHECKPOINT}",
                 "directory": "checkpoints"},
    # The ViT-H/14 image encoder IP-Adapter publishes; ComfyUI users keep it under the OpenCLIP name.
    CLIP_VISION: {"url": f"{HF}/h94/IP-Adapter/resolve/main/models/image_encoder/model.safetensors",
                  "directory": "clip_vision"},
    # The default encoders (Apache-2.0): IP-Adapter Plus SDXL files, the layout Load Nested Encoder is proven to
    # read (README, Models), in the folder ComfyUI_IPAdapter_plus reads too.
    IPADAPTER_FACE: {"url": f"{HF}/h94/IP-Adapter/resolve/main/sdxl_models/{IPADAPTER_FACE}",
                     "directory": "ipadapter"},
    IPADAPTER_PLUS: {"url": f"{HF}/h94/IP-Adapter/resolve/main/sdxl_models/{IPADAPTER_PLUS}",
                     "directory": "ipadapter"},
    # The SDXL inpainting UNet (9 input channels) of the diffusers team, for Load Diffusion Model; CLIP and
    # VAE come from SDXL base. CreativeML Open RAIL++-M.
    SDXL_INPAINTING: {"url": f"{HF}/diffusers/stable-diffusion-xl-1.0-inpainting-0.1/resolve/main/unet/"
                             "diffusion_pytorch_model.fp16.safetensors", "directory": "diffusion_models"},
}
# The files the loaders name, by models folder (the e2e server gets stand-ins for all of them).
MODEL_FILES = {"checkpoints": [CHECKPOINT], "clip_vision": [CLIP_VISION],
               "ipadapter": [IPADAPTER_FACE, IPADAPTER_PLUS], "diffusion_models": [SDXL_INPAINTING]}
# The alternative face encoder, offered in the Models notes only: the authors' release (CC BY-NC-SA 4.0,
# non-commercial), whose real file this pack has not read yet. No loader names it.
AUTHORS_FACE_ENCODER = {"directory": "nested_attention",
                        "url": f"{HF}/orpatashnik/NestedAttentionEncoder/resolve/main/personalization_encoder/"
                               "model.safetensors"}


def model_entry(name: str) -> dict:
    """One `properties.models` entry, as the frontend reads it."""
    return {"name": name, **MODELS[name]}


# ------------------------------------------------------------------------------------------------
# Example photos (scikit-image's sample data: public domain and CC0)

PERSON_IMAGES = [f"nested_attention_person_{i}.jpg" for i in (1, 2, 3)]
PET_IMAGE = "nested_attention_pet.jpg"
MAN_IMAGE = "nested_attention_man.jpg"
SCENE_IMAGE = "nested_attention_launch_pad.png"
SCENE_REGION = (60, 120, 260, 427)  # left, top, right, bottom: where the person goes (transparent in the PNG)
NEGATIVE = "blurry, lowres, deformed, disfigured, watermark, text, signature"
SEED = 20250101
THUMBNAIL_WIDTH = 640


def make_example_images(folder: Path) -> None:
    """The person (astronaut Eileen Collins, NASA, public domain), the pet (Chelsea the cat, CC0), the man of
    the two-people workflow (scikit-image's "camera": Lav Varshney's photo, CC0) and the scene of the
    inpainting workflows (scikit-image's "rocket": SpaceX's Falcon 9 on Launch Complex 40, public domain).

    The several-photos workflow gets three views of the one public-domain portrait (the whole photo, a
    closer crop of the face, the mirror image): a stand-in for several photos of one person. The scene is a
    PNG whose region for the person is transparent: Load Image's MASK is 1 there (1 - alpha), exactly what
    painting it in ComfyUI's mask editor gives; the pixels under it are kept.
    """
    names = [*PERSON_IMAGES, PET_IMAGE, MAN_IMAGE, SCENE_IMAGE]
    missing = [name for name in names if not (folder / name).is_file()]
    if not missing:
        return
    try:
        from skimage import data
    except ImportError as error:
        raise SystemExit("the example photos come from scikit-image's sample data: pip install --target "
                         "/tmp/skimage scikit-image, then run with PYTHONPATH=/tmp/skimage") from error
    folder.mkdir(parents=True, exist_ok=True)
    person = Image.fromarray(data.astronaut())  # 512 x 512
    views = [person, person.crop((112, 0, 368, 256)), ImageOps.mirror(person)]  # (256 x 256: not enlarged)
    scene = Image.fromarray(data.rocket()).convert("RGBA")  # 640 x 427, as shot
    alpha = Image.new("L", scene.size, 255)
    alpha.paste(0, SCENE_REGION)
    scene.putalpha(alpha)
    images = {**dict(zip(PERSON_IMAGES, views)),
              PET_IMAGE: Image.fromarray(data.chelsea()),  # 451 x 300, as shot
              MAN_IMAGE: Image.fromarray(data.camera()),  # 512 x 512, grey
              SCENE_IMAGE: scene}
    for name in missing:  # the others are kept as they are
        images[name].save(folder / name, optimize=True, **({"quality": 90} if name.endswith(".jpg") else {}))


# ------------------------------------------------------------------------------------------------
# Graph specs, built in the page by _BUILD_JS


@dataclass
class Graph:
    nodes: list = field(default_factory=list)
    links: list = field(default_factory=list)
    groups: list = field(default_factory=list)

    def node(self, type_: str, pos: tuple, *, size: tuple, title: str | None = None,
             properties: dict | None = None, **widgets: Any) -> int:
        self.nodes.append({"type": type_, "pos": list(pos), "title": title, "size": list(size),
                           "properties": properties or {}, "widgets": widgets})
        return len(self.nodes) - 1

    def link(self, src: int, output: int | str, dst: int, input_name: str) -> None:
        self.links.append([src, output, dst, input_name])

    def bottom(self, node: int) -> int:
        """Where the next node of this node's column goes (its pos[1]), leaving room for that node's title bar
        and badges: GAP_Y below this node's body."""
        spec = self.nodes[node]
        return spec["pos"][1] + spec["size"][1] + GAP_Y

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
    n.setSize(s.size);
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
  window.__nestedAttentionMade = made;
}
"""

# Runs in the page once the graph _BUILD_JS made has settled (the frontend may grow nodes while their image
# previews load): the sizes of the spec win; then the check that every node holds what it draws, and the groups.
_BUILD_FINISH_JS = """
(spec) => {
  const app = window.app, LG = window.LiteGraph, made = window.__nestedAttentionMade;
  delete window.__nestedAttentionMade;
  made.forEach((n, i) => n.setSize(spec.nodes[i].size));
  // Nothing may be drawn outside a node: each size holds what the node draws (its computeSize).
  const small = made.map((n) => [n, n.computeSize()]).filter(([n, min]) => n.size[0] < min[0] || n.size[1] < min[1]);
  if (small.length)
    throw new Error(small.map(([n, min]) => `${n.type} "${n.title}" is ${n.size}, needs at least ${min}`).join('; '));
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
# encoding in B, prompts and Apply nodes in C, sampling in D, decoding and saving in E; the two notes above.
#
# Room around each node, for what the frontend draws outside its saved size: the title bar (30 units above
# pos) and, in the classic renderer, node badges above the title bar (the pack's name on its nodes, "DEPR" on
# a deprecated one: 20 units plus a gap of 2). The Nodes 2.0 renderer draws each node at its saved position,
# at least its saved size, and grows a node whose content needs more; the sizes below hold what it draws in
# 1.32, 1.48 and 1.58 (build() tags the layout so that none rescales it). GAP_Y is the distance from one node's
# body to the pos of the node below it; GAP_X the distance between columns.
GAP_X, GAP_Y = 50, 80
WIDTH_A, WIDTH_B, WIDTH_C, WIDTH_D, WIDTH_E = 320, 300, 420, 300, 360
XA = 0
XB = XA + WIDTH_A + GAP_X
XC = XB + WIDTH_B + GAP_X
XD = XC + WIDTH_C + GAP_X
XE = XD + WIDTH_D + GAP_X
# The nodes' heights (their widths are the column's).
CHECKPOINT_H, CLIP_VISION_H, ENCODER_H, PHOTO_H = 100, 60, 90, 340
SQUARE_PHOTO_H = 400  # a square photo with a node below it: Nodes 2.0 draws it taller than PHOTO_H
PHOTO_ROW_WIDTH = 240  # photos side by side
# Encode Subject Image(s) with its four widgets (crop, align, face_index, mask_marks) and Apply Nested Attention
# with region: measured in 1.32.9 and 1.58.1, the classic renderer needs 170 and 268 (computeSize), Nodes 2.0
# draws Encode 232 (1.32) / 210 (1.58) tall below its title, Apply as given or up to 30 taller (the layout leaves
# room below each for that; tests/e2e/test_workflow_layout.py checks both renderers).
ENCODE_H = 190
APPLY_H, APPLY_LINKED_H = 390, 310
PROMPT_H, NEGATIVE_H, LATENT_H = 130, 140, 120
SAMPLER_H, DECODE_H, SAVE_H = 280, 60, 380
BATCH_H = 80
UNET_H, SCALE_H, INPAINT_H = 100, 100, 160  # Load Diffusion Model, Upscale Image By, InpaintModelConditioning
SOLID_MASK_H, COMPOSITE_H, INVERT_H = 130, 150, 60  # the two-people regions
CAPTURE_H, MAPS_H, QUERY_MAPS_H, MAP_SAVE_H = 150, 170, 90, 320  # seeing inside
# The notes: "Read me" and "Models" side by side above the graph, both in view as the workflow opens. Their
# heights (given per workflow) hold their text in 1.32's Nodes 2.0, which draws it at 14 px (10 px elsewhere).
NOTE_GAP = 40
READ_ME_WIDTH, MODELS_WIDTH = 680, 620
# The zoom a workflow opens at (its saved extra.ds), on its top-left corner (the notes and the first loaders).
# The notes' body text is 10 px at zoom 1 (classic, and Nodes 2.0 from 1.48), so at 1.1 it is 11 px on screen;
# far above the low-detail threshold too (the frontend draws nodes without text below 8 px / (14 px *
# sqrt(devicePixelRatio)): a zoom of 0.571 at most).
OPEN_SCALE = 1.1
OPEN_MARGINS = (80, 110)  # where the graph's top-left corner opens (left, top): clear of the sidebar and the tabs


def _read_me(about: str, extra: str = "") -> str:
    # Short: frontend 1.32's Nodes 2.0 draws note text at 14 px (10 px elsewhere), and a note grows to fit it.
    # Markdown without inline code, which 1.32's Nodes 2.0 draws dark blue on blue.
    return f"""
## {about}

Get the files the **Models** note lists and press **Run**; then load your own photo (clear, well lit; pets
ideally on white). The example photos are in the pack's workflows/input folder.

**Apply Nested Attention** binds the photo to one word of the prompt (*token*), so the rest of the prompt keeps
its meaning; its CONDITIONING is the positive prompt. λ = 1 is as trained; higher gives a stronger
likeness and less of the rest of the prompt. With IP-Adapter Plus files as encoders (quality not yet measured),
try λ 1 to 3.
{extra}"""


def _models_note(files: list[str]) -> str:
    """What to download: the files the loaders name (the Missing Models list offers them too; `files` are the
    ones beside the checkpoint and the CLIP vision file), then the optional alternatives."""
    def needed(name: str, what: str) -> str:
        return f"- {MODELS[name]['directory']}/**{name}**: [{what}]({MODELS[name]['url']})"

    lines = [
        "In ComfyUI/models (Missing Models offers each; a browser saves it as the link's last part):",
        needed(CHECKPOINT, "SDXL base 1.0") + ", or any SDXL checkpoint",
        needed(CLIP_VISION, "ViT-H/14 image encoder") + ": rename model.safetensors to this",
    ]
    if IPADAPTER_FACE in files:
        lines.append(needed(IPADAPTER_FACE, "IP-Adapter Plus Face") + " (Apache-2.0), the person's encoder")
    if IPADAPTER_PLUS in files:
        lines.append(needed(IPADAPTER_PLUS, "IP-Adapter Plus") + " (Apache-2.0), the pet's encoder")
    if SDXL_INPAINTING in files:
        lines.append(needed(SDXL_INPAINTING, "SDXL inpainting UNet") + " (CreativeML Open RAIL++-M): rename "
                     "diffusion_pytorch_model.fp16.safetensors to this; CLIP and VAE come from the "
                     "checkpoint")
    optional = []
    if IPADAPTER_FACE in files:
        optional.append(f"the authors' [face encoder]({AUTHORS_FACE_ENCODER['url']}) (CC BY-NC-SA 4.0, "
                        "non-commercial; not yet tried with this pack) in "
                        f"{AUTHORS_FACE_ENCODER['directory']}/")
    if IPADAPTER_PLUS in files:
        optional.append("a pet encoder you train (python -m training.run --domain pets) in nested_attention/")
    lines += ["", f"**Optional**, picked in Load Nested Encoder: {'; '.join(optional)}."]
    return "\n".join(lines)


def _notes(g: Graph, height: int, about: str, files: list[str], extra: str = "") -> None:
    """The "Read me" note (what the workflow does, how to use it) and the "Models" note beside it, above the
    graph (which starts at y = 0)."""
    y = -(height + GAP_Y)
    g.node("MarkdownNote", (XA, y), title="Read me", size=(READ_ME_WIDTH, height),
           text=_read_me(about, extra).strip())
    g.node("MarkdownNote", (XA + READ_ME_WIDTH + NOTE_GAP, y), title="Models: what to download, where to put it",
           size=(MODELS_WIDTH, height), text=_models_note(files))


def _loaders(g: Graph) -> tuple[int, int]:
    """Checkpoint and CLIP vision loaders at the top of column A; returns their node indices."""
    ckpt = g.node("CheckpointLoaderSimple", (XA, 0), size=(WIDTH_A, CHECKPOINT_H), ckpt_name=CHECKPOINT,
                  properties={"models": [model_entry(CHECKPOINT)]})
    vision = g.node("CLIPVisionLoader", (XA, g.bottom(ckpt)), size=(WIDTH_A, CLIP_VISION_H), clip_name=CLIP_VISION,
                    properties={"models": [model_entry(CLIP_VISION)]})
    return ckpt, vision


def _encoder(g: Graph, vision: int, encoder_file: str, pos: tuple, width: int = WIDTH_A) -> int:
    encoder = g.node("NestedAttentionLoadEncoder", pos, size=(width, ENCODER_H), encoder_name=encoder_file,
                     properties={"models": [model_entry(encoder_file)]})
    g.link(vision, 0, encoder, "clip_vision")
    return encoder


def _photo(g: Graph, image: str, pos: tuple, title: str, width: int = WIDTH_A, height: int = PHOTO_H) -> int:
    return g.node("LoadImage", pos, size=(width, height), image=image, title=title)


def _encode(g: Graph, encoder: int, image: int, pos: tuple, title: str) -> int:
    encode = g.node("NestedAttentionEncodeSubject", pos, size=(WIDTH_B, ENCODE_H), title=f"Encode {title}")
    g.link(encoder, 0, encode, "encoder")
    g.link(image, 0, encode, "image")
    return encode


def _subject(g: Graph, vision: int, encoder_file: str, image: str, *, y: int, title: str) -> int:
    """Load Nested Encoder and Load Image in column A, Encode Subject Image(s) beside them in B; returns the
    Encode node."""
    encoder = _encoder(g, vision, encoder_file, (XA, y))
    photo = _photo(g, image, (XA, g.bottom(encoder)), f"{title} photo")
    return _encode(g, encoder, photo, (XB, y), title)


def _apply(g: Graph, model: tuple[int, int], ckpt: int, subject: int, pos: tuple, *, text: str | None,
           token: str, lambda_: float = 1.0, title: str | None = None, width: int = WIDTH_C) -> int:
    widgets = {"token": token, "λ": lambda_, "start_percent": 0.0, "end_percent": 1.0}
    if text is not None:
        widgets["text"] = text
    apply = g.node("NestedAttentionApply", pos, title=title,
                   size=(width, APPLY_H if text is not None else APPLY_LINKED_H), **widgets)
    g.link(model[0], model[1], apply, "model")
    g.link(ckpt, 1, apply, "clip")
    g.link(subject, 0, apply, "subject")
    return apply


def _negative(g: Graph, ckpt: int, pos: tuple, width: int = WIDTH_C) -> int:
    negative = g.node("CLIPTextEncode", pos, title="Negative prompt", size=(width, NEGATIVE_H), text=NEGATIVE)
    g.link(ckpt, 1, negative, "clip")
    return negative


def _latent(g: Graph, pos: tuple, width: int = WIDTH_D) -> int:
    return g.node("EmptyLatentImage", pos, size=(width, LATENT_H), width=1024, height=1024, batch_size=1)


def _sampler(g: Graph, model: tuple[int, int], positive: tuple[int, int], negative: tuple[int, int],
             latent: tuple[int, int], pos: tuple, *, seed: int = SEED, control: str = "randomize",
             title: str | None = None, width: int = WIDTH_D) -> int:
    """KSampler; its inputs are (node, output slot)."""
    sampler = g.node("KSampler", pos, title=title, size=(width, SAMPLER_H), seed=seed, control_after_generate=control,
                     steps=30, cfg=6.0, sampler_name="dpmpp_2m", scheduler="karras", denoise=1.0)
    g.link(model[0], model[1], sampler, "model")
    g.link(positive[0], positive[1], sampler, "positive")
    g.link(negative[0], negative[1], sampler, "negative")
    g.link(latent[0], latent[1], sampler, "latent_image")
    return sampler


def _decode_save(g: Graph, sampler: int, ckpt: int, pos: tuple, *, prefix: str, title: str | None = None,
                 width: int = WIDTH_E, save_height: int = SAVE_H) -> tuple[int, int]:
    """VAE Decode with Save Image below it; returns both nodes."""
    decode = g.node("VAEDecode", pos, size=(width, DECODE_H))
    g.link(sampler, 0, decode, "samples")
    g.link(ckpt, 2, decode, "vae")
    save = g.node("SaveImage", (pos[0], g.bottom(decode)), title=title, size=(width, save_height),
                  filename_prefix=prefix)
    g.link(decode, 0, save, "images")
    return decode, save


def _sample_and_save(g: Graph, ckpt: int, model: tuple, positive: tuple, negative: int, prefix: str) -> None:
    """Columns D and E: KSampler with Empty Latent Image below it, VAE Decode and Save Image."""
    sampler_y = 0
    latent = _latent(g, (XD, sampler_y + SAMPLER_H + GAP_Y))
    sampler = _sampler(g, model, positive, (negative, 0), (latent, 0), (XD, sampler_y))
    _decode_save(g, sampler, ckpt, (XE, 0), prefix=prefix)


def _single(name: str, title: str, encoder_file: str, image: str, token: str, text: str, about: str) -> Graph:
    """One subject from one photo: the person and pet workflows."""
    g = Graph()
    ckpt, vision = _loaders(g)
    encode = _subject(g, vision, encoder_file, image, y=g.bottom(vision), title=title)
    apply = _apply(g, (ckpt, 0), ckpt, encode, (XC, 0), text=text, token=token)
    negative = _negative(g, ckpt, (XC, g.bottom(apply)))
    _sample_and_save(g, ckpt, (apply, 0), (apply, 1), negative, f"nested_attention/{name}")
    _notes(g, 260, about, [encoder_file])
    return g


def person_one_photo() -> Graph:
    return _single("person_one_photo", "person", IPADAPTER_FACE, PERSON_IMAGES[0], "person",
                   "a photo of a person as an astronaut floating inside a space station, soft window light, "
                   "detailed",
                   "One person from one photo: the word *person* in the prompt becomes the person in the "
                   "photo")


def pet_one_photo() -> Graph:
    return _single("pet_one_photo", "pet", IPADAPTER_PLUS, PET_IMAGE, "pet",
                   "a photo of a pet wearing a tiny wizard hat, sitting on a stack of books in a cozy "
                   "library",
                   "One pet from one photo: the word *pet* in the prompt becomes the animal in the photo")


def person_several_photos() -> Graph:
    """Three photos joined into one IMAGE batch (core's Batch Images, the one batch node both 0.3.75 and 0.33
    have), encoded together."""
    g = Graph()
    ckpt, vision = _loaders(g)
    encoder = _encoder(g, vision, IPADAPTER_FACE, (XA, g.bottom(vision)))
    batches = []
    for i in range(len(PERSON_IMAGES) - 1):  # several photos of one subject: one IMAGE batch
        y = g.bottom(batches[-1]) if batches else 0
        batches.append(g.node("ImageBatch", (XB, y), size=(WIDTH_B, BATCH_H),
                              title="Batch Images (photos 1 + 2)" if i == 0 else f"Batch Images (+ photo {i + 2})"))
    encode = _encode(g, encoder, batches[-1], (XB, g.bottom(batches[-1])), "person")
    apply = _apply(g, (ckpt, 0), ckpt, encode, (XC, 0), token="person",
                   text="a watercolor painting of a person reading a book in a sunlit cafe")
    negative = _negative(g, ckpt, (XC, g.bottom(apply)))
    # The photos side by side under columns A to C, each at the width a Load Image shows its file name at.
    photos_y = max(g.bottom(n) for n in (encoder, encode, negative))
    photos = [_photo(g, name, (XA + i * (PHOTO_ROW_WIDTH + 20), photos_y), f"person photo {i + 1}", PHOTO_ROW_WIDTH)
              for i, name in enumerate(PERSON_IMAGES)]
    for i, batch in enumerate(batches):
        g.link(photos[0] if i == 0 else batches[i - 1], 0, batch, "image1")
        g.link(photos[i + 1], 0, batch, "image2")
    _sample_and_save(g, ckpt, (apply, 0), (apply, 1), negative, "nested_attention/person_several_photos")
    _notes(g, 285, "One person from several photos", [IPADAPTER_FACE], """
**Batch Images** joins the photos into one batch; Encode Subject Image(s) encodes each and concatenates their
tokens, for a steadier likeness than one photo gives. Add photos with more Load Image and Batch Images nodes (the
examples are three views of one portrait).""")
    return g


def person_and_pet() -> Graph:
    """A person and a pet on one model: two encoders, two Apply nodes chained, one prompt for both."""
    g = Graph()
    ckpt, vision = _loaders(g)
    person_encoder = _encoder(g, vision, IPADAPTER_FACE, (XA, g.bottom(vision)))
    person_photo = _photo(g, PERSON_IMAGES[0], (XA, g.bottom(person_encoder)), "person photo")
    person = _encode(g, person_encoder, person_photo, (XB, 0), "person")
    pet_encoder = _encoder(g, vision, IPADAPTER_PLUS, (XB, g.bottom(person)), width=WIDTH_B)
    pet_photo = _photo(g, PET_IMAGE, (XB, g.bottom(pet_encoder)), "pet photo", width=WIDTH_B)
    pet = _encode(g, pet_encoder, pet_photo, (XB, g.bottom(pet_photo)), "pet")
    prompt = g.node("PrimitiveStringMultiline", (XC, 0), title="Prompt (shared by both Apply nodes)",
                    size=(WIDTH_C, PROMPT_H),
                    value="a photo of a person walking their pet through a snowy park, winter coat, soft light")
    apply_person = _apply(g, (ckpt, 0), ckpt, person, (XC, g.bottom(prompt)), text=None, token="person",
                          title="Apply Nested Attention: person")
    apply_pet = _apply(g, (apply_person, 0), ckpt, pet, (XC, g.bottom(apply_person)), text=None, token="pet",
                       title="Apply Nested Attention: pet")
    g.link(prompt, 0, apply_person, "text")
    g.link(prompt, 0, apply_pet, "text")
    negative = _negative(g, ckpt, (XD, SAMPLER_H + GAP_Y + LATENT_H + GAP_Y), width=WIDTH_D)
    _sample_and_save(g, ckpt, (apply_pet, 0), (apply_pet, 1), negative, "nested_attention/person_and_pet")
    _notes(g, 330, "A person and a pet in one picture", [IPADAPTER_FACE, IPADAPTER_PLUS], """
The first Apply node binds *person* to the face encoder; the second takes its MODEL and binds *pet* to the
general one. One String node gives both the same prompt, the last one's CONDITIONING goes to the KSampler, and
their order does not matter.""")
    return g


def lambda_sweep() -> Graph:
    """One seed, λ = 1, 2, 3, 4 and a reference without nested attention, in branches side by side."""
    g = Graph()
    ckpt, vision = _loaders(g)
    encode = _subject(g, vision, IPADAPTER_FACE, PERSON_IMAGES[0], y=g.bottom(vision), title="person")
    seed = SEED
    prompt = g.node("PrimitiveStringMultiline", (XC, 0), title="Prompt (shared by all branches)",
                    size=(WIDTH_C, PROMPT_H),
                    value="a pencil sketch of a person as a medieval knight in armour, castle in the background")
    plain = g.node("CLIPTextEncode", (XC, g.bottom(prompt)), title="The prompt without nested attention",
                   size=(WIDTH_C, 90))
    g.link(ckpt, 1, plain, "clip")
    g.link(prompt, 0, plain, "text")
    negative = _negative(g, ckpt, (XC, g.bottom(plain)))
    latent = _latent(g, (XC, g.bottom(negative)), width=WIDTH_C)
    branches = [(None, "reference: no nested attention")]
    branches += [(lam, f"λ = {lam:.1f}") for lam in (1.0, 2.0, 3.0, 4.0)]
    branch_width = 350  # KSampler draws its long titles in full
    for i, (lam, label) in enumerate(branches):
        x = XD + i * (branch_width + GAP_X)
        if lam is None:
            model, positive = (ckpt, 0), (plain, 0)
        else:
            apply = _apply(g, (ckpt, 0), ckpt, encode, (x, 0), text=None, token="person", lambda_=lam,
                           title=f"Apply Nested Attention ({label})", width=branch_width)
            g.link(prompt, 0, apply, "text")
            model, positive = (apply, 0), (apply, 1)
        sampler_y = APPLY_LINKED_H + GAP_Y
        sampler = _sampler(g, model, positive, (negative, 0), (latent, 0), (x, sampler_y), seed=seed,
                           control="fixed", title=f"KSampler ({label})", width=branch_width)
        tag = "reference" if lam is None else f"lambda_{lam:.1f}"
        _decode_save(g, sampler, ckpt, (x, g.bottom(sampler)), prefix=f"nested_attention/lambda_sweep_{tag}",
                     title=f"Save ({label})", width=branch_width, save_height=320)
    _notes(g, 260, "A λ sweep: likeness against prompt", [IPADAPTER_FACE], f"""
One prompt, one fixed seed ({seed}); each branch to the right uses another λ, and the first samples the prompt
without nested attention, for reference. Change the seed on all KSamplers together.""")
    return g


# ------------------------------------------------------------------------------------------------
# The subject in the user's own photo (inpainting), two people in one image, the attention maps


INPAINT_SCALE = 1.9  # the example scene (640 x 427) to about one megapixel, SDXL's native size


def _person_into_photo(inpainting_model: bool) -> Graph:
    """The person painted into the transparent (masked) region of a photo with ComfyUI's core inpainting path.

    InpaintModelConditioning serves both kinds of checkpoint: it adds the noise mask to the photo's latent
    (the sampler keeps everything outside the mask) and the masked photo as the conditioning's concat image,
    which an inpainting UNet (9 input channels) reads and SDXL base ignores. VAE Encode (for Inpainting) greys
    the region out before encoding (SDXL base then starts from grey and needs denoise 1), and Set Latent Noise
    Mask gives an inpainting UNet no masked image.
    """
    g = Graph()
    ckpt, vision = _loaders(g)
    model, above_encoder = (ckpt, 0), vision
    if inpainting_model:  # the UNet from its own file; CLIP and VAE from the checkpoint
        unet = g.node("UNETLoader", (XA, g.bottom(vision)), size=(WIDTH_A, UNET_H),
                      title="Load Diffusion Model (SDXL inpainting)", unet_name=SDXL_INPAINTING,
                      weight_dtype="default", properties={"models": [model_entry(SDXL_INPAINTING)]})
        model, above_encoder = (unet, 0), unet
    encoder = _encoder(g, vision, IPADAPTER_FACE, (XA, g.bottom(above_encoder)))
    person = _photo(g, PERSON_IMAGES[0], (XA, g.bottom(encoder)), "person photo")
    encode = _encode(g, encoder, person, (XB, 0), "person")
    scene = _photo(g, SCENE_IMAGE, (XB, g.bottom(encode)), "photo to paint into", width=WIDTH_B)
    scale = g.node("ImageScaleBy", (XB, g.bottom(scene)), size=(WIDTH_B, SCALE_H),
                   title="Upscale Image By (~1 MP)", upscale_method="lanczos", scale_by=INPAINT_SCALE)
    g.link(scene, 0, scale, "image")
    apply = _apply(g, model, ckpt, encode, (XC, 0), token="person",
                   text="a photo of a person in a white spacesuit standing in front of a rocket on the "
                        "launch pad at dusk, detailed")
    g.link(scene, 1, apply, "mask")
    negative = _negative(g, ckpt, (XC, g.bottom(apply)))
    inpaint = g.node("InpaintModelConditioning", (XD, 0), size=(WIDTH_D, INPAINT_H), noise_mask=True)
    g.link(apply, 1, inpaint, "positive")
    g.link(negative, 0, inpaint, "negative")
    g.link(ckpt, 2, inpaint, "vae")
    g.link(scale, 0, inpaint, "pixels")
    g.link(scene, 1, inpaint, "mask")
    sampler = _sampler(g, (apply, 0), (inpaint, 0), (inpaint, 1), (inpaint, 2), (XD, g.bottom(inpaint)))
    name = "person_into_photo_inpainting_model" if inpainting_model else "person_into_photo"
    _decode_save(g, sampler, ckpt, (XE, 0), prefix=f"nested_attention/{name}")
    checkpoint = ("an SDXL **inpainting** UNet in **Load Diffusion Model** (9 input channels: it also reads "
                  "the mask and the masked photo), CLIP and VAE from SDXL base" if inpainting_model else
                  "SDXL base (any SDXL checkpoint)")
    _notes(g, 400 if inpainting_model else 380, "One person painted into your own photo (inpainting)",
           [IPADAPTER_FACE, SDXL_INPAINTING] if inpainting_model else [IPADAPTER_FACE], f"""
The **photo** is painted only where it is transparent (Load Image's MASK; paint your own with right-click ->
*Open in MaskEditor*); the rest is kept. The model: {checkpoint}. **InpaintModelConditioning** keeps the
photo's latent outside the mask and gives the model the masked photo. The same MASK on **Apply Nested
Attention** confines the person to the region. **Upscale Image By** brings the photo to about one megapixel
(set it for your photo; the mask follows).""")
    return g


def person_into_photo() -> Graph:
    return _person_into_photo(inpainting_model=False)


def person_into_photo_inpainting_model() -> Graph:
    return _person_into_photo(inpainting_model=True)


def two_people_left_and_right() -> Graph:
    """A man and a woman from one face encoder and two photos, each on its own word and its own half."""
    g = Graph()
    ckpt, vision = _loaders(g)
    faces = _encoder(g, vision, IPADAPTER_FACE, (XA, g.bottom(vision)))
    man_photo = _photo(g, MAN_IMAGE, (XA, g.bottom(faces)), "man photo", height=SQUARE_PHOTO_H)
    man = _encode(g, faces, man_photo, (XB, 0), "man")
    woman_photo = _photo(g, PERSON_IMAGES[0], (XB, g.bottom(man)), "woman photo", width=WIDTH_B,
                         height=SQUARE_PHOTO_H)
    woman = _encode(g, faces, woman_photo, (XB, g.bottom(woman_photo)), "woman")
    # The regions, under the photos: a black canvas of the image's size with its left half set white, and
    # its inverse.
    regions_y = max(g.bottom(man_photo), g.bottom(woman))
    canvas = g.node("SolidMask", (XA, regions_y), size=(WIDTH_A, SOLID_MASK_H), title="canvas (image size)",
                    value=0.0, width=1024, height=1024)
    half = g.node("SolidMask", (XA, g.bottom(canvas)), size=(WIDTH_A, SOLID_MASK_H), title="half (width / 2)",
                  value=1.0, width=512, height=1024)
    left = g.node("MaskComposite", (XB, regions_y), size=(WIDTH_B, COMPOSITE_H), title="left half", x=0, y=0,
                  operation="add")
    g.link(canvas, 0, left, "destination")
    g.link(half, 0, left, "source")
    right = g.node("InvertMask", (XB, g.bottom(left)), size=(WIDTH_B, INVERT_H), title="right half")
    g.link(left, 0, right, "mask")
    prompt = g.node("PrimitiveStringMultiline", (XC, 0), title="Prompt (shared by both Apply nodes)",
                    size=(WIDTH_C, PROMPT_H),
                    value="a photo of a man and a woman sitting side by side on a park bench, autumn, "
                          "soft light")
    apply_man = _apply(g, (ckpt, 0), ckpt, man, (XC, g.bottom(prompt)), text=None, token="man",
                       title="Apply Nested Attention: man, left")
    apply_woman = _apply(g, (apply_man, 0), ckpt, woman, (XC, g.bottom(apply_man)), text=None, token="woman",
                         title="Apply Nested Attention: woman, right")
    for apply, region in ((apply_man, left), (apply_woman, right)):
        g.link(prompt, 0, apply, "text")
        g.link(region, 0, apply, "mask")
    negative = _negative(g, ckpt, (XD, SAMPLER_H + GAP_Y + LATENT_H + GAP_Y), width=WIDTH_D)
    _sample_and_save(g, ckpt, (apply_woman, 0), (apply_woman, 1), negative, "nested_attention/two_people")
    _notes(g, 330, "Two people, left and right", [IPADAPTER_FACE], """
One face encoder, two photos: each **Apply** node binds one photo to its own word of the shared prompt
(*man*, *woman*) and, through its **mask**, to its own half of the image, so the two identities do not blend.
The halves are core mask nodes (**Solid Mask**, **Mask Composite**, **Invert Mask**): keep the canvas the size
of the latent when you change the image size. Other words work too (each once in the prompt); or set *region*
to auto on both Apply nodes instead of masks.""")
    return g


def see_where_the_subject_goes() -> Graph:
    """One person from one photo, with the attention maps: Capture Nested Attention between the Apply node and
    the KSampler, Nested Attention Maps after decoding, and Subject Query Maps from the Encode node."""
    g = Graph()
    ckpt, vision = _loaders(g)
    encode = _subject(g, vision, IPADAPTER_FACE, PERSON_IMAGES[0], y=g.bottom(vision), title="person")
    queries = g.node("NestedAttentionQueryMaps", (XB, g.bottom(encode)), size=(WIDTH_B, QUERY_MAPS_H),
                     count=16)
    g.link(encode, 0, queries, "subject")
    saved = g.node("SaveImage", (XB, g.bottom(queries)), size=(WIDTH_B, MAP_SAVE_H), title="Save query maps",
                   filename_prefix="nested_attention/see_where_queries")
    g.link(queries, 0, saved, "images")
    apply = _apply(g, (ckpt, 0), ckpt, encode, (XC, 0), token="person",
                   text="a photo of a person walking a dog through an autumn forest, morning light")
    negative = _negative(g, ckpt, (XC, g.bottom(apply)))
    capture = g.node("NestedAttentionCapture", (XD, 0), size=(WIDTH_D, CAPTURE_H), start_percent=0.0,
                     end_percent=1.0, sources=True)
    g.link(apply, 0, capture, "model")
    sampler_y = g.bottom(capture)
    latent = _latent(g, (XD, sampler_y + SAMPLER_H + GAP_Y))
    sampler = _sampler(g, (capture, 0), (apply, 1), (negative, 0), (latent, 0), (XD, sampler_y))
    decode, save = _decode_save(g, sampler, ckpt, (XE, 0), prefix="nested_attention/see_where")
    # The maps below the sampler and the image: they read the capture and the decoded image.
    maps_y = max(g.bottom(latent), g.bottom(save))
    maps = g.node("NestedAttentionMaps", (XD, maps_y), size=(WIDTH_D, MAPS_H), points="", top_tokens=5,
                  normalize="peak")
    g.link(capture, 1, maps, "capture")
    g.link(decode, 0, maps, "image")
    y = maps_y
    for output, name in enumerate(("placement", "sources")):
        map_save = g.node("SaveImage", (XE, y), size=(WIDTH_E, MAP_SAVE_H), title=f"Save {name} map",
                          filename_prefix=f"nested_attention/see_where_{name}")
        g.link(maps, output, map_save, "images")
        y = g.bottom(map_save)
    _notes(g, 360, "See where the subject goes", [IPADAPTER_FACE], """
**Capture Nested Attention** (between Apply and the KSampler) records the run; the image is exactly the same.
**Nested Attention Maps**: *placement* tints where the word *person* took the attention (stronger = more);
*sources* marks the 3 strongest places (or your *points*, x,y fractions) and shows which subject tokens were
read there and where they come from in the photo. **Subject Query Maps**: where each query of the encoder
looks in the photo, no sampling needed.""")
    return g


# File name -> graph. The template browser shows a custom node pack's workflows by file name only: the card's
# title, and its description with - and _ as spaces; its search reads only that name (frontends 1.32, 1.48 and
# 1.58: no description, tags or index file is read for a custom node pack's templates). So each name says what
# the workflow does, after the pack's name, which a search for "nested" finds.
TEMPLATE_PREFIX = "Nested Attention - "
WORKFLOWS = {
    f"{TEMPLATE_PREFIX}person from one photo": person_one_photo,
    f"{TEMPLATE_PREFIX}pet from one photo": pet_one_photo,
    f"{TEMPLATE_PREFIX}person from several photos": person_several_photos,
    f"{TEMPLATE_PREFIX}person and pet in one picture": person_and_pet,
    f"{TEMPLATE_PREFIX}likeness vs prompt, lambda sweep": lambda_sweep,
    f"{TEMPLATE_PREFIX}person into a photo, inpainting": person_into_photo,
    f"{TEMPLATE_PREFIX}person into a photo, SDXL inpainting model": person_into_photo_inpainting_model,
    f"{TEMPLATE_PREFIX}two people, left and right": two_people_left_and_right,
    f"{TEMPLATE_PREFIX}see where the subject goes": see_where_the_subject_goes,
}


def workflow_name(make) -> str:
    """The file name (without .json) of the workflow `make` builds."""
    return next(name for name, maker in WORKFLOWS.items() if maker is make)

# Runs in the page: the saved view, OPEN_SCALE on the graph's top-left corner (the notes) at the reference
# window's margins (left, top).
_VIEW_JS = """
([[left, top], scale]) => {
  const app = window.app, canvas = app.canvas, title = window.LiteGraph.NODE_TITLE_HEIGHT;
  const x0 = Math.min(...app.graph.nodes.map((n) => n.pos[0]));
  const y0 = Math.min(...app.graph.nodes.map((n) => n.pos[1] - title));
  canvas.ds.scale = scale;
  canvas.ds.offset = [left / scale - x0, top / scale - y0];
  canvas.setDirty(true, true);
}
"""


# The frontend the shipped files are built with: ComfyUI 0.3.75's pin (`python3 dev.py workflows` uses the pinned
# host), the oldest frontend the pack supports. Newer ones save the same graph with more fields (1.48: a Save
# Image output slot without links, no workflowRendererVersion; 1.58: widgets_values_named), see canonical().
FRONTEND_VERSION = "1.32.9"


def canonical(workflow: dict) -> dict:
    """What a saved workflow says about its graph, the same whichever frontend saved it: the nodes (type,
    title, place, size, mode, widget values, model files, links of each slot), the links, the groups, the
    view and the workflow's id."""
    nodes = [{
        "id": n["id"], "type": n["type"], "title": n.get("title"), "pos": n["pos"], "size": n["size"],
        "mode": n.get("mode", 0), "widgets_values": n.get("widgets_values"),
        "models": n.get("properties", {}).get("models"),
        "inputs": [[i["name"], i.get("link")] for i in n.get("inputs", [])],
        "outputs": [[o["name"], o["links"]] for o in n.get("outputs", []) if o.get("links")],
    } for n in workflow["nodes"]]
    return {"id": workflow["id"], "nodes": nodes, "links": workflow["links"], "groups": workflow.get("groups", []),
            "ds": workflow.get("extra", {}).get("ds"), "models": workflow.get("models")}


def workflow_id(name: str) -> str:
    """A stable id per workflow, so that regenerating does not change files needlessly."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-nested-attention/{name}"))


def build(frontend, name: str) -> dict:
    """Build one workflow in the page of `frontend` (a harness.Frontend) and return it as the frontend saves it."""
    graph = WORKFLOWS[name]()
    frontend.evaluate(_BUILD_JS, graph.spec())
    frontend.settle()
    frontend.evaluate(_BUILD_FINISH_JS, graph.spec())
    frontend.evaluate(_VIEW_JS, [list(OPEN_MARGINS), OPEN_SCALE])
    workflow = frontend.serialize()
    workflow["id"] = workflow_id(name)
    # The layout leaves room for both renderers, so no frontend may rescale it: with the tag 1.32 writes ("LG",
    # also its default when there is none), 1.32 scales the whole layout by 1.2 when it opens it with Nodes 2.0
    # and then restores the saved view, leaving the notes above the window. "Vue-corrected" (a layout already
    # fit for Nodes 2.0) is left as it is by 1.32 (it scales only "LG" and "Vue") and by 1.48 and 1.58.
    workflow["extra"]["workflowRendererVersion"] = "Vue-corrected"
    return workflow


def _thumbnail(png: bytes, path: Path) -> None:
    image = Image.open(BytesIO(png)).convert("RGB")
    height = round(image.height * THUMBNAIL_WIDTH / image.width)
    image.resize((THUMBNAIL_WIDTH, height), Image.LANCZOS).save(path, quality=82, optimize=True)


README_PICTURE = REPO / "docs" / "workflow.png"
# Pictures (thumbnails, the README's): the menus hidden (focus mode), and no frame-rate corner (it differs
# from one run to the next).
_PICTURE_MODE_JS = "window.app.extensionManager.focusMode = %s; window.app.canvas.show_info = !window.app.extensionManager.focusMode;"


def _readme_picture(frontend, margins: tuple, path: Path) -> None:
    """The README's picture: one workflow as the frontend draws it at its default settings, the whole graph
    in view and the menus hidden (focus mode)."""
    name = workflow_name(person_one_photo)
    frontend.load_workflow(build(frontend, name), name)
    frontend.evaluate(f"() => {{ {_PICTURE_MODE_JS % 'true'} }}")
    frontend.fit_view(margins)
    frontend.screenshot(path)
    frontend.evaluate(f"() => {{ {_PICTURE_MODE_JS % 'false'} }}")
    print(f"{LOG_PREFIX} wrote {path}")


def to_text(workflow: dict) -> str:
    """A workflow file's text."""
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


def parse_args(args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 dev.py workflows", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"Workflows to build, of: {', '.join(WORKFLOWS)} (default: all of them).")
    parser.add_argument("--out", type=Path, default=WORKFLOWS_DIR,
                        help="Folder to write the workflows, thumbnails and input/ images to.")
    parser.add_argument("--check", action="store_true",
                        help="Build them and say which differ from the files in --out; write nothing.")
    parser.add_argument("--screenshots", type=Path, default=REPO / "tests" / "artifacts" / "workflows",
                        help="Folder for a screenshot of each workflow as it opens.")
    parser.add_argument("--readme-picture", type=Path, nargs="?", const=README_PICTURE, default=None,
                        metavar="PNG", help=f"Also take the README's picture (default {README_PICTURE.relative_to(REPO)}): "
                                            "the person-from-one-photo workflow, whole, at the default settings.")
    parsed = parser.parse_args(args)
    unknown = [n for n in parsed.names if n not in WORKFLOWS]
    if unknown:
        parser.error(f"unknown workflow(s) {', '.join(unknown)}; choose from {', '.join(WORKFLOWS)}")
    return parsed


def main(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(HARNESS_DIR))
    import harness

    comfyui = os.environ.get("COMFYUI_PATH")
    if not comfyui:
        raise SystemExit("COMFYUI_PATH is not set: run this through `python3 dev.py workflows`, which sets it "
                         "to the ComfyUI it installed")
    make_example_images(args.out / "input")
    names = args.names or list(WORKFLOWS)
    differ = []
    with tempfile.TemporaryDirectory(prefix="nested-attention-workflows-") as tmp:
        base = Path(tmp) / "base"
        harness.prepare_base_dir(base, {harness.PACK_NAME: REPO}, MODEL_FILES)
        for image in (args.out / "input").iterdir():
            (base / "input" / image.name).write_bytes(image.read_bytes())
        server = harness.ComfyServer(Path(comfyui), base, Path(tmp) / "server.log").start()
        try:
            with harness.Frontend(server) as frontend:
                version = frontend.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")
                exact = version == FRONTEND_VERSION
                if not exact:
                    print(f"{LOG_PREFIX} frontend {version}, not {FRONTEND_VERSION}: it saves the same graphs "
                          "with other fields; --check compares what they say (canonical()), not their text")
                for name in names:
                    workflow = build(frontend, name)
                    report = frontend.load_workflow(workflow, name)
                    problems = frontend.problems(report)
                    if problems:
                        raise SystemExit(f"{name}: the frontend does not load the built workflow cleanly: "
                                         f"{problems}")
                    frontend.screenshot(args.screenshots / f"{name}.png")
                    target = args.out / f"{name}.json"
                    if args.check:
                        if exact:
                            same = target.is_file() and target.read_text() == to_text(workflow)
                        else:
                            same = target.is_file() and canonical(json.loads(target.read_text())) == canonical(workflow)
                        print(f"{LOG_PREFIX} {name}: {'the same' if same else 'DIFFERS from ' + str(target)}")
                        differ += [] if same else [name]
                        continue
                    target.write_text(to_text(workflow))
                    # The thumbnail: the whole graph, drawn in full detail however small (a card, not a view).
                    frontend.evaluate(f"() => {{ {_PICTURE_MODE_JS % 'true'} window.app.canvas.min_font_size_for_lod = 0; }}")
                    frontend.fit_view(harness.FOCUS_MODE_MARGINS)
                    _thumbnail(frontend.page.screenshot(), args.out / f"{name}.jpg")
                    frontend.evaluate(f"() => {{ {_PICTURE_MODE_JS % 'false'} window.app.canvas.min_font_size_for_lod = 8; }}")
                    print(f"{LOG_PREFIX} wrote {target} ({report['nodes']} nodes, {report['links']} links)")
                if args.readme_picture:
                    _readme_picture(frontend, harness.FOCUS_MODE_MARGINS, args.readme_picture)
        finally:
            server.stop()
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
