"""Image helpers shared by the nodes and the trainer (pure torch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class MaskError(ValueError):
    """A mask that does not fit the images; the message says what to give instead."""


def composite_on_white(image: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Images (B, H, W, C) in [0, 1] -> (B, H, W, 3): the subject kept where the mask is 1, white elsewhere.

    `mask` is one (H, W) mask for all images or one per image (B, H, W), in [0, 1]; a mask of another size
    is resized. The pet encoder was trained on pets segmented onto white, so the nodes' MASK input and the
    trainer's alpha channels and mask files all go through here.
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
