"""Face detection, landmarks and FFHQ-style alignment: the one implementation for the nodes and the trainer.

The paper's face encoder reads faces aligned the way FFHQ was made: the eyes and the mouth at canonical
positions of a square crop that keeps the whole head. The recipe (Karras et al., FFHQ) takes the mean of
the two eye centres (eye_avg), the eye-to-eye vector and the eye-to-mouth vector, builds an oriented
square around them (the quad), and resamples the photo inside it.

Detector: dlib (`pip install dlib-bin face-recognition-models`, the pack's `faces` extra): its HOG
frontal-face detector (part of dlib, Boost licence), then its CNN (MMOD) detector for faces HOG misses,
and its 5-point landmark model (eye corners and the bottom of the nose; Davis King's own annotations,
released into the public domain). Both model files ship inside the `face-recognition-models` package, so
nothing is downloaded at run time. The 68-point model in that package restricts commercial use and is
never loaded. With 5 points the mouth is not seen: its centre is placed on the line from the eyes through
the nose (MOUTH_FROM_NOSE). That line gives the face's tilt exactly; the distance matters only for the
crop's centre (a tenth of it) and, for strongly turned heads, its size.

Imports dlib lazily: the core stays importable without it, and asking to align without it installed is
an error that says what to install. Never imports ComfyUI.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .images import to_uint8
from .logs import LOG_PREFIX as PREFIX

log = logging.getLogger(__name__)

ALIGN_NONE = "none"  # the encoder reads photos as they are (CLIP's centre crop)
ALIGN_FFHQ = "ffhq"  # the encoder reads faces aligned FFHQ-style
ALIGN_MODES = (ALIGN_NONE, ALIGN_FFHQ)
DEFAULT_FACE_SIZE = 512  # the authors' demo aligns every face to 512 px before CLIP's own resize

INSTALL_HINT = (
    "Install the face tools into ComfyUI's Python environment: "
    "`pip install dlib-bin face-recognition-models` "
    "(or `pip install comfyui-nested-attention[faces]`), then restart ComfyUI"
)
# Eye-to-mouth over eye-to-nose-bottom along the face's midline. Measured on scikit-image's astronaut
# photo (public domain): 1.16 from mouth corners found by dlib's 68-point and by MediaPipe's mesh, 1.22
# from hand-placed corners; a smile lifts the corners, a neutral mouth sits lower, hence 1.25.
MOUTH_FROM_NOSE = 1.25
DETECT_MAX_SIDE = 1024  # detection runs on a copy no larger than this (HOG time grows with pixels)
MIN_SCORE = 0.3  # detector scores below this are dropped (a mission patch scored 0.12, the face 1.16)


class FaceAlignError(ValueError):
    """No face, no face tools, or a face index out of range; the message says what to do."""


@dataclass(frozen=True)
class Face:
    """One detected face, in the photo's pixel coordinates (x right, y down)."""

    box: tuple[float, float, float, float]  # (left, top, right, bottom)
    score: float  # the detector's confidence (larger is surer)
    eye_left: tuple[float, float]  # centre of the eye on the image's left
    eye_right: tuple[float, float]  # centre of the eye on the image's right
    nose: tuple[float, float]  # bottom of the nose
    mouth: tuple[float, float]  # centre of the mouth (estimated, see MOUTH_FROM_NOSE)

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


@dataclass(frozen=True)
class AlignedFace:
    image: torch.Tensor  # (size, size, 3) float32 in [0, 1]
    face: Face
    quad: (
        torch.Tensor
    )  # (4, 2) the photo's corners of the crop: top-left, bottom-left, bottom-right, top-right


# ------------------------------------------------------------------------------------------------
# Detection (dlib, imported on first use)


