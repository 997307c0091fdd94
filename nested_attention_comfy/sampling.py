"""Per sampling run: capture and auto regions, through ComfyUI's OUTER_SAMPLE wrapper.

What a run observes lives in a `SamplingRun` made for that run only, never on a patch (patches are shared
between model clones from ComfyUI 0.14 on). ComfyUI calls a ModelPatcher's OUTER_SAMPLE wrappers once per
run of the sampler (CFGGuider.sample, which has already copied model_options for the run); ours puts the
run in transformer_options[RUN_KEY], which reaches every attn2 patch as extra_options[RUN_KEY].
"""

from __future__ import annotations

import math
from typing import Any

import comfy.model_patcher
import comfy.patcher_extension
import torch

from nested_attention.capture import (
    AUTO_MEASURE,
    RUN_KEY,
    AutoRegions,
    Capture,
    CaptureSink,
    SamplingRun,
    Window,
    token_grid,
)

RUN_WRAPPER_CAPTURE = "nested_attention_capture"  # wrapper keys on a ModelPatcher
RUN_WRAPPER_AUTO = "nested_attention_auto_region"


def sigma_window(model: Any, start_percent: float, end_percent: float) -> Window:
    """start/end percent of sampling as a sigma range, with the model's own schedule. From 0, the range is
    open-ended, so that the whole schedule never needs sigma read back from the device."""
    sampling = model.get_model_object("model_sampling")
    return Window(math.inf if start_percent <= 0.0 else float(sampling.percent_to_sigma(start_percent)),
                  float(sampling.percent_to_sigma(end_percent)))


class SamplingRunWrapper:
    """ComfyUI OUTER_SAMPLE wrapper: a fresh SamplingRun for each run of the sampler, for the patches to find.

    capture: (window, sink, sources): observe that part of sampling (with the token weights when `sources`) and
    publish the result to the sink when the run ends. auto: set up `region: auto` for the run. The wrapper holds nothing a run changes; clones of a model
    share it (ModelPatcher.clone copies the wrapper lists, not the wrappers).
    """

    def __init__(self, *, capture: tuple[Window, CaptureSink, bool] | None = None, auto: bool = False):
        self.capture = capture
        self.auto = auto

    def __call__(self, executor: Any, noise: torch.Tensor, latent_image: torch.Tensor, sampler: Any,
                 sigmas: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        guider = executor.class_obj
        saved = guider.model_options
        guider.model_options = comfy.model_patcher.create_model_options_clone(saved)  # this run's alone
        options = guider.model_options.setdefault("transformer_options", {})
        run = options.get(RUN_KEY)  # made by the first of our wrappers in this run
        if run is None:
            run = options[RUN_KEY] = SamplingRun(batch=int(noise.shape[0]), latent=tuple(noise.shape[-2:]))
        if self.auto and run.auto is None:
            steps = int(sigmas.shape[-1]) - 1
            measured = min(steps, max(1, round(AUTO_MEASURE * steps)))  # the first steps, at least one
            run.auto = AutoRegions(float(sigmas[max(0, measured)]), run.batch)
        capture = None
        if self.capture is not None:
            window, _, sources = self.capture
            capture = Capture(window, token_grid(run.latent), run.batch, sources)
            run.captures.append(capture)
        try:
            samples = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            guider.model_options = saved
        if capture is not None:
            regions = None if run.auto is None else run.auto.regions
            self.capture[1].publish(capture.result(run.latent, regions))
        return samples

    def __deepcopy__(self, memo: dict) -> SamplingRunWrapper:
        return self  # holds no per-run state; the sink must stay the capture node's


def add_capture(model: Any, sink: CaptureSink, window: Window | None = None, sources: bool = True) -> None:
    """Observe `window` (default: all) of every sampling run of `model`, an already-cloned ModelPatcher, into
    `sink`; `sources`: also the token weights (the source map), which cost more than nested attention does."""
    window = Window() if window is None else window
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, RUN_WRAPPER_CAPTURE,
                               SamplingRunWrapper(capture=(window, sink, sources)))


def add_auto_regions(model: Any) -> None:
    """Let the subjects bound with `auto_region` find their regions in every sampling run of `model` (an
    already-cloned ModelPatcher); once per model, however many subjects are auto. install_subject calls it."""
    if not model.get_wrappers(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, RUN_WRAPPER_AUTO):
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, RUN_WRAPPER_AUTO,
                                   SamplingRunWrapper(auto=True))
