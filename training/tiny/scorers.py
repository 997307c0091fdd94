"""The tiny test bed's scorers: stand-ins for the evaluation's CLIP-T space and face identity on tiny images.

They run the real metrics' pipelines (training.evaluation.metrics: a joint CLIP space, detect -> crop the
largest face -> embed) on the tiny models and the tiny data's coloured shapes, in microseconds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

from nested_attention.images import from_uint8, to_uint8
from training.evaluation.metrics import ComfyClipSpace, FaceBox, FaceDetector
from training.tiny.models import tiny_clip_vision


def tiny_clip_space(clip: Any) -> ComfyClipSpace:
    """The tiny test bed's joint space: the tiny SDXL CLIP's CLIP-G pooled output with a tiny vision tower
    projecting to the same width; the code path of SDXL CLIP-G + ViT-bigG."""
    return ComfyClipSpace(
        clip=clip, clip_vision=tiny_clip_vision(seed=1, projection_dim=1280), name="tiny-clip-g+tiny-vision"
    )


class TinyFaceDetector:
    """The tiny test bed's stand-in: each "face" is the box around one connected blob of pixels unlike the
    image's border colour (so two subjects side by side are two faces), largest first.

    Blobs under `min_fraction` of the image are not faces (an empty image has none).
    """

    name = "tiny-box"

    def __init__(self, *, threshold: float = 0.15, min_fraction: float = 0.02):
        self.threshold, self.min_fraction = threshold, min_fraction

    def detect(self, image: np.ndarray) -> list[FaceBox]:
        pixels = from_uint8(image).numpy()
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        background = np.median(border, axis=0)
        differs = np.abs(pixels - background).max(axis=-1) > self.threshold  # (H, W)
        labels, _ = scipy.ndimage.label(differs, structure=np.ones((3, 3)))  # 8-connected blobs
        boxes = []
        for label, (rows, cols) in enumerate(scipy.ndimage.find_objects(labels), start=1):
            if (labels[rows, cols] == label).sum() >= self.min_fraction * differs.size:
                boxes.append(FaceBox(cols.start, rows.start, cols.stop, rows.stop))
        return sorted(boxes, key=lambda b: -b.area)


class TinyIdentity:
    """The tiny test bed's face-embedding stand-in: the detected box at 8x8, a fixed random projection.

    Same pipeline as a real one (detect, crop the largest face, embed), in microseconds.
    """

    name = "tiny-face"

    def __init__(self, *, dim: int = 32, seed: int = 0, detector: FaceDetector | None = None):
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(8 * 8 * 3, dim, generator=generator, dtype=torch.float64)
        self.detector = detector or TinyFaceDetector()

    def _embed_box(self, image: torch.Tensor, box: FaceBox) -> torch.Tensor:
        crop = image[box.top : box.bottom, box.left : box.right].double().movedim(-1, 0)[None]  # (1, 3, h, w)
        small = F.interpolate(crop, size=(8, 8), mode="area")  # (1, 3, 8, 8)
        return small.flatten() @ self.weight

    def embed(self, image: torch.Tensor) -> torch.Tensor | None:
        faces = self.detector.detect(to_uint8(image))
        if not faces:
            return None
        return self._embed_box(image, max(faces, key=lambda b: b.area))

    def embed_faces(self, image: torch.Tensor) -> list[tuple[FaceBox, torch.Tensor]]:
        faces = sorted(self.detector.detect(to_uint8(image)), key=lambda b: -b.area)
        return [(box, self._embed_box(image, box)) for box in faces]
