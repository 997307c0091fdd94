"""Face alignment (nested_attention.faces): the FFHQ quad, the resampling, and dlib on a real photo.

The real photo is scikit-image's `astronaut` (Eileen Collins, NASA, public domain), shipped in the
scikit-image wheel. Its landmarks were placed by hand on a 4x enlargement (pupil centres and mouth corners).
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from nested_attention import faces
from nested_attention.images import from_pil

# Hand-placed on the astronaut photo (512 x 512), x right, y down.
ASTRONAUT_EYE_LEFT = (202.5, 101.3)
ASTRONAUT_EYE_RIGHT = (246.3, 103.3)
ASTRONAUT_MOUTH = ((203.8 + 243.8) / 2, (141.3 + 142.5) / 2)  # the mean of the two corners


def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


def reference_quad(eye_left, eye_right, mouth):
    """FFHQ's recipe written out plainly in numpy, as in the FFHQ data set's description."""
    eye_left, eye_right, mouth = (np.asarray(p, dtype=np.float64) for p in (eye_left, eye_right, mouth))
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    eye_to_mouth = mouth - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def test_ffhq_quad_of_an_upright_face_by_hand():
    # Eyes 40 px apart at y=100, mouth 40 px below: half-side max(2*40, 1.8*40) = 80, centre 4 px below.
    quad = faces.ffhq_quad((100, 100), (140, 100), (120, 140))
    expected = torch.tensor([[40, 24], [40, 184], [200, 184], [200, 24]], dtype=torch.float64)
    torch.testing.assert_close(quad, expected)


@pytest.mark.parametrize("angle", [0.0, 17.0, -40.0, 90.0])
def test_ffhq_quad_matches_the_recipe_and_turns_with_the_face(angle):
    rad = math.radians(angle)
    turn = np.array([[math.cos(rad), -math.sin(rad)], [math.sin(rad), math.cos(rad)]])
    points = [turn @ np.array(p) for p in (ASTRONAUT_EYE_LEFT, ASTRONAUT_EYE_RIGHT, ASTRONAUT_MOUTH)]
    quad = faces.ffhq_quad(*points).numpy()
    np.testing.assert_allclose(quad, reference_quad(*points), atol=1e-9)
    upright = faces.ffhq_quad(ASTRONAUT_EYE_LEFT, ASTRONAUT_EYE_RIGHT, ASTRONAUT_MOUTH).numpy()
    np.testing.assert_allclose(quad, upright @ turn.T, atol=1e-9)


def ramp(height: int, width: int) -> torch.Tensor:
    """(H, W, 3): red = x, green = y of each pixel centre, in [0, 1]; blue 0.5."""
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    return torch.stack([xs / width, ys / height, torch.full_like(xs, 0.5)], dim=-1)


@pytest.mark.parametrize("angle", [0.0, 30.0])
def test_crop_quad_samples_the_photo_inside_the_quad(angle):
    # On a linear ramp, bicubic sampling is exact away from the borders: each output pixel must read the
    # photo's coordinates of its own centre mapped through the quad.
    image = ramp(120, 160)
    centre, half = np.array([80.0, 60.0]), 30.0
    rad = math.radians(angle)
    x = half * np.array([math.cos(rad), math.sin(rad)])
    y = np.array([-x[1], x[0]])
    quad = torch.tensor(np.stack([centre - x - y, centre - x + y, centre + x + y, centre + x - y]))
    out = faces.crop_quad(image, quad, 16)
    assert out.shape == (16, 16, 3)
    t = (np.arange(16) + 0.5) / 16
    v, u = np.meshgrid(t, t, indexing="ij")
    src = (
        quad[0].numpy()
        + u[..., None] * (quad[3] - quad[0]).numpy()
        + v[..., None] * (quad[1] - quad[0]).numpy()
    )
    np.testing.assert_allclose(out[..., 0].numpy(), src[..., 0] / 160, atol=2e-3)
    np.testing.assert_allclose(out[..., 1].numpy(), src[..., 1] / 120, atol=2e-3)


def test_crop_quad_mirrors_outside_the_photo_and_shrinks_large_quads():
    image = ramp(64, 64)
    out = faces.crop_quad(
        image, torch.tensor([[-32.0, -32.0], [-32.0, 96.0], [96.0, 96.0], [96.0, -32.0]]), 128
    )
    # Reflection: the pixel 10 px left of the photo reads the pixel 10 px inside it.
    torch.testing.assert_close(out[64, 32 - 10, 0], out[64, 32 + 9, 0], atol=0.02, rtol=0)
    # A quad 8x larger than the output: the antialiased result is the photo's local mean, not a noisy sample.
    noise = torch.rand(800, 800, 3, generator=torch.Generator().manual_seed(0))
    small = faces.crop_quad(
        noise, torch.tensor([[0.0, 0.0], [0.0, 800.0], [800.0, 800.0], [800.0, 0.0]]), 100
    )
    assert small.std() < 0.08  # a point sample of uniform noise would have std 0.29


def test_astronaut_landmarks_match_the_hand_placed_ones():
    photo = from_pil(astronaut())
    found = faces.detect_faces(photo)
    assert len(found) == 1  # the mission patch the HOG detector also scores (0.12) is dropped
    face = found[0]
    for got, want in ((face.eye_left, ASTRONAUT_EYE_LEFT), (face.eye_right, ASTRONAUT_EYE_RIGHT)):
        assert math.dist(got, want) < 2.0  # 2 px: under 5% of the 44 px between the eyes
    assert math.dist(face.mouth, ASTRONAUT_MOUTH) < 3.0
    left, top, right, bottom = face.box
    assert left < ASTRONAUT_EYE_LEFT[0] and right > ASTRONAUT_EYE_RIGHT[0] and top < 101 and bottom > 142
    # The crop from detected landmarks is the hand-placed ones' crop, within 3% of its side (2.5% measured).
    hand = reference_quad(ASTRONAUT_EYE_LEFT, ASTRONAUT_EYE_RIGHT, ASTRONAUT_MOUTH)
    detected = faces.ffhq_quad(face.eye_left, face.eye_right, face.mouth).numpy()
    side = np.hypot(*(hand[3] - hand[0]))
    assert np.abs(detected - hand).max() < 0.03 * side


def test_alignment_undoes_rotation_and_scale():
    photo = astronaut()
    aligned = faces.align_face(from_pil(photo), size=256)
    turned = photo.resize((768, 768), Image.Resampling.BICUBIC).rotate(
        25, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=(255, 255, 255)
    )
    again = faces.align_face(from_pil(turned), size=256, name="the turned photo")
    assert aligned.image.shape == again.image.shape == (256, 256, 3)
    assert (aligned.image - again.image).abs().mean() < 0.04
    # In the crop, the eyes sit level at FFHQ's canonical places: 3/8 and 5/8 across.
    (face,) = faces.detect_faces(again.image)
    assert abs(face.eye_left[1] - face.eye_right[1]) < 3
    assert abs(face.eye_left[0] - 0.375 * 256) < 5 and abs(face.eye_right[0] - 0.625 * 256) < 5


def test_no_face_and_a_missing_face_index_are_clear_errors():
    from skimage import data

    coffee = from_pil(Image.fromarray(data.coffee()))  # a cup of coffee (CC0)
    with pytest.raises(faces.FaceAlignError, match="no face found in image 3"):
        faces.align_face(coffee, name="image 3")
    with pytest.raises(faces.FaceAlignError, match="has 1 face.*face_index from 0 to 0"):
        faces.align_face(from_pil(astronaut()), face_index=1)


def test_without_dlib_the_error_says_what_to_install(monkeypatch):
    faces._dlib_models.cache_clear()
    monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib raises ImportError
    try:
        assert not faces.face_tools_available()
        with pytest.raises(faces.FaceAlignError, match="pip install dlib-bin face-recognition-models"):
            faces.detect_faces(torch.zeros(8, 8, 3))
    finally:
        faces._dlib_models.cache_clear()


def test_core_imports_without_dlib_or_comfy():
    import subprocess

    code = (
        "import sys; sys.modules['dlib'] = None; import nested_attention.faces, nested_attention.images; "
        "assert 'comfy' not in sys.modules and 'dlib' not in [m for m in sys.modules if sys.modules[m]]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
