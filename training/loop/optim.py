"""What the optimizer changes: AdamW on the encoder, its schedule and EMA, prepared by accelerate.

`Trainee` holds them for the loop and exports the node weight file (the EMA weights with
--use_ema) into checkpoints and at the end.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nested_attention import save_encoder
from nested_attention.logs import LOG_PREFIX as PREFIX
from training.loop.config import TrainConfig
from training.models.sdxl import EMA, NestedTrainingModule

log = logging.getLogger("training")


def lr_lambda(name: str, warmup: int, total: int):
    """The learning-rate factor of step `step` for the schedule `name` (LambdaLR's function)."""

    def f(step: int) -> float:
        if name != "constant" and step < warmup:
            return (step + 1) / (warmup + 1)
        if name in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if name == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


@dataclass
class Trainee:
    """What the optimizer changes, prepared by accelerate: module, encoder, optimizer, schedule, EMA."""

    module: Any  # NestedTrainingModule (maybe wrapped for distributed data parallel)
    encoder: Any  # the unwrapped NestedEncoder inside it
    optimizer: Any
    scheduler: Any
    ema: Any | None  # models.EMA of the encoder's weights, with --use_ema

    def export(self, path: Path, step: int, config: TrainConfig) -> None:
        """The node weight file (docs/ARCHITECTURE.md): EMA weights with --use_ema, else the trained ones."""
        out = self.encoder
        if self.ema is not None:
            out = copy.deepcopy(self.encoder)
            self.ema.copy_to(out)
        extra = {"trainer_step": str(step), "trainer_resolution": str(config.resolution)}
        save_encoder(str(path), out, extra={**extra, "trainer_domain": config.domain})
        log.info("%s exported %s", PREFIX, path)


def adamw(parameters, *, lr: float, betas=(0.9, 0.999), weight_decay: float = 1e-2, eps: float = 1e-8):
    """The trainer's AdamW, fused: one kernel per step for all the encoder's tensors (on a CPU a fourth of the
    per-tensor loop's time; the benchmark's trainer line shows the step's share outside the UNet)."""
    import torch

    return torch.optim.AdamW(parameters, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, fused=True)


def make_optimizer(config: TrainConfig, accelerator, encoder, frozen) -> Trainee:
    """AdamW on the encoder, its learning-rate schedule and the EMA, prepared by accelerate."""
    world = accelerator.num_processes
    module = NestedTrainingModule(encoder, frozen.base)
    optimizer = adamw(
        encoder.parameters(),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    # accelerate steps a prepared scheduler once per process per optimizer step.
    schedule = lr_lambda(config.lr_scheduler, config.lr_warmup_steps * world, config.max_train_steps * world)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    ema = EMA(encoder, config.ema_decay) if config.use_ema else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    module, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
    encoder = accelerator.unwrap_model(module).encoder
    return Trainee(module=module, encoder=encoder, optimizer=optimizer, scheduler=scheduler, ema=ema)
