"""Warm start (`--init_from FILE`): begin training from trained weights of any layout the pack reads.

An IP-Adapter Plus SDXL file, the Nested Attention authors' release (IP-Adapter-derived layouts) or one of
the pack's own exports becomes the run's trainable encoder, mapped onto the frozen UNet's own layer table.
Everything the file fixes comes from the file: M, the Q-Former's shape, the feed-forward biases, the CLIP
hidden layer its tokens come from, and its licence (weights derived from non-commercial weights stay
non-commercial). The run's domain, token and alpha are the run's. The export is in the pack's format.

Does not import ComfyUI itself; it is given the frozen models the run already loaded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any

import torch

from nested_attention import NestedEncoder, NestedWeightsError, load_encoder
from nested_attention.formats import KNOWN_CLIP_VISION, plan_encoder, read_header
from nested_attention.logs import LOG_PREFIX as PREFIX

log = logging.getLogger(__name__)


class WarmStartError(ValueError):
    """The file cannot start this run; the message says what was found and expected."""


def warm_start_encoder(
    path: str,
    frozen: Any,
    *,
    domain: str,
    token: str,
    alpha: float,
    dim_head: int | None = None,
) -> NestedEncoder:
    """The run's trainable encoder (float32, train mode) from `path`, for `frozen`'s layers and CLIP vision.

    `frozen` is training.models.sdxl.FrozenModels. Its `clip_vision_spec.hidden_layer` is set to the file's, so the
    run feeds the Q-Former the CLIP tokens the weights were trained on (IP-Adapter Plus: the penultimate
    layer). Raises WarmStartError when the file does not fit the run's UNet or CLIP vision model.
    """
    name = os.path.basename(path)
    run_clip = frozen.clip_vision_spec
    try:
        header = read_header(path)
        # The run's CLIP vision model describes the tower; the file decides which of its layers is read.
        plan = plan_encoder(header, layers=frozen.layers, dim_head=dim_head, clip_vision=run_clip)
    except NestedWeightsError as e:
        raise WarmStartError(f"--init_from {name}: {e}") from e
    config = plan.config
    known = KNOWN_CLIP_VISION.get(config.qformer.clip_dim)
    expected_clip = config.clip_vision if plan.format == "nested-attention" else (known or run_clip)
    if config.qformer.clip_dim != run_clip.hidden_size or not expected_clip.same_architecture(run_clip):
        raise WarmStartError(
            f"--init_from {name} reads CLIP tokens of {expected_clip.describe()} (Q-Former input width "
            f"{config.qformer.clip_dim}); this run's CLIP vision model is {run_clip.describe()}. Pass the CLIP "
            "vision model the file was trained with (--clip_vision).")
    if tuple(config.layers) != tuple(frozen.layers):
        raise WarmStartError(
            f"--init_from {name} was made for {len(config.layers)} cross-attention layers; this run's UNet has "
            f"{len(frozen.layers)}. Use a file made for this model.")

    encoder = load_encoder(path, dtype=torch.float32, layers=frozen.layers, dim_head=dim_head, clip_vision=run_clip)
    source = f"warm start from {name} ({plan.format}" + (f": {config.source})" if config.source else ")")
    encoder.config = replace(
        encoder.config, domain=domain, token=token, alpha=alpha, source=source,
        clip_vision=replace(run_clip, hidden_layer=encoder.config.clip_vision.hidden_layer,
                            crop=encoder.config.clip_vision.crop))
    frozen.clip_vision_spec = encoder.config.clip_vision
    log.info("%s warm start from %s (%s): M=%d, %d layers, CLIP %s hidden layer, licence %s", PREFIX, name,
             plan.format, encoder.config.num_tokens, len(encoder.config.layers),
             encoder.config.clip_vision.hidden_layer, encoder.config.licence or "not recorded")
    for note in plan.notes:
        log.info("%s   %s", PREFIX, note)
    return encoder.requires_grad_(True).train()
