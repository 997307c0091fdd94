"""Reading training images and caption files without silent corruption.

What a photo folder really holds, and what each case becomes here:
- JPEGs from phones store the camera's rotation in EXIF: the pixels are turned upright;
- cut-outs with an alpha channel (RGBA, LA, palette transparency) and images with a mask file: composited
  onto WHITE, as the pet encoder expects and as the Encode node does (nested_attention.images);
- 16-bit greyscale PNG/TIFF (Pillow mode I;16 / I): scaled to 8 bits, not clipped to white;
- .tif/.tiff/.gif (first frame) are read like the rest;
- caption files that are not UTF-8 (Latin-1 / Windows-1252 from older tools) are decoded as Windows-1252
  and reported with the file and line of the first byte that is not UTF-8.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import torch
from PIL import Image, ImageOps

from nested_attention.images import composite_on_white, from_uint8, to_pil

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MASK_SUFFIX = ".mask"  # <name>.mask.png next to <name>.jpg (folders), <key>.mask.png (tar shards)

ImageSource = str | bytes  # a path, or the bytes of a file inside a tar shard


class BadImage(Exception):
    """An image file that cannot be decoded; the message says why."""


def _open(source: ImageSource, draft: int | None = None):
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    if draft and image.format == "JPEG":
        image.draft("RGB", (draft, draft))  # decode at 1/2..1/8 scale: a scan need not pay for full size
    image.load()  # fully decoded here, so a truncated file fails now, not in a training step
    if image.width < 1 or image.height < 1:
        raise ValueError("empty image")
    return image


def _to_8bit(image):
    """Greyscale images deeper than 8 bits (modes I;16*, I, F) -> mode L with their full range kept."""
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        top = 1.0 if values.max(initial=0) <= 1.0 else 255.0
    elif image.mode.startswith("I;16") or values.max(initial=0) > 255:
        top = 65535.0  # 16-bit samples (mode I also holds 16-bit PNGs on some Pillow versions)
    else:
        top = 255.0
    return Image.fromarray(np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8), mode="L")


def _alpha(image):
    """The image's alpha as a PIL L image, or None when it has none."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGBA").getchannel("A")
    return None


def to_tensor(image) -> torch.Tensor:
    """PIL RGB or L -> (H, W, C) float32 in [0, 1]."""
    pixels = from_uint8(np.asarray(image))
    return pixels if pixels.dim() == 3 else pixels[..., None]


def load_rgb(source: ImageSource, mask: ImageSource | None = None, draft: int | None = None):
    """A PIL RGB image, upright, 8-bit, on white outside its alpha channel and outside `mask` (if given).

    Raises BadImage for files that cannot be decoded (a bad mask file too, naming it).
    """
    try:
        image = _open(source, draft)
        image = ImageOps.exif_transpose(image)  # phones store the rotation in EXIF; the pixels are sideways
        if image.mode in ("I", "F") or image.mode.startswith("I;16"):
            image = _to_8bit(image)
        alpha = _alpha(image)
        rgb = image.convert("RGB")
    except (
        Exception
    ) as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError...)
        raise BadImage(f"{type(e).__name__}: {e}") from e
    masks = []
    if alpha is not None:
        masks.append(to_tensor(alpha)[..., 0])
    if mask is not None:
        try:
            mask_image = ImageOps.exif_transpose(_open(mask))
            if mask_image.mode in ("I", "F") or mask_image.mode.startswith("I;16"):
                mask_image = _to_8bit(mask_image)
            # A mask with alpha (a cut-out saved as the mask) uses its alpha; else its grey level.
            mask_alpha = _alpha(mask_image)
            mask_image = mask_alpha if mask_alpha is not None else mask_image.convert("L")
        except Exception as e:
            name = mask if isinstance(mask, str) else "the mask"
            raise BadImage(f"mask {name} is unreadable ({type(e).__name__}: {e})") from e
        if mask_image.size != rgb.size:
            mask_image = mask_image.resize(rgb.size, Image.Resampling.BILINEAR)
        masks.append(to_tensor(mask_image)[..., 0])
    if not masks:
        return rgb
    keep = masks[0] if len(masks) == 1 else masks[0] * masks[1]  # (H, W) in [0, 1]
    white = composite_on_white(to_tensor(rgb)[None], keep[None])[0]  # (H, W, 3)
    return to_pil(white)


def probe_image(source: ImageSource, mask: ImageSource | None = None) -> tuple[int, int]:
    """(width, height) of an image that decodes fully (mask included); raises BadImage otherwise.

    JPEGs are decoded at reduced scale (fast: a scan of a large folder), which still reads the whole file.
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as header:
            size = header.size
    except Exception as e:
        raise BadImage(f"{type(e).__name__}: {e}") from e
    load_rgb(source, mask, draft=256)
    return size


def decode_text(data: bytes, name: str) -> tuple[str, str | None]:
    """(text, problem): UTF-8 (with or without BOM), else Windows-1252 with a note naming file and line."""
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        try:
            text = data.decode("cp1252")
        except UnicodeDecodeError:
            text = data.decode("latin-1")  # every byte is a character: never fails
        return (
            text,
            f"{name} line {line} is not UTF-8 (byte 0x{data[e.start]:02x}); read as Latin-1/Windows-1252",
        )


def read_text(path: str) -> tuple[str, str | None]:
    """A caption or manifest file's text and a problem note (see decode_text)."""
    with open(path, "rb") as f:
        return decode_text(f.read(), path)