@functools.lru_cache(maxsize=1)
def _dlib_models():
    try:
        import dlib
        import face_recognition_models as models
    except ImportError as e:
        raise FaceAlignError(
            f"face alignment needs dlib and its models, which are not installed ({e}). {INSTALL_HINT}."
        ) from e
    hog = dlib.get_frontal_face_detector()
    landmarks = dlib.shape_predictor(models.pose_predictor_five_point_model_location())
    return dlib, hog, landmarks, models.cnn_face_detector_model_location()


@functools.lru_cache(maxsize=1)
def _dlib_cnn():
    dlib, _, _, path = _dlib_models()
    return dlib.cnn_face_detection_model_v1(path)


def face_tools_available() -> bool:
    """Whether dlib and its models import (the `faces` extra is installed)."""
    try:
        _dlib_models()
    except FaceAlignError:
        return False
    return True


def _boxes(pixels) -> list[tuple[object, float]]:
    """(dlib rectangle, score) of faces in a uint8 image: HOG, at twice the size for small faces, then CNN."""
    _, hog, _, _ = _dlib_models()
    for upsample in (0, 1):
        rects, scores, _ = hog.run(pixels, upsample, 0.0)
        found = [(r, s) for r, s in zip(rects, scores) if s >= MIN_SCORE]
        if found:
            return found
    # MMOD sees turned and partly hidden faces that HOG misses, at ~1.3 s per 512 px photo on a CPU core.
    return [(d.rect, d.confidence) for d in _dlib_cnn()(pixels, 0) if d.confidence >= MIN_SCORE]


def detect_faces(image: torch.Tensor) -> list[Face]:
    """Faces in one photo (H, W, 3) in [0, 1], largest first, with their landmarks."""
    import numpy as np
    from PIL import Image

    dlib, _, predictor, _ = _dlib_models()
    pixels = to_uint8(image[..., :3])  # contiguous uint8, as dlib reads images
    height, width = pixels.shape[:2]
    scale = min(1.0, DETECT_MAX_SIDE / max(height, width))
    small = pixels
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR))
    faces = []
    for rect, score in _boxes(small):
        box = tuple(v / scale for v in (rect.left(), rect.top(), rect.right(), rect.bottom()))
        full = dlib.rectangle(*(round(v) for v in box))
        shape = predictor(pixels, full)  # landmarks on the full-resolution photo
        p = [(shape.part(i).x, shape.part(i).y) for i in range(5)]
        # dlib's 5 points: the image-right eye's outer and inner corners, the image-left eye's, the nose.
        eye_right = ((p[0][0] + p[1][0]) / 2, (p[0][1] + p[1][1]) / 2)
        eye_left = ((p[2][0] + p[3][0]) / 2, (p[2][1] + p[3][1]) / 2)
        eye_avg = ((eye_left[0] + eye_right[0]) / 2, (eye_left[1] + eye_right[1]) / 2)
        nose = (float(p[4][0]), float(p[4][1]))
        mouth = tuple(e + MOUTH_FROM_NOSE * (n - e) for e, n in zip(eye_avg, nose))
        faces.append(
            Face(box=box, score=float(score), eye_left=eye_left, eye_right=eye_right, nose=nose, mouth=mouth)
        )
    return sorted(faces, key=lambda f: -f.area)


# ------------------------------------------------------------------------------------------------
# The FFHQ crop (pure torch)


