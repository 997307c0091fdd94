"""The subject put into a masked region of a photo, with ComfyUI's own inpainting nodes and real sampler.

On the tiny SDXL UNet (4 input channels, as SDXL base) and its inpainting variant (9 input channels: noisy
latent, mask, masked image's latent, as an SDXL inpainting checkpoint; ComfyUI's SDXL class concatenates the
last two itself), through ComfyUI's InpaintModelConditioning, VAE Encode (for Inpainting) and Set Latent Noise
Mask nodes and its KSampler node:
  - outside the mask the sampled latent is the photo's own latent, with the subject as without it (the
    sampler's noise mask keeps it);
  - inside it the subject changes the result (it differs from the same run without the subject);
  - with the mask also on the Apply node, every cross-attention output outside it equals ComfyUI's plain
    attention during sampling, bit for bit (the region weight is 0 there: docs/ARCHITECTURE.md §3).
"""

from __future__ import annotations

import pytest
import tiny_models
import torch
from pack_helpers import apply, run_comfy_node

from nested_attention import unet_layers
from nested_attention.patch import NestedAttentionPatch
from nested_attention_comfy.attention import comfy_attention
from nested_attention_comfy.model import attn2_replacements

PROMPT = "a photo of a pet sitting on the grass"
HEIGHT, WIDTH = 96, 128  # pixels: a 12 x 16 latent, 3 x 4 cells at the UNet's coarsest level (32 px each)
STEPS = 3


@pytest.fixture(scope="module")
def inpaint_unet():
    """The tiny SDXL UNet with an inpainting checkpoint's 9 input channels, built with ComfyUI's classes."""
    return tiny_models.tiny_sdxl_unet(seed=0, inpaint=True)


@pytest.fixture(scope="module")
def vae():
    return tiny_models.tiny_vae(seed=0)


@pytest.fixture(scope="module")
def photo():
    """An IMAGE (1, H, W, 3): smooth colours plus texture, so that the latent is not flat."""
    y = torch.linspace(0, 1, HEIGHT)[:, None, None]
    x = torch.linspace(0, 1, WIDTH)[None, :, None]
    base = torch.cat(
        [y.expand(-1, WIDTH, 1), x.expand(HEIGHT, -1, 1), (1 - x * y).expand(HEIGHT, WIDTH, 1)], -1
    )
    noise = torch.rand(HEIGHT, WIDTH, 3, generator=torch.Generator().manual_seed(3))
    return (0.7 * base + 0.3 * noise)[None]


@pytest.fixture(scope="module")
def mask():
    """A MASK (1, H, W): the region to paint, aligned to the coarsest UNet cells (32 px), so each layer's grid
    cell is wholly inside or outside it."""
    m = torch.zeros(1, HEIGHT, WIDTH)
    m[:, 32:96, 32:96] = 1.0
    return m


