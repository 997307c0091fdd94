"""What is generated: the methods, the job list and its split over processes, and one image per job.

Methods, all on the same prompts, seeds and subjects:
- prior: the model with no subject (what the prompt alone gives), unpatched;
- nested at λ: the pack's `NestedAttentionPatch`, installed as the trainer's sample grid installs it
  (training.models.sampling.patched_model; the nodes install the same patch);
- decoupled at a scale: IP-Adapter's decoupled cross-attention, `out = attn(q, K, V) + scale *
  attn(q, K_ip, V_ip)`, with K_ip, V_ip from the SAME per-layer projections of the same encoder
  (`SubjectBinding.layer_kv`, i.e. `NestedEncoder.project`), so the two ways of injecting one
  set of weights are compared point by point.

Images go to `<output_dir>/images/<method>/<subject>/p<prompt>-seed<seed>.png`; a job whose file
exists is not generated again (resume).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from nested_attention import NestedEncoder
from nested_attention.images import from_pil, to_pil
from nested_attention.patch import SubjectBinding, conditional_rows
from training.evaluation.prompts import EvalPrompt
from training.models.sampling import patched_model, prompt_positions
from training.models.sampling import sample_image as sample

log = logging.getLogger(__name__)

LAMBDAS = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)  # the paper's λ values (Figure 10)
DECOUPLED_SCALES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # IP-Adapter scales 0.5 to 1.0 (Figure 10)


# ------------------------------------------------------------------------------------------------
# Methods and jobs


@dataclass(frozen=True, order=True)
class Method:
    kind: str  # "prior" (no subject), "nested" (value = λ) or "decoupled" (value = IP-Adapter scale)
    value: float | None = None

    @property
    def parameter(self) -> str | None:
        return {"nested": "lambda", "decoupled": "scale"}.get(self.kind)

    @property
    def label(self) -> str:
        if self.kind == "prior":
            return "prior (no subject)"
        return f"{self.kind} {'λ' if self.kind == 'nested' else 'scale'}={self.value:g}"

    @property
    def slug(self) -> str:
        return "prior" if self.kind == "prior" else f"{self.kind}-{self.parameter}-{self.value:g}"


def methods(
    *, prior: bool = True, lambdas: Sequence[float] = LAMBDAS, scales: Sequence[float] = DECOUPLED_SCALES
) -> list[Method]:
    """The methods of one evaluation, in report order."""
    return (
        ([Method("prior")] if prior else [])
        + [Method("nested", float(v)) for v in lambdas]
        + [Method("decoupled", float(v)) for v in scales]
    )


@dataclass(frozen=True)
class Subject:
    name: str  # unique, file-name safe
    source: str  # where the image came from, for the report
    image: torch.Tensor = field(repr=False, compare=False)  # (H, W, 3) in [0, 1]


@dataclass(frozen=True)
class Job:
    """One image to generate. The prior does not depend on the subject: subject None, scored against each."""

    method: Method
    subject: int | None
    prompt: int
    seed: int

    def relpath(self, subjects: Sequence[Subject]) -> str:
        who = "_no-subject" if self.subject is None else subjects[self.subject].name
        return f"images/{self.method.slug}/{who}/p{self.prompt:02d}-seed{self.seed}.png"


def make_jobs(methods: Sequence[Method], subjects: int, prompts: int, seeds: Sequence[int]) -> list[Job]:
    """Every image of the evaluation, in a fixed order (the same on every process)."""
    jobs = []
    for method in methods:
        for subject in [None] if method.kind == "prior" else range(subjects):
            for prompt in range(prompts):
                jobs.extend(Job(method, subject, prompt, int(seed)) for seed in seeds)
    return jobs


def shard(jobs: Sequence[Job], rank: int, world: int) -> list[Job]:
    """This process's share: every world-th job from its rank on (methods and subjects spread evenly)."""
    return list(jobs[rank::world])


# ------------------------------------------------------------------------------------------------
# The decoupled cross-attention baseline


class DecoupledAttentionPatch:
    """IP-Adapter's decoupled cross-attention as a ComfyUI attn2 replace patch.

    out = attn(q, K, V) + scale * attn(q, K_ip, V_ip), the image term added to the text attention's
    output, where K_ip, V_ip are this layer's projections of the subject tokens by the nested
    encoder's own W_K~ / W_V~ (`SubjectBinding.layer_kv`). Conditional rows get the subject;
    unconditional rows get `uncond` (IP-Adapter's tokens of a black image) or nothing when None.
    The image term is always computed and scaled, so scale 0 takes this code path and must give the
    unpatched image exactly.
    """

    def __init__(
        self,
        *,
        index: int,
        binding: SubjectBinding,
        scale: float,
        host: Any,
        uncond: SubjectBinding | None = None,
    ):
        self.index = index  # the layer's position in the encoder's layer table
        self.binding, self.uncond = binding, uncond
        self.scale = float(scale)
        self.host = host  # ComfyUI's attention, called as CrossAttention calls it

    def _term(
        self, binding: SubjectBinding, q: torch.Tensor, heads: int, extra_options: dict
    ) -> torch.Tensor:
        k_ip, v_ip = binding.layer_kv(self.index, q.device, q.dtype)  # (M, dim) each
        b = q.shape[0]
        return self.host(
            q, k_ip.expand(b, -1, -1), v_ip.expand(b, -1, -1), heads, extra_options
        )  # (B, N, dim)

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict
    ) -> torch.Tensor:
        heads = extra_options["n_heads"]
        out = self.host(q, k, v, heads, extra_options)
        cond = conditional_rows(q.shape[0], extra_options.get("cond_or_uncond")).to(q.device)[:, None, None]
        term = self._term(self.binding, q, heads, extra_options)
        other = (
            torch.zeros_like(term)
            if self.uncond is None
            else self._term(self.uncond, q, heads, extra_options)
        )
        return out + self.scale * torch.where(cond, term, other)

    def __deepcopy__(self, memo: dict) -> DecoupledAttentionPatch:
        return self  # immutable; ModelPatcher.clone() deep-copies model_options


