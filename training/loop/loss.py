"""The per-step loss: epsilon prediction through the frozen UNet with the subject's attention patch.

Everything random in a step (classifier-free dropout, noise, timesteps) is drawn from a generator
seeded by (seed, rank, batch index), so a resumed run draws what the uninterrupted one drew.
ComfyUI is imported only when the loss is first computed (training.models.sdxl sets it up).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from training.comfy_env import comfy_module
from training.data.dataset import mix_seed
from training.models.sdxl import align_subjects, sdxl_adm

glue_clip_vision = comfy_module("nested_attention_comfy.clip_vision")  # the glue shared with the nodes, imported on first use


@dataclass(frozen=True)
class LossConfig:
    """What the loss reads from the run's settings."""

    seed: int  # the run's seed; mixed with the rank and batch index for each step's draws
    token: str  # the subject word: the whole caption of a text-only sample
    text_dropout: float  # P(caption reduced to the token; subject kept)
    subject_dropout: float  # P(subject dropped; caption kept)
    both_dropout: float  # P(empty caption and no subject)
    noise_offset: float = 0.0  # per-channel constant noise added to the noise; 0 off
    snr_gamma: float | None = None  # min-SNR weighting min(SNR, gamma) / SNR; None off


def training_loss(module, frozen, text, batch: dict, config: LossConfig, rank: int, batch_index: int, device):
    """The epsilon-prediction loss of one batch; dropout, noise and timesteps from (seed, rank, batch)."""
    base = frozen.base
    generator = torch.Generator().manual_seed(mix_seed(config.seed, "batch", rank, batch_index))
    captions = list(batch["caption"])
    n = len(captions)
    with torch.no_grad():
        if "latents" in batch:
            latents = batch["latents"].float()
            clip_tokens = batch["clip_tokens"]
        else:
            latents = frozen.vae.encode(batch["pixels"])
            # The layer the encoder reads (warm start: the file's).
            clip_tokens = glue_clip_vision.clip_vision_tokens(frozen.clip_vision, frozen.clip_vision_spec, batch["clip_pixels"])
        latents = base.process_latent_in(latents.float().cpu())

    # Classifier-free dropout: one draw per sample picks text only, subject only, both, or neither.
    u = torch.rand(n, generator=generator)
    t_drop, s_drop, b_drop = config.text_dropout, config.subject_dropout, config.both_dropout
    text_only = u < t_drop
    subject_only = (u >= t_drop) & (u < t_drop + s_drop)
    both = (u >= t_drop + s_drop) & (u < t_drop + s_drop + b_drop)
    for i in range(n):
        if text_only[i]:
            captions[i] = config.token  # the prompt is the subject alone
        elif both[i]:
            captions[i] = ""
    keep_subject = ~(subject_only | both)
    context, pooled, positions = text.encode(captions)
    adm = sdxl_adm(base, pooled, batch["time_ids"])

    noise = torch.randn(latents.shape, generator=generator)
    if config.noise_offset:
        noise = noise + config.noise_offset * torch.randn(
            latents.shape[0], latents.shape[1], 1, 1, generator=generator
        )
    timesteps = torch.randint(0, len(base.model_sampling.sigmas), (n,), generator=generator)
    sigmas = base.model_sampling.sigmas.cpu()[timesteps].float()
    x_noisy = latents + noise * sigmas.view(-1, 1, 1, 1)  # ComfyUI's EPS noise_scaling
    context, groups = align_subjects(context, positions, keep_subject)

    eps = module(
        clip_tokens.to(device),
        x_noisy.to(device),
        sigmas.to(device),
        context.to(device),
        adm.to(device),
        groups,
    )
    mse = (eps.float() - noise.to(device)).pow(2).mean(dim=(1, 2, 3))
    if (
        config.snr_gamma is not None
    ):  # min-SNR for epsilon prediction: min(SNR, gamma) / SNR, SNR = 1 / sigma^2
        mse = mse * (config.snr_gamma * sigmas.to(device) ** 2).clamp(max=1.0)
    return mse.mean()
