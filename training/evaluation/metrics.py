"""The evaluation's figures: CLIP-T, CLIP-I and face identity, each a cosine in a named embedding space.

- CLIP-T: cosine of the generated image and the prompt without its subject word, in a joint CLIP
  space: SDXL's own CLIP-G text tower (pooled, projected) with the ViT-bigG vision file ComfyUI
  loads (`ComfyClipSpace`: both halves of OpenCLIP ViT-bigG-14 laion2B), or any local OpenCLIP
  checkpoint (`OpenClipSpace`).
- CLIP-I: cosine of the input and generated images' CLIP image embeddings (`image_embeds`), with the
  CLIP vision model the encoder reads (ViT-H/14 for the paper's encoders).
- identity: cosine of face-recognition embeddings of the input face and the generated face
  (`IdentityModel`). A generated image with no detected face is a failure: its identity is None and
  `face_found` is False; the report counts it, nothing drops it.

Everything loads from local files; nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from nested_attention.images import from_uint8, to_uint8

log = logging.getLogger(__name__)


class MetricSetupError(ValueError):
    """A metric model that cannot be built from what was given; the message says what to pass."""


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of (N, D) and (N, D) (or (D,) and (D,)), in float64."""
    a, b = a.double(), b.double()
    return F.cosine_similarity(a, b, dim=-1)


# ------------------------------------------------------------------------------------------------
# CLIP spaces


class ClipSpace(Protocol):
    """A joint text-image embedding space."""

    name: str

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) in [0, 1] -> (B, D)."""

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """n texts -> (n, D)."""


class ComfyClipSpace:
    """A ComfyUI CLIP text model's pooled, projected output with a ComfyUI CLIP vision model's image_embeds.

    With SDXL's CLIP (its pooled output is CLIP-G's, through its text projection) and the ViT-bigG
    vision file (`CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors`), both are OpenCLIP ViT-bigG-14
    laion2B: one joint space, 1280 wide. Images are preprocessed as ComfyUI does (centre crop).
    """

    def __init__(self, *, clip: Any, clip_vision: Any, name: str):
        self.clip, self.clip_vision, self.name = clip, clip_vision, name

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for text in texts:
            _, pooled = self.clip.encode_from_tokens(self.clip.tokenize(text), return_pooled=True)
            out.append(pooled[0].float().cpu())
        return torch.stack(out)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip_vision.encode_image(images, crop=True)["image_embeds"].float().cpu()


@contextmanager
def _offline():
    """Hugging Face libraries may not reach the network inside this block (a hub name fails clearly)."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class OpenClipSpace:
    """Any local OpenCLIP checkpoint through open_clip_torch: a built-in model name plus a .safetensors file.

    Only local files: the name must be one of open_clip's built-in configs (`open_clip.list_models()`,
    e.g. "ViT-H-14", "ViT-bigG-14"), never "hf-hub:...", and the weights a .safetensors file on disk
    (read with safetensors, never pickle). Hugging Face access is switched off while building it.
    """

    def __init__(self, *, model_name: str, checkpoint: str, device: str | torch.device = "cpu"):
        try:
            import open_clip
        except ImportError as e:
            raise MetricSetupError(
                "--open_clip_model needs the open_clip_torch package: pip install open_clip_torch "
                "(it is in this project's `train` extra)."
            ) from e
        if model_name.startswith(("hf-hub:", "local-dir:")) or model_name not in open_clip.list_models():
            raise MetricSetupError(
                f"--open_clip_model {model_name!r} is not one of open_clip's built-in model names (e.g. "
                "ViT-H-14, ViT-bigG-14, ViT-L-14); hub names would download. Pass a built-in name and the "
                "local weights with --open_clip_checkpoint."
            )
        if not (os.path.isfile(checkpoint) and checkpoint.endswith(".safetensors")):
            raise MetricSetupError(
                f"--open_clip_checkpoint {checkpoint!r}: expected an existing .safetensors file with the "
                f"weights of {model_name} (e.g. open_clip_model.safetensors from the model's repository)."
            )
        with _offline():
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=checkpoint, device=device
            )
            tokenizer = open_clip.get_tokenizer(model_name)
        self.model = model.eval()
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.device = torch.device(device)
        self.name = f"open_clip:{model_name}"

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        batch = torch.stack([self.preprocess(Image.fromarray(to_uint8(image))) for image in images])
        return self.model.encode_image(batch.to(self.device)).float().cpu()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device)).float().cpu()