def decoupled_model(
    unet: Any,
    encoder: NestedEncoder,
    binding: SubjectBinding,
    scale: float,
    host: Any,
    uncond: SubjectBinding | None = None,
) -> Any:
    """A clone of the UNet's ModelPatcher with the decoupled patch on every layer the encoder projects for."""
    model = unet.clone()
    for index, layer in enumerate(encoder.layers):
        patch = DecoupledAttentionPatch(index=index, binding=binding, scale=scale, host=host, uncond=uncond)
        model.set_model_attn2_replace(patch, *layer.key)
    return model


# ------------------------------------------------------------------------------------------------
# Sampling


@dataclass
class SampleSettings:
    steps: int = 30
    cfg: float = 5.0
    resolution: int = 1024
    sampler: str = "euler"
    scheduler: str = "normal"
    negative_prompt: str = ""


@torch.no_grad()
def sample_image(
    frozen: Any, model: Any, positive: list, negative: list, seed: int, settings: SampleSettings
) -> torch.Tensor:
    """One image with ComfyUI's sampler from an empty latent, as KSampler makes it; (H, W, 3) in [0, 1]."""
    return sample(
        model,
        frozen.vae,
        positive,
        negative,
        seed,
        steps=settings.steps,
        cfg=settings.cfg,
        resolution=settings.resolution,
        sampler=settings.sampler,
        scheduler=settings.scheduler,
    )


def save_png(image: torch.Tensor, path: Path) -> None:
    """Write atomically, so an interrupted run never leaves a half-written image that resume would trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    to_pil(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def load_png(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return from_pil(image)


class Generator:
    """Makes the image of a job with the frozen models and the encoder; caches conditioning and tokens."""

    def __init__(
        self,
        *,
        frozen: Any,
        encoder: NestedEncoder,
        text: Any,
        subjects: Sequence[Subject],
        prompts: Sequence[EvalPrompt],
        token: str,
        settings: SampleSettings,
        host: Any,
        decoupled_uncond: bool = True,
    ):
        self.frozen, self.encoder, self.text = frozen, encoder.eval(), text
        self.subjects, self.prompts, self.token = list(subjects), list(prompts), token
        self.settings, self.host = settings, host
        self.decoupled_uncond = decoupled_uncond
        self._cond: dict[str, list] = {}
        self._tokens: dict[int, torch.Tensor] = {}
        self._uncond: torch.Tensor | None = None

    def conditioning(self, text: str) -> list:
        if text not in self._cond:
            clip = self.frozen.clip
            self._cond[text] = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        return self._cond[text]

    def image_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """E (1, M, C) of one image (H, W, 3), as the nodes encode it (nested_attention_comfy.clip_vision.photo_tokens)."""
        from nested_attention_comfy.clip_vision import (
            photo_tokens,  # imports ComfyUI: set up by training.models
        )

        return photo_tokens(self.frozen.clip_vision, self.frozen.clip_vision_spec, self.encoder, image[None])

    def tokens(self, subject: int) -> torch.Tensor:
        if subject not in self._tokens:
            self._tokens[subject] = self.image_tokens(self.subjects[subject].image)
        return self._tokens[subject]

    def uncond_tokens(self) -> torch.Tensor:
        """IP-Adapter's unconditional image tokens: the encoder's tokens of a black image."""
        if self._uncond is None:
            black = torch.zeros(self.frozen.clip_vision.image_size, self.frozen.clip_vision.image_size, 3)
            self._uncond = self.image_tokens(black)
        return self._uncond

    def model(self, job: Job) -> Any:
        """The ModelPatcher that makes `job`'s image."""
        method = job.method
        if method.kind == "prior":
            return self.frozen.unet
        prompt = self.prompts[job.prompt].render(self.token)
        positions, prompt_tokens = prompt_positions(self.text, prompt)
        if not positions:
            raise ValueError(
                f"the prompt {prompt!r} does not contain the subject word {self.token!r} as a whole word; "
                "every evaluation prompt needs it once (use {token} in the prompt file)."
            )
        tokens = self.tokens(job.subject)
        if method.kind == "nested":
            return patched_model(
                self.frozen, self.encoder, tokens, positions, prompt_tokens, lam=method.value
            )
        if method.kind == "decoupled":
            binding = SubjectBinding(
                encoder=self.encoder,
                tokens=tokens,
                positions=positions,
                prompt_tokens=prompt_tokens,
                name="decoupled",
            )
            uncond = None
            if self.decoupled_uncond:
                uncond = SubjectBinding(
                    encoder=self.encoder,
                    tokens=self.uncond_tokens(),
                    positions=positions,
                    prompt_tokens=prompt_tokens,
                    name="decoupled-uncond",
                )
            return decoupled_model(self.frozen.unet, self.encoder, binding, method.value, self.host, uncond)
        raise ValueError(f"unknown method {method.kind!r}; expected prior, nested or decoupled")

    def generate(self, job: Job) -> torch.Tensor:
        prompt = self.prompts[job.prompt].render(self.token)
        return sample_image(
            self.frozen,
            self.model(job),
            self.conditioning(prompt),
            self.conditioning(self.settings.negative_prompt),
            job.seed,
            self.settings,
        )
