"""Train a nested attention encoder: `python -m training.run --domain pets|faces|tiny`.

One GPU:            python -m training.run --domain pets
Several / machines: accelerate launch [--multi_gpu --num_processes N ...] -m training.run --domain faces
CPU smoke run:      python -m training.run --domain tiny --output_dir output/tiny

Frozen SDXL (ComfyUI's model code) and CLIP vision; trainable Q-Former and per-layer projections;
the standard noise-prediction loss through the UNet with the very attention patch the nodes
install. Checkpoints (`save_state`) go to <output_dir>/checkpoint-N with the node weight file
<domain>-encoder.safetensors inside; the final weight file is <output_dir>/<domain>-encoder.safetensors.

`main` is the run as named steps: config (training.loop.config) -> inputs -> accelerator -> data scan
(training.data.scan: one summary, caption counts included; --num_train_epochs; args.json; --dry_run stops
here: training.loop.preview) -> frozen models
-> encoder -> optimizer (training.loop.optim) -> resume (training.loop.checkpoints) -> data loader (with
training.data.latent_cache) -> loop (loss: training.loop.loss) -> export.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration
from tqdm.auto import tqdm

from nested_attention import load_encoder
from nested_attention.logs import LOG_PREFIX as PREFIX
from nested_attention.weights import weights_fingerprint
from training.comfy_env import comfy_module, has_accelerator
from training.data import dataset as data_lib
from training.data.latent_cache import CachedDataset, build_cache
from training.data.scan import TrainingData, read_training_data
from training.data.shards import TarShardStream
from training.evaluation.during_training import evaluate_during_training
from training.loop.checkpoints import (
    DISK_FULL,
    Checkpoints,
    Position,
    ProcessState,
    write_failure,
)
from training.loop.config import TrainConfig, resolve_inputs
from training.loop.loss import training_loss
from training.loop.optim import Trainee, make_optimizer
from training.loop.preemption import StopRequest
from training.loop.preview import dry_run, load_validation_images, write_args
from training.loop.warm_start import WarmStartError, warm_start_encoder
from training.models.sampling import write_samples
from training.models.sdxl import TextEncoder, enable_gradient_checkpointing, load_frozen, make_encoder

log = logging.getLogger("training")
comfy = comfy_module("comfy")  # imported on first use, after accelerate has chosen this process's device


# ------------------------------------------------------------------------------------------------
# Steps before training


def make_accelerator(config: TrainConfig):
    """accelerate's Accelerator for this run; also sets torch's thread count and TF32 switch."""
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / config.logging_dir)
        ),
        cpu=not has_accelerator(),
        # Ranks wait for each other while one builds its part of the latent cache or draws a sample grid.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.ddp_timeout))],
    )
    if accelerator.num_processes != config.num_processes:  # the global batch was split over num_processes
        raise SystemExit(
            f"{PREFIX} accelerate started {accelerator.num_processes} processes but $WORLD_SIZE said "
            f"{config.num_processes}; launch with accelerate launch or torchrun, which set it."
        )
    if config.cpu_threads is not None:
        torch.set_num_threads(config.cpu_threads)
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    return accelerator


def load_frozen_models(config: TrainConfig):
    """SDXL (UNet, text encoders, VAE) and CLIP vision, frozen; a wrong file stops with its reason."""
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision)
    try:
        frozen = load_frozen(
            tiny=config.preset.tiny,
            checkpoint=config.pretrained_model,
            clip_vision_path=config.clip_vision,
            weight_dtype=weight_dtype,
            seed=0,
        )
    except ValueError as e:  # a file that is not SDXL base / not a CLIP vision model: say which, no traceback
        raise SystemExit(f"{PREFIX} cannot start training: {e}") from e
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(frozen.base.diffusion_model)
    return frozen


def build_encoder(config: TrainConfig, frozen):
    """The trainable NestedEncoder: fresh (M = --num_tokens), warm-started from --init_from (any layout the
    pack reads; M and the CLIP hidden layer from the file), or from --init_encoder; float32, train mode."""
    if config.init_from:
        try:
            encoder = warm_start_encoder(
                config.init_from, frozen, domain=config.domain, token=config.token, alpha=config.alpha
            )
        except WarmStartError as e:
            raise SystemExit(f"{PREFIX} {e}") from e
    elif config.init_encoder:
        encoder = load_encoder(config.init_encoder)
        cfg = encoder.config
        if (
            cfg.layers != frozen.layers
            or cfg.num_tokens != config.num_tokens
            or not cfg.clip_vision.same_architecture(frozen.clip_vision_spec)
        ):
            raise SystemExit(
                f"{PREFIX} --init_encoder {config.init_encoder} was trained for M={cfg.num_tokens}, "
                f"{len(cfg.layers)} layers and CLIP vision {cfg.clip_vision.describe()}; this run has "
                f"M={config.num_tokens}, {len(frozen.layers)} layers and "
                f"{frozen.clip_vision_spec.describe()}."
            )
        encoder.config.token, encoder.config.alpha = config.token, config.alpha
        # An export of a warm-started run reads the CLIP layer it was trained on (IP-Adapter: penultimate).
        frozen.clip_vision_spec.hidden_layer = cfg.clip_vision.hidden_layer
        encoder.requires_grad_(True).train()
    else:
        encoder = make_encoder(
            domain=config.domain,
            token=config.token,
            qformer=replace(config.preset.qformer, num_queries=config.num_tokens),  # M lives here in the core
            frozen=frozen,
            alpha=config.alpha,
            init_from_unet=config.init_projections == "unet",
            seed=config.seed,
        )
    return encoder.float().train()


def make_loader(config: TrainConfig, accelerator, data: TrainingData, frozen, start_batch: int):
    """The data loader from batch `start_batch` on: a tar stream, the latent cache, or images per step."""
    rank, world = accelerator.process_index, accelerator.num_processes
    sample_config = data.sample_config(config, frozen.clip_vision_spec.image_size)
    kwargs = {
        "num_workers": config.dataloader_num_workers,
        "collate_fn": data_lib.collate,
        "persistent_workers": False,
        "pin_memory": torch.cuda.is_available(),
    }
    if data.kind == "shards":
        stream = TarShardStream(
            data.source,
            sample_config,
            config.train_batch_size,
            rank=rank,
            world=world,
            start_batch=start_batch,
        )
        return torch.utils.data.DataLoader(stream, batch_size=config.train_batch_size, **kwargs)
    if config.cache_latents:
        folder = build_cache(
            accelerator,
            frozen,
            data.records,
            sample_config,
            Path(config.cache_dir),
            model=config.pretrained_model or "tiny",
            batch_size=config.train_batch_size,
        )
        dataset = CachedDataset(folder, data.records, data.captions)
    else:
        dataset = data_lib.RecordDataset(data.records, sample_config)
    sampler = data_lib.StepBatchSampler(
        len(dataset), config.train_batch_size, config.seed, rank=rank, world=world, start=start_batch
    )
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **kwargs)


def comfy_load(unet) -> None:
    """Load the UNet fully onto its device (ComfyUI may have offloaded it for the VAE, CLIP or sampling)."""
    comfy.model_management.load_models_gpu([unet], force_full_load=True)


# ------------------------------------------------------------------------------------------------
# The loop


@dataclass
class LoopState:
    """Where the loop stands on this process."""

    global_step: int  # optimizer steps done
    batches: int  # batches drawn from the loader (the data stream's position)
    initial_fingerprint: str  # the encoder's weights when the run (or resume) started
    last_keys: list = field(default_factory=list)  # keys of the last batch
    losses: dict = field(default_factory=dict)  # step -> loss, gathered over processes
    stopped: bool = False  # SIGTERM: the loop saved a checkpoint at global_step and stopped early


def train_loop(
    config: TrainConfig,
    accelerator,
    trainee: Trainee,
    frozen,
    text,
    loader,
    checkpoints: Checkpoints,
    state: LoopState,
    validation_images: list,
    data_path: str,
    stop: StopRequest,
) -> None:
    """Optimizer steps until --max_train_steps: loss, backward, clip, step; log, checkpoint, sample.
    After a SIGTERM (`stop`), the step under way is the last: it is checkpointed and the loop returns."""
    is_main, rank = accelerator.is_main_process, accelerator.process_index
    loss_log = Path(config.output_dir) / config.logging_dir / "losses.jsonl"
    if is_main:
        loss_log.parent.mkdir(parents=True, exist_ok=True)
    loss_config = config.loss
    progress = tqdm(
        total=config.max_train_steps, initial=state.global_step, desc="steps", disable=not is_main
    )
    step_loss = 0.0
    batches = iter(loader)
    empty_in_a_row = 0
    try:
        while state.global_step < config.max_train_steps:
            batch = next(batches)
            state.batches += 1
            if batch is None:  # every image of the batch was unreadable (logged by the data set)
                empty_in_a_row += 1
                if empty_in_a_row >= 100:
                    raise SystemExit(
                        f"{PREFIX} 100 batches in a row had no readable image; check the training data "
                        f"{data_path} (the warnings above name the files)."
                    )
                continue
            empty_in_a_row = 0
            state.last_keys = list(batch["key"])
            # Keep ComfyUI's memory management from leaving the UNet offloaded after VAE / CLIP / sampling use.
            comfy_load(frozen.unet)
            with accelerator.accumulate(trainee.module):
                loss = training_loss(
                    trainee.module, frozen, text, batch, loss_config, rank, state.batches - 1, accelerator.device
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainee.module.parameters(), config.max_grad_norm)
                trainee.optimizer.step()
                trainee.scheduler.step()
                trainee.optimizer.zero_grad(set_to_none=True)
            step_loss += (
                accelerator.gather(loss.detach()[None]).mean().item() / config.gradient_accumulation_steps
            )
            if not accelerator.sync_gradients:
                continue
            if trainee.ema is not None:
                trainee.ema.update(trainee.encoder)
            state.global_step += 1
            step = state.global_step
            log_step(config, accelerator, progress, loss_log, state, step_loss, trainee.scheduler.get_last_lr()[0])
            step_loss = 0.0
            last = step == config.max_train_steps
            stopping = stop.agreed(accelerator)
            if step % config.checkpointing_steps == 0 or last or stopping:
                checkpoints.save(step, process_state(state, config, trainee.encoder))
            if stopping:
                state.stopped = True
                break
            sample_and_evaluate(config, accelerator, trainee, frozen, text, validation_images, step, last)
    finally:  # on an error too: the bar's line ends before the error's message
        progress.close()


def log_step(config: TrainConfig, accelerator, progress, loss_log: Path, state: LoopState, loss: float,
             lr: float) -> None:
    """One optimizer step's loss and learning rate: the progress bar, the trackers, losses.jsonl."""
    step = state.global_step
    progress.update(1)
    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
    state.losses[step] = loss
    if config.report_to != "none":
        accelerator.log({"loss": loss, "lr": lr}, step=step)
    if accelerator.is_main_process:
        with open(loss_log, "a") as f:
            f.write(json.dumps({"step": step, "loss": loss, "lr": lr}) + "\n")


