"""Sample grids during training: fixed prompts, subjects and seeds through ComfyUI's own sampler.

The encoder is used exactly as the nodes use it: CLIP vision `encode_image(crop=True)`, the
Q-Former, one `SubjectBinding` per subject and prompt, the core's `NestedAttentionPatch` on a
clone of the UNet's ModelPatcher, `comfy.sample.sample`, VAE decode. Row 0 is the model without
a subject (same prompts and seeds), then one row per subject image; column 0 shows the input. Rows
and columns are labelled ("no subject", the prompt and seed).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from nested_attention import NestedEncoder
from nested_attention.logs import LOG_PREFIX as PREFIX
from nested_attention.patch import SubjectBinding
from nested_attention.tokens import CHUNK
from training.comfy_env import comfy_module
from training.loop.preview import labelled_grid
from training.models.sdxl import FrozenModels, TextEncoder

# Imported on first use (training.comfy_env): importing this module loads no ComfyUI.
comfy = comfy_module("comfy")
glue_clip_vision = comfy_module("nested_attention_comfy.clip_vision")  # the glue shared with the nodes, imported on first use
glue_model = comfy_module("nested_attention_comfy.model")  # the glue shared with the nodes, imported on first use

log = logging.getLogger(__name__)


def prompt_positions(text: TextEncoder, prompt: str) -> tuple[tuple[int, ...], int]:
    """(positions of the subject token over all chunks, prompt length in tokens)."""
    tokens = text.clip.tokenize(prompt, return_word_ids=True)
    return text.positions(tokens), CHUNK * len(tokens[text.stream])


def patched_model(
    frozen: FrozenModels,
    encoder: NestedEncoder,
    tokens: torch.Tensor,
    positions: tuple[int, ...],
    prompt_tokens: int,
    lam: float = 1.0,
):
    """A clone of the UNet's ModelPatcher with the subject on every cross-attention layer (λ = `lam`)."""
    model = frozen.unet.clone()
    binding = SubjectBinding(
        encoder=encoder,
        tokens=tokens,
        positions=positions,
        prompt_tokens=prompt_tokens,
        lam=float(lam),
        name="validation",
    )
    glue_model.install_subject(model, binding, encoder.layers)
    return model


@torch.no_grad()
def sample_image(
    model,
    vae,
    positive: list,
    negative: list,
    seed: int,
    *,
    steps: int,
    cfg: float,
    resolution: int,
    sampler: str = "euler",
    scheduler: str = "normal",
) -> torch.Tensor:
    """One image with ComfyUI's sampler from an empty latent, as KSampler makes it; (H, W, 3) in [0, 1].

    The one sampling call of the trainer's sample grids, the evaluation and `training.prepare --generate`.
    """
    side = resolution // 8
    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros(1, 4, side, side))
    noise = comfy.sample.prepare_noise(latent, seed)
    samples = comfy.sample.sample(
        model, noise, steps, cfg, sampler, scheduler, positive, negative, latent, seed=seed, disable_pbar=True
    )
    return vae.decode(samples)[0].float().cpu().clamp(0, 1)


@torch.no_grad()
def sample_grid(
    frozen: FrozenModels,
    encoder: NestedEncoder,
    text: TextEncoder,
    images: Sequence[torch.Tensor],
    prompts: Sequence[str],
    seeds: Sequence[int],
    resolution: int,
    steps: int,
    cfg: float,
    path: Path,
) -> Path:
    """Write a labelled PNG grid (training.loop.preview.labelled_grid): rows = [no subject] + images, columns =
    input + prompts x seeds, each column labelled with its prompt and seed."""
    encoder.eval()
    # One photo (H, W, 3) in [0, 1] at a time -> (1, M, C), as the nodes encode it.
    subject_tokens = [glue_clip_vision.photo_tokens(frozen.clip_vision, frozen.clip_vision_spec, encoder, image[None]) for image in images]

    negative = frozen.clip.encode_from_tokens_scheduled(frozen.clip.tokenize(""))
    cells = []  # rows of (H, W, 3) arrays
    for row in range(len(images) + 1):
        thumb = np.ones((resolution, resolution, 3), dtype=np.float32)
        if row > 0:
            small = torch.nn.functional.interpolate(
                images[row - 1].movedim(-1, 0)[None],
                size=(resolution, resolution),
                mode="bilinear",
                antialias=True,
            )
            thumb = small[0].movedim(0, -1).clamp(0, 1).numpy()
        line = [thumb]
        for prompt in prompts:
            positive = frozen.clip.encode_from_tokens_scheduled(frozen.clip.tokenize(prompt))
            model = frozen.unet
            if row > 0:
                positions, prompt_tokens = prompt_positions(text, prompt)
                if not positions:
                    log.warning(
                        "%s validation prompt %r lacks the token %r; its subject column shows no subject",
                        PREFIX,
                        prompt,
                        text.token,
                    )
                else:
                    model = patched_model(frozen, encoder, subject_tokens[row - 1], positions, prompt_tokens)
            for seed in seeds:
                image = sample_image(
                    model, frozen.vae, positive, negative, seed, steps=steps, cfg=cfg, resolution=resolution
                )
                line.append(image.numpy())
        cells.append(line)
    grid, _ = labelled_grid(
        cells,
        row_labels=["no subject"] + [f"subject {i + 1}" for i in range(len(images))],
        col_labels=["subject image"] + [f"{prompt} | seed {seed}" for prompt in prompts for seed in seeds],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def write_samples(config, step: int, frozen: FrozenModels, trainee, text: TextEncoder, images: list) -> Path:
    """The sample grid of step `step` (with the EMA weights when --use_ema), on the main process."""
    out = copy.deepcopy(trainee.encoder)
    if trainee.ema is not None:
        trainee.ema.copy_to(out)
    prompts = [prompt.format(token=config.token) for prompt in config.validation_prompts]
    path = sample_grid(
        frozen,
        out,
        text,
        images,
        prompts,
        config.validation_seeds,
        config.resolution,
        config.sample_steps,
        config.sample_cfg,
        Path(config.output_dir) / f"samples-{step}.png",
    )
    log.info("%s sample grid %s", PREFIX, path)
    return path

