"""Image helpers shared by the nodes and the trainer (pure torch).

Masks here always mean 1 = subject (kept), 0 = background (made white): the trainer's alpha channels and mask
files, and segmentation nodes, say it that way. ComfyUI's Load Image says it the other way round (its MASK is
1 - alpha, 1 on the transparent background of a cut-out); `subject_mask` turns a MASK of either kind into
this one by a stated rule (MASK_RULE), before `composite_on_white`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class MaskError(ValueError):
    """A mask that does not fit the images; the message says what to give instead."""


# ------------------------------------------------------------------------------------------------
# Which side of a mask is the subject

MASK_MARKS = ("auto", "subject", "background")  # what a MASK's 1 (white) marks; auto decides per mask
MASK_RULE = (
    "auto: a mask with one value everywhere marks nothing and is ignored (Load Image gives all 0 for a photo "
    "without transparency); otherwise the side that covers most of the image's border (its outer ring of "
    "pixels) is the background: if the mask's mean there is above 0.5, 1 marks the background (Load Image's "
    "MASK of a cut-out, 1 - alpha), else 1 marks the subject (segmentation nodes). subject / background: "
    "take the mask as saying that, whatever it looks like."
)


def border_mean(mask: torch.Tensor) -> float:
    """The mean of an (H, W) mask over its outer ring of pixels (first and last row and column)."""
    h, w = mask.shape
    if h < 3 or w < 3:
        return float(mask.float().mean())
    ring = torch.cat([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]])  # (2W + 2H - 4,)
    return float(ring.float().mean())


def mask_side(mask: torch.Tensor, marks: str = "auto") -> str | None:
    """What the 1 of an (H, W) mask marks under `marks`: "subject", "background", or None (marks nothing)."""
    if marks not in MASK_MARKS:
        raise MaskError(f"mask_marks is {marks!r}; expected one of {', '.join(MASK_MARKS)}.")
    if marks != "auto":
        return marks
    if float(mask.max()) == float(mask.min()):
        return None
    return "background" if border_mean(mask) > 0.5 else "subject"


def subject_mask(mask: torch.Tensor | None, marks: str = "auto") -> tuple[torch.Tensor | None, list]:
    """A MASK ((H, W) or (B, H, W), in [0, 1]) -> (the same with 1 = subject, or None, and what each mask marked).

    Each mask of a batch is read on its own (`mask_side`): a 1-on-background mask is inverted, one that marks
    nothing becomes all 1 (the whole photo kept). None when no mask is left to apply.
    """
    if mask is None:
        return None, []
    mask = mask.detach().to("cpu", torch.float32)
    batch = mask[None] if mask.dim() == 2 else mask  # (B, H, W)
    if batch.dim() != 3:
        raise MaskError(f"the mask has shape {tuple(mask.shape)}; expected a MASK (H, W) or (B, H, W).")
    sides = [mask_side(m, marks) for m in batch]
    if all(side is None for side in sides):
        return None, sides
    out = torch.stack([
        torch.ones_like(m) if side is None else (1.0 - m if side == "background" else m)
        for m, side in zip(batch, sides)
    ])
    return (out[0] if mask.dim() == 2 else out), sides


# ------------------------------------------------------------------------------------------------
# Compositing on white


def composite_on_white(image: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Images (B, H, W, C) in [0, 1] -> (B, H, W, 3): the subject kept where the mask is 1, white elsewhere.

    `mask` is one (H, W) mask for all images or one per image (B, H, W), in [0, 1], 1 = subject; a mask of
    another size is resized. The pet encoder was trained on pets segmented onto white, so the nodes' MASK
    input (after `subject_mask`) and the trainer's alpha channels and mask files all go through here.
    """
    image = image[..., :3]
    if mask is None:
        return image
    mask = mask.to(image.device, torch.float32)
    if mask.dim() == 2:
        mask = mask[None]  # (1, H, W)
    if mask.dim() != 3 or mask.shape[0] not in (1, image.shape[0]):
        raise MaskError(
            f"the mask has shape {tuple(mask.shape)}; expected one mask (H, W) or one per image "
            f"({image.shape[0]}, H, W). Give one mask for all photos or exactly one per photo."
        )
    if mask.shape[-2:] != image.shape[1:3]:
        mask = F.interpolate(mask[:, None], size=image.shape[1:3], mode="bilinear", align_corners=False)[:, 0]
    mask = mask.clamp(0, 1)[..., None]  # (B|1, H, W, 1)
    return image * mask + (1.0 - mask)


# ------------------------------------------------------------------------------------------------
# Photos with nothing in them

BLANK_TOLERANCE = 4 / 255  # within 4 of 255 levels of the image's median colour, in every channel ...
BLANK_SHARE = 0.99  # ... for at least this share of the pixels: nothing of a subject is left to encode


def blank_share(image: torch.Tensor) -> float:
    """The share of an (H, W, C) image's pixels within BLANK_TOLERANCE of its median colour in every channel."""
    pixels = image.detach().to("cpu", torch.float32).reshape(-1, image.shape[-1])  # (H*W, C)
    median = pixels.median(dim=0).values  # (C,)
    return float(((pixels - median).abs() <= BLANK_TOLERANCE).all(dim=1).float().mean())


def blank_images(images: torch.Tensor) -> list[int]:
    """Indices of the images (B, H, W, C) that are blank or nearly so: at least BLANK_SHARE of the pixels are
    one colour (BLANK_TOLERANCE). A photo of a subject never is; a 16-bit greyscale PNG read by ComfyUI 0.3's
    Load Image (all white), a failed upstream node or a mask that removes everything are."""
    return [i for i in range(images.shape[0]) if blank_share(images[i]) >= BLANK_SHARE]


# ------------------------------------------------------------------------------------------------
# Pixels: ComfyUI's IMAGE (float in [0, 1]) and 8-bit pictures (PIL, PNG files, dlib)


def to_uint8(image):
    """(..., H, W, C) in [0, 1], a tensor or an array -> uint8 numpy array, as a PNG stores it: clamped to
    [0, 1], times 255, rounded to the nearest level (halves to even), computed in float32 on the CPU."""
    pixels = torch.as_tensor(image).detach().to("cpu", torch.float32)
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def from_uint8(pixels) -> torch.Tensor:
    """uint8 (..., H, W, C) array -> float32 tensor in [0, 1] (level / 255), as ComfyUI's Load Image makes an
    IMAGE."""
    import numpy as np

    return torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 255.0)


def to_pil(image):
    """(H, W, 3) in [0, 1] -> PIL RGB image (`to_uint8`)."""
    from PIL import Image

    return Image.fromarray(to_uint8(image))


def from_pil(image) -> torch.Tensor:
    """PIL image -> (H, W, 3) float32 in [0, 1] (converted to RGB first; `from_uint8`)."""
    import numpy as np

    return from_uint8(np.asarray(image.convert("RGB")))