def sample_and_evaluate(config: TrainConfig, accelerator, trainee: Trainee, frozen, text,
                        validation_images: list, step: int, last: bool) -> None:
    """The sample grid (--validation_steps) and the evaluation (--eval_steps) when either is due."""
    due = config.validation_steps and (step % config.validation_steps == 0 or last)
    if due and accelerator.is_main_process and validation_images:
        write_samples(config, step, frozen, trainee, text, validation_images)
    if config.eval_steps and (step % config.eval_steps == 0 or last):
        evaluate_during_training(
            accelerator, frozen, trainee.encoder, text, validation_images,
            [prompt.format(token=config.token) for prompt in config.validation_prompts],
            step=step, config=config, ema=trainee.ema,
        )


def process_state(state: LoopState, config: TrainConfig, encoder) -> ProcessState:
    """What this process writes into a checkpoint: its position, its batch layout and a fingerprint of the
    weights it holds."""
    return ProcessState(
        global_step=state.global_step,
        batches=state.batches,
        world=config.num_processes,
        train_batch_size=config.train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        weights_sha256=weights_fingerprint(encoder),
        initial_weights_sha256=state.initial_fingerprint,
        batch_keys=state.last_keys,
    )


# ------------------------------------------------------------------------------------------------
# The run


def main(config: TrainConfig) -> dict:
    """Train; returns a summary {"global_step", "losses", "encoder_path", "output_dir"} (and "stopped":
    "SIGTERM" when a SIGTERM ended it early, after a checkpoint; see training.loop.preemption)."""
    # Our messages at INFO; ComfyUI's (root logger) and accelerate's only from WARNING on.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("training").setLevel(logging.INFO)
    with StopRequest() as stop:
        return run(config, stop)