def ffhq_quad(eye_left, eye_right, mouth) -> torch.Tensor:
    """FFHQ's oriented crop for eye centres and mouth centre: (4, 2) corners, top-left, bottom-left,
    bottom-right, top-right.

    The crop's x axis averages the eye line and the perpendicular of the eye-to-mouth line; its half-side is
    the larger of twice the eye distance and 1.8 times the eye-to-mouth distance; its centre sits a tenth of
    the eye-to-mouth vector below the eyes.
    """
    eye_left, eye_right, mouth = (
        torch.as_tensor(v, dtype=torch.float64) for v in (eye_left, eye_right, mouth)
    )
    eye_avg = (eye_left + eye_right) / 2
    eye_to_eye = eye_right - eye_left
    eye_to_mouth = mouth - eye_avg
    x = eye_to_eye - torch.stack([-eye_to_mouth[1], eye_to_mouth[0]])  # rot90 brings the mouth line to x
    x = x / x.norm()
    x = x * max(eye_to_eye.norm().item() * 2.0, eye_to_mouth.norm().item() * 1.8)
    y = torch.stack([-x[1], x[0]])  # x turned 90 degrees: down the face
    c = eye_avg + eye_to_mouth * 0.1
    return torch.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def crop_quad(image: torch.Tensor, quad: torch.Tensor, size: int) -> torch.Tensor:
    """Resample the square `quad` of a photo (H, W, C) in [0, 1] to (size, size, C).

    Outside the photo the crop mirrors it (FFHQ pads by reflection too). A quad much larger than `size` is
    first shrunk with an antialiased resize, so the bicubic sampling does not alias.
    """
    image = image[..., :3].float()
    quad = quad.to(torch.float64)
    side = (quad[3] - quad[0]).norm().item()
    pixels = image.movedim(-1, 0)[None]  # (1, C, H, W)
    shrink = min(1.0, 2.0 * size / max(side, 1e-6))
    if shrink < 1.0:
        h, w = pixels.shape[-2:]
        new = (max(1, round(h * shrink)), max(1, round(w * shrink)))
        pixels = F.interpolate(pixels, size=new, mode="bilinear", antialias=True, align_corners=False)
        quad = quad * torch.tensor([new[1] / w, new[0] / h], dtype=torch.float64)
    h, w = pixels.shape[-2:]
    # Output pixel centres (u, v) in (0, 1); the quad is a square: source = tl + u (tr - tl) + v (bl - tl).
    t = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    v, u = torch.meshgrid(t, t, indexing="ij")  # (size, size)
    origin, across, down = quad[0], quad[3] - quad[0], quad[1] - quad[0]
    src = origin + u[..., None] * across + v[..., None] * down  # (size, size, 2) pixel coordinates (x, y)
    grid = torch.stack(
        [src[..., 0] / w * 2 - 1, src[..., 1] / h * 2 - 1], dim=-1
    )  # align_corners=False units
    out = F.grid_sample(
        pixels, grid[None].to(pixels.dtype), mode="bicubic", padding_mode="reflection", align_corners=False
    )
    return out[0].movedim(0, -1).clamp(0, 1)  # (size, size, C)


def align_face(
    image: torch.Tensor, *, size: int = DEFAULT_FACE_SIZE, face_index: int = 0, name: str = "the photo"
) -> AlignedFace:
    """Detect the faces of a photo (H, W, 3) in [0, 1] and crop face `face_index` (0: the largest) FFHQ-style.

    Raises FaceAlignError naming `name` when there is no face, or fewer faces than the index asks for.
    """
    faces = detect_faces(image)
    if not faces:
        raise FaceAlignError(
            f"no face found in {name} ({image.shape[1]}x{image.shape[0]} px). The face encoder reads aligned "
            "faces: use a photo where the face is clearly visible (frontal, at least ~80 px tall), or turn "
            "alignment off to encode the photo as it is."
        )
    if face_index >= len(faces):
        raise FaceAlignError(
            f"{name} has {len(faces)} face(s) (largest first), so there is no face number {face_index}; "
            f"choose a face_index from 0 to {len(faces) - 1}."
        )
    face = faces[face_index]
    if len(faces) > 1:
        log.info(
            "%s %s: %d faces found, using number %d (largest first)", PREFIX, name, len(faces), face_index
        )
    quad = ffhq_quad(face.eye_left, face.eye_right, face.mouth)
    return AlignedFace(image=crop_quad(image, quad, size), face=face, quad=quad.float())


def check_align_mode(mode: str) -> str:
    if mode not in ALIGN_MODES:
        raise FaceAlignError(f"unknown face alignment {mode!r}; expected one of {', '.join(ALIGN_MODES)}.")
    return mode

