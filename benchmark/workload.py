"""What the benchmark runs: ComfyUI set up with SDPA attention, one CFG step as its sampler makes it.

The constants fix the workload every variant sees: a one-chunk prompt with the subject word at
position 5, cond + uncond in one batch of 2, a fixed noise level.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from nested_attention import SDXL_CONTEXT_DIM
from nested_attention.logs import LOG_PREFIX as PREFIX

log = logging.getLogger(__name__)
PACK = "nested_attention_pack"  # the module name the pack gets here (as in tests/pack.py): never ComfyUI's `nodes`

NUM_TOKENS = (256, 1024)  # M of the nested variants (paper: 256 pets, 1024 faces)
IP_TOKENS = 16  # image tokens of the IP-Adapter-style variant (IP-Adapter Plus: 16)
SUBJECT_POSITION = 5  # where s* sits in the 77-token prompt ("<start> a photo of a pet ...")
CHUNK = 77  # tokens per CLIP chunk
SIGMA = 7.0  # noise level of the benchmarked step (any value: no variant depends on it)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def configure_comfy(device: str) -> None:
    """Set ComfyUI's arguments before `comfy.model_management` is imported: CPU or not, SDPA attention.

    ComfyUI picks its attention implementation once at import. PyTorch's SDPA is its default on
    NVIDIA GPUs; asking for it on the CPU too (instead of the sub-quadratic fallback) makes CPU and
    GPU runs time the same host attention, and lets the FLOP counter see every attention product.
    """
    from training.comfy_env import setup_comfy

    setup_comfy()
    import comfy.cli_args

    if "comfy.model_management" in sys.modules:
        log.warning(
            "%s comfy.model_management was imported before the benchmark configured it; ComfyUI's "
            "attention choice may not be PyTorch's SDPA",
            PREFIX,
        )
    comfy.cli_args.args.use_pytorch_cross_attention = True
    if device == "cpu":
        comfy.cli_args.args.cpu = True


def pack_module(name: str) -> Any:
    """A module of the node pack, e.g. "nodes.subject", with the pack loaded as ComfyUI loads a custom node:
    a package made from the repository's __init__.py (the name `nodes` alone is ComfyUI's own module)."""
    if PACK not in sys.modules:
        root = Path(__file__).resolve().parents[1]
        spec = importlib.util.spec_from_file_location(PACK, root / "__init__.py", submodule_search_locations=[str(root)])
        pack = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = pack
        try:
            spec.loader.exec_module(pack)
        except BaseException:
            del sys.modules[PACK]
            raise
    return importlib.import_module(f"{PACK}.{name}")


def host_attention() -> Callable:
    """The nodes' and trainer's host attention: ComfyUI's optimized_attention, called as CrossAttention calls it."""
    from nested_attention_comfy.attention import comfy_attention

    return comfy_attention


@contextlib.contextmanager
def comfy_sdpa_attention():
    """ComfyUI's attention swapped for its PyTorch SDPA path, for counting on the meta device.

    On meta, SDPA decomposes into the matmuls torch's FLOP counter knows; the other paths may not
    run on meta at all. Every CrossAttention looks the global up at call time.
    """
    from comfy.ldm.modules import attention

    saved = attention.optimized_attention
    attention.optimized_attention = attention.attention_pytorch
    try:
        yield
    finally:
        attention.optimized_attention = saved


def step_inputs(batch: int, resolution: int, device: torch.device, seed: int = 0) -> tuple:
    """(x, sigma, context, adm) of one CFG step: latent (B, 4, R/8, R/8), text context (B, 77, 2048), y (B, 2816)."""
    g = torch.Generator().manual_seed(seed)
    side = resolution // 8
    x = torch.randn(batch, 4, side, side, generator=g)
    sigma = torch.full((batch,), SIGMA)
    context = torch.randn(batch, CHUNK, SDXL_CONTEXT_DIM, generator=g)
    adm = torch.randn(batch, 2816, generator=g)
    return tuple(t.to(device) for t in (x, sigma, context, adm))


def transformer_options(model: Any, cond_or_uncond: Sequence[int], sigmas: torch.Tensor) -> dict:
    """What comfy.samplers.calc_cond_batch hands the UNet: the model's options plus the batch layout."""
    import comfy.patcher_extension

    options = comfy.patcher_extension.merge_nested_dicts(
        {}, model.model_options.get("transformer_options", {})
    )
    options["cond_or_uncond"] = list(cond_or_uncond)
    options["uuids"] = [None] * len(cond_or_uncond)
    options["sigmas"] = sigmas
    return options


def unet_step(model: Any, inputs: tuple, cond_or_uncond: Sequence[int] = (0, 1)) -> torch.Tensor:
    """One UNet evaluation of the batch through BaseModel.apply_model (the sampler's call); returns denoised."""
    x, sigma, context, adm = inputs
    with torch.inference_mode():
        return model.model.apply_model(
            x,
            sigma,
            c_crossattn=context,
            y=adm,
            transformer_options=transformer_options(model, cond_or_uncond, sigma),
        )


def _meta_evaluation(model: Any, resolution: int, cond_or_uncond: Sequence[int]) -> Callable[[], Any]:
    """A forward of the UNet on meta. apply_model's sigma -> timestep needs values, so the UNet is called directly."""
    dm = model.model.diffusion_model
    dtype = model.model.get_dtype()
    b, side = len(cond_or_uncond), resolution // 8
    x = torch.empty(b, 4, side, side, device="meta", dtype=dtype)
    t = torch.empty(b, device="meta")
    context = torch.empty(b, CHUNK, SDXL_CONTEXT_DIM, device="meta", dtype=dtype)
    y = torch.empty(b, 2816, device="meta", dtype=dtype)
    sigmas = torch.full((b,), SIGMA)

    def run():
        with torch.no_grad():
            return dm(
                x,
                t,
                context=context,
                y=y,
                transformer_options=transformer_options(model, cond_or_uncond, sigmas),
            )

    return run


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device: torch.device) -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out