class ClipImageSpace:
    """CLIP-I: a ComfyUI CLIP vision model's image_embeds (the encoder's own CLIP vision file)."""

    def __init__(self, *, clip_vision: Any, name: str):
        self.clip_vision, self.name = clip_vision, name

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip_vision.encode_image(images, crop=True)["image_embeds"].float().cpu()


# ------------------------------------------------------------------------------------------------
# Faces


@dataclass(frozen=True)
class FaceBox:
    """A detected face, in pixels of the image it was found in."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def area(self) -> int:
        return max(0, self.right - self.left) * max(0, self.bottom - self.top)


class FaceDetector(Protocol):
    """Finds faces in an (H, W, 3) uint8 RGB image. Kept small so another detector can stand in."""

    name: str

    def detect(self, image: np.ndarray) -> list[FaceBox]: ...


class IdentityModel(Protocol):
    """A face-recognition embedder: one embedding of the largest face, or None when no face is found."""

    name: str

    def embed(self, image: torch.Tensor) -> torch.Tensor | None:
        """(H, W, 3) in [0, 1] -> (D,) or None (no face)."""

    def embed_faces(self, image: torch.Tensor) -> list[tuple[FaceBox, torch.Tensor]]:
        """Every detected face of (H, W, 3) in [0, 1] with its (D,) embedding, largest first (the two-subject
        mode)."""


class DlibFaceDetector:
    """The faces the Encode node and training.prepare align (nested_attention.faces.detect_faces: dlib's HOG
    detector, its CNN detector for faces HOG misses, the same score threshold), as boxes."""

    name = "dlib-hog"

    def detect(self, image: np.ndarray) -> list[FaceBox]:
        from nested_attention.faces import detect_faces

        faces = detect_faces(from_uint8(image))
        return [FaceBox(*(round(v) for v in face.box)) for face in faces]


def dlib_model_files(models_dir: str | None) -> tuple[Path, Path]:
    """(5-point shape predictor, ResNet face embedder) from `models_dir` or face_recognition_models."""
    names = ("shape_predictor_5_face_landmarks.dat", "dlib_face_recognition_resnet_model_v1.dat")
    if models_dir is None:
        try:
            import face_recognition_models
        except ImportError as e:
            raise MetricSetupError(
                "face identity with dlib needs dlib and its models: pip install dlib-bin "
                "face-recognition-models, or pass --dlib_models DIR with "
                f"{' and '.join(names)}; or choose --identity clip-i."
            ) from e
        models_dir = str(Path(face_recognition_models.__file__).parent / "models")
    paths = tuple(Path(models_dir) / name for name in names)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise MetricSetupError(f"dlib face models not found: {', '.join(missing)}.")
    return paths  # type: ignore[return-value]


class DlibIdentity:
    """dlib's ResNet face embedder (128-d; its author's threshold: Euclidean distance 0.6), largest face.

    Faces are found by `detector` (dlib's HOG detector by default) and aligned with dlib's 5-point
    landmark model. All three run offline from pip wheels (dlib-bin; face-recognition-models holds the
    .dat files, released by dlib's author under CC0; the 68-point model, whose training data forbids
    commercial use, is not used).
    """

    name = "dlib-resnet"

    def __init__(self, *, models_dir: str | None = None, detector: FaceDetector | None = None):
        try:
            import dlib
        except ImportError as e:
            raise MetricSetupError(
                "face identity with dlib needs the dlib module: pip install dlib-bin face-recognition-models "
                "(or choose --identity clip-i)."
            ) from e
        predictor, embedder = dlib_model_files(models_dir)
        self._dlib = dlib
        self.detector = detector or DlibFaceDetector()
        self._predictor = dlib.shape_predictor(str(predictor))
        self._embedder = dlib.face_recognition_model_v1(str(embedder))

    def _embed_box(self, pixels: np.ndarray, box: FaceBox) -> torch.Tensor:
        rect = self._dlib.rectangle(box.left, box.top, box.right, box.bottom)
        shape = self._predictor(pixels, rect)
        return torch.tensor(list(self._embedder.compute_face_descriptor(pixels, shape)), dtype=torch.float64)

    def embed(self, image: torch.Tensor) -> torch.Tensor | None:
        pixels = np.ascontiguousarray(to_uint8(image))
        faces = self.detector.detect(pixels)
        if not faces:
            return None
        return self._embed_box(pixels, max(faces, key=lambda b: b.area))

    def embed_faces(self, image: torch.Tensor) -> list[tuple[FaceBox, torch.Tensor]]:
        pixels = np.ascontiguousarray(to_uint8(image))
        faces = sorted(self.detector.detect(pixels), key=lambda b: -b.area)
        return [(box, self._embed_box(pixels, box)) for box in faces]


# ------------------------------------------------------------------------------------------------
# All figures of one image


@dataclass
class Reference:
    """What a subject's input image contributes to its scores, computed once."""

    clip_i: torch.Tensor | None = None  # (D,)
    identity: torch.Tensor | None = None  # (D,)


class Scorers:
    """The metric models of one evaluation, and the names of the figures they make.

    clip_t: joint spaces for CLIP-T (each gives a column `clip_t[<space>]`).
    clip_i: the encoder's CLIP vision model, for `clip_i[<name>]`.
    identity: a face-recognition model, for `identity[<name>]` and `face_found`.
    """

    def __init__(
        self,
        *,
        clip_t: Sequence[ClipSpace] = (),
        clip_i: ClipImageSpace | None = None,
        identity: IdentityModel | None = None,
    ):
        self.clip_t, self.clip_i, self.identity = list(clip_t), clip_i, identity
        self._texts: dict[tuple[str, str], torch.Tensor] = {}

    @property
    def names(self) -> list[str]:
        """The figure columns, in report order."""
        out = [f"clip_t[{s.name}]" for s in self.clip_t]
        if self.clip_i is not None:
            out.append(f"clip_i[{self.clip_i.name}]")
        if self.identity is not None:
            out.append(f"identity[{self.identity.name}]")
        return out

    def reference(self, image: torch.Tensor, name: str) -> Reference:
        """Embeddings of a subject's input image; an input without a detectable face is an error."""
        ref = Reference()
        if self.clip_i is not None:
            ref.clip_i = self.clip_i.embed_images(image[None])[0]
        if self.identity is not None:
            ref.identity = self.identity.embed(image)
            if ref.identity is None:
                raise MetricSetupError(
                    f"no face found in the subject image {name} by {self.identity.name}: identity cannot be "
                    "measured against it. Use a clear, frontal photo of the face, or --identity clip-i."
                )
        return ref

    def text_embedding(self, space: ClipSpace, text: str) -> torch.Tensor:
        key = (space.name, text)
        if key not in self._texts:
            self._texts[key] = space.embed_texts([text])[0]
        return self._texts[key]

    def prompt_scores(self, image: torch.Tensor, text: str) -> dict[str, float]:
        """CLIP-T of one image against `text` (the prompt without its subject word), per space."""
        out = {}
        for space in self.clip_t:
            image_embedding = space.embed_images(image[None])[0]
            text_embedding = self.text_embedding(space, text)
            if image_embedding.shape != text_embedding.shape:
                raise MetricSetupError(
                    f"CLIP-T space {space.name}: the text embeddings are {text_embedding.shape[-1]} wide and "
                    f"the image embeddings {image_embedding.shape[-1]}, so they are not one joint space. "
                    "With SDXL's CLIP-G text tower use the ViT-bigG vision file "
                    "(CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors), not ViT-H."
                )
            out[f"clip_t[{space.name}]"] = float(cosine(image_embedding, text_embedding))
        return out

    def subject_scores(self, image: torch.Tensor, ref: Reference) -> dict[str, Any]:
        """CLIP-I and identity of one image against one subject (no face: identity None, face_found False)."""
        out: dict[str, Any] = {}
        if self.clip_i is not None and ref.clip_i is not None:
            out[f"clip_i[{self.clip_i.name}]"] = float(
                cosine(self.clip_i.embed_images(image[None])[0], ref.clip_i)
            )
        if self.identity is not None and ref.identity is not None:
            embedding = self.identity.embed(image)
            out["face_found"] = embedding is not None
            out[f"identity[{self.identity.name}]"] = (
                None if embedding is None else float(cosine(embedding, ref.identity))
            )
        return out
