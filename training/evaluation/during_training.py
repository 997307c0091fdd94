"""A small evaluation inside a training run (`--eval_steps N`): does identity improve while the prompt holds?

Every N steps the main process generates the held-out images (the run's --validation_images, which
should be images the encoder does not train on) with the run's validation prompts and seeds, for the
model's prior and nested attention at λ = 1, scores them like `python -m training.evaluate`, writes
`<output_dir>/eval/step-N/` (metrics.csv / .json, grids) and logs the means and the grids to the
run's trackers (TensorBoard: scalars `eval/<method>/<figure>`, images `eval/<method>`).

Figures: CLIP-I with the encoder's CLIP vision model always; face identity for faces when dlib is
installed; CLIP-T only on the tiny test bed, whose joint space is built in code (a real run has no
joint CLIP space loaded: use training.evaluate on an exported encoder for CLIP-T).
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nested_attention.logs import LOG_PREFIX as PREFIX
from training.comfy_env import comfy_module
from training.evaluation import metrics
from training.evaluation.method_images import Generator, Method, SampleSettings, Subject, load_png, methods
from training.evaluation.pipeline import run_evaluation
from training.evaluation.prompts import PLACEHOLDER, EvalPrompt
from training.tiny import scorers as tiny_scorers

log = logging.getLogger(__name__)
glue_attention = comfy_module("nested_attention_comfy.attention")  # the glue shared with the nodes, imported on first use
_warned: set[str] = set()


def _identity_model(domain: str) -> metrics.IdentityModel | None:
    if domain == "tiny":
        return tiny_scorers.TinyIdentity()
    if domain == "faces":
        try:
            return metrics.DlibIdentity()
        except metrics.MetricSetupError as e:
            if "dlib" not in _warned:
                _warned.add("dlib")
                log.warning("%s --eval_steps: no face identity figure (%s)", PREFIX, e)
    return None


def _figure_key(name: str) -> str:
    """'identity[dlib-resnet]' -> 'identity' (TensorBoard tags stay short and stable)."""
    return name.split("[", 1)[0]


def _scorers(frozen: Any, domain: str) -> metrics.Scorers:
    """CLIP-I with the encoder's CLIP vision, identity for faces (and tiny), CLIP-T only for tiny (the run
    has no joint CLIP space loaded)."""
    clip_t = [tiny_scorers.tiny_clip_space(frozen.clip)] if domain == "tiny" else []
    return metrics.Scorers(
        clip_t=clip_t,
        clip_i=metrics.ClipImageSpace(clip_vision=frozen.clip_vision, name=frozen.clip_vision_spec.name),
        identity=_identity_model(domain),
    )


def _log_to_trackers(accelerator: Any, result: dict, step: int) -> dict:
    """The means as `eval/<method>/<figure>` scalars, the grids as TensorBoard images; returns the scalars."""
    values = {}
    for entry in result["summary"]:
        tag = Method(entry["method"], entry["value"]).slug  # the grid's name too: eval/nested-lambda-1
        for name in result["metrics"]:
            if entry.get(name) is not None:
                values[f"eval/{tag}/{_figure_key(name)}"] = entry[name]
        if "face_failure_rate" in entry:
            values[f"eval/{tag}/face_failure_rate"] = entry["face_failure_rate"]
    accelerator.log(values, step=step)
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name != "tensorboard":
            continue
        for path in result["files"].get("grids", []):
            grid = np.asarray(load_png(Path(path)))  # (H, W, 3) in [0, 1]
            tracker.log_images({f"eval/{Path(path).stem}": grid[None]}, step=step, dataformats="NHWC")
    return values


def _weights_to_evaluate(encoder: torch.nn.Module, ema: Any) -> torch.nn.Module:
    """A frozen copy of the encoder, with the EMA weights when there are any (what the export holds)."""
    model = copy.deepcopy(encoder)
    if ema is not None:
        ema.copy_to(model)
    return model.eval().requires_grad_(False)


def evaluate_during_training(
    accelerator: Any,
    frozen: Any,
    encoder: torch.nn.Module,
    text: Any,
    images: Sequence[torch.Tensor],
    prompts: Sequence[str],
    *,
    step: int,
    config: Any,
    ema: Any = None,
) -> dict | None:
    """Run the small evaluation on the main process and log it; returns the report there, None elsewhere.

    `encoder` is the trained encoder (copied, so training state is untouched; with `ema` its EMA weights
    are evaluated, as they are exported). `prompts` are the run's validation prompts with the subject
    word in place; `config` (the TrainConfig) gives validation_seeds, resolution, sample_steps, sample_cfg,
    output_dir, domain.
    """
    if not accelerator.is_main_process or not images:
        return None
    model = _weights_to_evaluate(encoder, ema)
    token = text.token
    word = re.compile(rf"\b{re.escape(token)}\b", re.IGNORECASE)
    eval_prompts = [
        EvalPrompt(word.sub(PLACEHOLDER, p, count=1), "validation") for p in prompts if word.search(p)
    ]
    if not eval_prompts:
        log.warning("%s --eval_steps: no validation prompt contains %r; nothing to evaluate", PREFIX, token)
        return None
    subjects = [
        Subject(name=f"heldout-{i}", source=f"validation image {i}", image=image.float().cpu())
        for i, image in enumerate(images)
    ]
    scorers = _scorers(frozen, config.domain)
    settings = SampleSettings(steps=config.sample_steps, cfg=config.sample_cfg, resolution=config.resolution)
    generator = Generator(
        frozen=frozen,
        encoder=model,
        text=text,
        subjects=subjects,
        prompts=eval_prompts,
        token=token,
        settings=settings,
        host=glue_attention.comfy_attention,
    )
    chosen = methods(prior=True, lambdas=(1.0,), scales=())
    folder = Path(config.output_dir) / "eval" / f"step-{step}"
    try:
        result = run_evaluation(
            generator=generator,
            scorers=scorers,
            methods=chosen,
            seeds=list(config.validation_seeds),
            output_dir=folder,
            settings={
                "step": step,
                "domain": config.domain,
                "steps": settings.steps,
                "cfg": settings.cfg,
                "resolution": settings.resolution,
            },
            accelerator=None,
            grids=True,
            progress=False,
        )
    except metrics.MetricSetupError as e:  # e.g. no face in a held-out image: say so, keep training
        log.warning("%s --eval_steps at step %d skipped: %s", PREFIX, step, e)
        return None
    values = _log_to_trackers(accelerator, result, step)
    log.info(
        "%s evaluation at step %d: %s (%s)",
        PREFIX,
        step,
        ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in values.items()),
        folder,
    )
    return result