def run(config: TrainConfig, stop: StopRequest) -> dict:
    """The steps of `main`, with SIGTERM caught by `stop`."""
    config = resolve_inputs(config)
    accelerator = make_accelerator(config)
    config, data = scan_data(config, accelerator)
    if accelerator.is_main_process:
        write_args(config)
    if config.dry_run:  # settings and a preview of processed samples, no model loaded
        return dry_run(config, data) if accelerator.is_main_process else {"dry_run": True}
    # ComfyUI is imported only from here on: its device choice sees the device accelerate gave this process.
    frozen = load_frozen_models(config)
    encoder = build_encoder(config, frozen)
    if config.init_from:  # M comes from the file: a new frozen config says so to everything after this step
        config = dataclasses.replace(config, num_tokens=encoder.config.num_tokens)
        if accelerator.is_main_process:
            write_args(config)
    trainee = make_optimizer(config, accelerator, encoder, frozen)
    output_dir = Path(config.output_dir)
    checkpoints = Checkpoints(
        accelerator=accelerator,
        output_dir=output_dir,
        limit=config.checkpoints_total_limit or None,
        encoder_file=f"{config.domain}-encoder.safetensors",
        export=lambda path, step: trainee.export(path, step, config),
    )
    position: Position = checkpoints.resume(
        config.resume_from_checkpoint,
        config.gradient_accumulation_steps,
        config.init_encoder,
        config.train_batch_size,
    )
    loader = make_loader(config, accelerator, data, frozen, position.batches)

    text = TextEncoder(frozen.clip, config.token, cache=config.cache_text_embeddings)
    validation_images = (
        load_validation_images(config, data) if config.validation_steps or config.eval_steps else []
    )
    if accelerator.is_main_process and config.report_to != "none":
        accelerator.init_trackers("nested-attention", config=config.for_trackers())
    log_start(config, accelerator, frozen, data)
    state = LoopState(
        global_step=position.global_step,
        batches=position.batches,
        initial_fingerprint=weights_fingerprint(trainee.encoder),
    )
    checkpoints.check_resumed(position, state.initial_fingerprint, config.resume_from_checkpoint)
    started = time.perf_counter()
    stop.in_loop = True
    try:
        train_loop(
            config, accelerator, trainee, frozen, text, loader, checkpoints, state, validation_images, data.path,
            stop,
        )
    except OSError as e:  # the loss log, a sample grid, an evaluation: a full disk stops the run clearly
        if e.errno not in DISK_FULL:
            raise
        raise write_failure(Path(e.filename or output_dir), e, output_dir, removed=False) from e

    accelerator.wait_for_everyone()
    return finish(config, accelerator, trainee, state, stop, started)