def latent_outside(mask: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """Bool (h, w) of the latent cells whose 8 x 8 pixels are all outside the mask."""
    h, w = latent.shape[-2:]
    blocks = mask[0].reshape(h, 8, w, 8)
    return blocks.amax(dim=(1, 3)) == 0


def inpaint(path: str, model, positive, negative, vae, photo, mask, seed: int = 0):
    """The latent KSampler returns for `photo` with `mask` through one of ComfyUI's inpainting paths, and the
    latent it started from."""
    if path == "InpaintModelConditioning":
        positive, negative, latent = run_comfy_node(
            "InpaintModelConditioning",
            positive=positive,
            negative=negative,
            vae=vae,
            pixels=photo,
            mask=mask,
            noise_mask=True,
        )
    elif path == "VAEEncodeForInpaint":
        (latent,) = run_comfy_node("VAEEncodeForInpaint", vae=vae, pixels=photo, mask=mask, grow_mask_by=0)
    else:  # SetLatentNoiseMask on the plain VAE Encode
        (latent,) = run_comfy_node("VAEEncode", vae=vae, pixels=photo)
        (latent,) = run_comfy_node("SetLatentNoiseMask", samples=latent, mask=mask)
    (out,) = run_comfy_node(
        "KSampler",
        model=model,
        seed=seed,
        steps=STEPS,
        cfg=5.0,
        sampler_name="euler",
        scheduler="normal",
        positive=positive,
        negative=negative,
        latent_image=latent,
        denoise=1.0,
    )
    return out["samples"], latent["samples"]


def test_the_tiny_inpainting_unet_is_sdxl_with_nine_input_channels_and_the_same_cross_attention_layers(
    tiny_unet, inpaint_unet
):
    assert inpaint_unet.model.diffusion_model.input_blocks[0][0].in_channels == 9
    assert inpaint_unet.model.concat_keys == ("mask", "masked_image")  # ComfyUI concatenates these itself
    assert unet_layers(inpaint_unet.model.diffusion_model) == unet_layers(tiny_unet.model.diffusion_model)


@pytest.mark.parametrize(
    "checkpoint, path",
    [
        ("sdxl", "InpaintModelConditioning"),
        ("sdxl", "VAEEncodeForInpaint"),
        ("sdxl", "SetLatentNoiseMask"),
        ("sdxl-inpaint", "InpaintModelConditioning"),
        ("sdxl-inpaint", "VAEEncodeForInpaint"),
    ],
)
def test_inpainting_keeps_the_photo_outside_the_mask_and_puts_the_subject_inside(
    pack, tiny_unet, inpaint_unet, tiny_clip, pet, vae, photo, mask, encode, checkpoint, path
):
    model = {"sdxl": tiny_unet, "sdxl-inpaint": inpaint_unet}[checkpoint]
    negative = encode(tiny_clip, "")
    patched, positive = apply(pack, model, tiny_clip, pet, PROMPT)
    assert len(attn2_replacements(patched)) == len(unet_layers(model.model.diffusion_model))
    with_subject, start = inpaint(path, patched, positive, negative, vae, photo, mask)
    without, start_plain = inpaint(path, model, encode(tiny_clip, PROMPT), negative, vae, photo, mask)

    assert torch.equal(start, start_plain)
    outside = latent_outside(mask, with_subject)
    assert 0 < int(outside.sum()) < outside.numel()
    # Outside the mask: the latent the photo was encoded to, with the subject as without it.
    torch.testing.assert_close(with_subject[..., outside], start[..., outside], rtol=0, atol=1e-5)
    torch.testing.assert_close(without[..., outside], start[..., outside], rtol=0, atol=1e-5)
    # Inside: the subject changes the painted region.
    inside = ~outside
    assert (with_subject[..., inside] - without[..., inside]).abs().mean() > 1e-2


def test_with_the_inpainting_mask_on_apply_every_layer_output_outside_it_is_plain_attention(
    pack, inpaint_unet, tiny_clip, pet, vae, photo, mask, encode, monkeypatch
):
    """The real sampler on the inpainting UNet; each cross-attention call's conditional rows outside the
    region equal ComfyUI's own attention, bit for bit, and differ inside."""
    patched, positive = apply(pack, inpaint_unet, tiny_clip, pet, PROMPT, mask=mask)
    calls = []
    original = NestedAttentionPatch.__call__

    def recording(self, q, k, v, extra_options):
        out = original(self, q, k, v, extra_options)
        calls.append((q, k, v, dict(extra_options), out))
        return out

    monkeypatch.setattr(NestedAttentionPatch, "__call__", recording)
    inpaint("InpaintModelConditioning", patched, positive, encode(tiny_clip, ""), vae, photo, mask)
    assert len(calls) == STEPS * len(unet_layers(inpaint_unet.model.diffusion_model))
    grids = set()
    for q, k, v, extra, out in calls:
        h, w = extra["activations_shape"][-2:]
        grids.add((h, w))
        plain = comfy_attention(q, k, v, extra["n_heads"], extra)
        # A cell of this grid covers HEIGHT/h x WIDTH/w pixels; it is outside the mask when its centre is.
        rows = ((torch.arange(h) + 0.5) * HEIGHT / h).long()
        cols = ((torch.arange(w) + 0.5) * WIDTH / w).long()
        outside = (mask[0][rows][:, cols] == 0).flatten()  # (h * w,)
        cond = [i for i, flag in enumerate(extra["cond_or_uncond"]) if flag == 0]
        assert cond, extra["cond_or_uncond"]
        for row in cond:
            assert torch.equal(out[row][outside], plain[row][outside])
            assert (out[row][~outside] - plain[row][~outside]).abs().max() > 1e-4
    assert grids == {(6, 8), (3, 4)}  # the tiny UNet's two cross-attention levels, at this photo's aspect