def scan_data(config: TrainConfig, accelerator) -> tuple[TrainConfig, TrainingData]:
    """The one data scan, before any model loads: bad data stops the run in seconds. Its summary counts the
    captions. Then the data's path (tiny: generated) and --num_train_epochs' steps, now that it is read."""
    data = read_training_data(config, accelerator)
    config = config.with_inputs(train_data=data.path).with_epochs(len(data.records))
    if config.num_train_epochs is not None and accelerator.is_main_process:
        log.info(
            "%s %g epochs of %d records at a global batch of %d: %d steps",
            PREFIX,
            config.num_train_epochs,
            len(data.records),
            config.global_batch_size,
            config.max_train_steps,
        )
    return config, data


def log_start(config: TrainConfig, accelerator, frozen, data: TrainingData) -> None:
    log.info(
        "%s training %s: %d steps, global batch %d = %d x %d accumulation x %d processes, resolution %d, "
        "M=%d, %d layers, %d records (%s)",
        PREFIX,
        config.domain,
        config.max_train_steps,
        config.global_batch_size,
        config.train_batch_size,
        config.gradient_accumulation_steps,
        accelerator.num_processes,
        config.resolution,
        config.num_tokens,
        len(frozen.layers),
        len(data.records),
        data.kind,
    )


def finish(config: TrainConfig, accelerator, trainee: Trainee, state: LoopState, stop: StopRequest,
           started: float) -> dict:
    """After the loop: the export (or, stopped by SIGTERM, only the message); returns main's summary."""
    output_dir = Path(config.output_dir)
    final = output_dir / f"{config.domain}-encoder.safetensors"
    if state.stopped:
        if accelerator.is_main_process:
            log.info(
                "%s stopped by SIGTERM after step %d, %.1f s after the signal: checkpoint-%d is saved; continue "
                "with --resume_from_checkpoint latest",
                PREFIX, state.global_step, time.monotonic() - stop.requested_at, state.global_step,
            )
        accelerator.end_training()
        return {
            "global_step": state.global_step,
            "losses": state.losses,
            "encoder_path": None,
            "output_dir": str(output_dir),
            "stopped": "SIGTERM",
        }
    if accelerator.is_main_process:
        try:
            trainee.export(final, state.global_step, config)
        except Exception as e:  # a full disk, a read-only folder: the checkpoints hold the weights
            raise write_failure(final, e, output_dir, removed=False) from e
        where = (
            "a test-bed encoder for the tiny models (tests, smoke runs), not for ComfyUI: SDXL cannot use it"
            if config.preset.tiny
            else "encoder for the nodes (copy it to ComfyUI/models/nested_attention)"
        )
        log.info(
            "%s done: %d steps in %.1f s; %s: %s",
            PREFIX,
            state.global_step,
            time.perf_counter() - started,
            where,
            final,
        )
    accelerator.end_training()
    return {
        "global_step": state.global_step,
        "losses": state.losses,
        "encoder_path": str(final),
        "output_dir": str(output_dir),
    }

