"""Nested attention for SDXL: the math, the subject encoder, the layer table and the weight file.

Importable without ComfyUI; depends only on torch, einops and safetensors. The ComfyUI glue shared by
the nodes and the trainer is the package `nested_attention_comfy` beside this one, which imports `comfy`;
no module of this package imports it (tests/test_layers.py).
"""

from .attention import NestedSubject, nested_attention, nested_values, regularize_norm, sdpa_attention
from .encoder import (
    HIDDEN_LAYERS,
    ClipVisionSpec,
    EncoderConfig,
    NestedEncoder,
    QFormer,
    QFormerConfig,
    concat_subject_tokens,
)
from .formats import (
    FORMAT_VERSION,
    NestedWeightsError,
    Plan,
    diffusers_order,
    ip_adapter_numbers,
    plan_encoder,
    read_header,
)
from .layers import SDXL_CONTEXT_DIM, SDXL_LAYERS, LayerSpec, attn2_modules, unet_context_dim, unet_layers
from .weights import load_encoder, read_config, save_encoder

__all__ = [
    "FORMAT_VERSION",
    "HIDDEN_LAYERS",
    "SDXL_CONTEXT_DIM",
    "SDXL_LAYERS",
    "ClipVisionSpec",
    "EncoderConfig",
    "LayerSpec",
    "NestedEncoder",
    "NestedSubject",
    "NestedWeightsError",
    "Plan",
    "QFormer",
    "QFormerConfig",
    "attn2_modules",
    "concat_subject_tokens",
    "diffusers_order",
    "ip_adapter_numbers",
    "load_encoder",
    "nested_attention",
    "nested_values",
    "plan_encoder",
    "read_config",
    "read_header",
    "regularize_norm",
    "save_encoder",
    "sdpa_attention",
    "unet_context_dim",
    "unet_layers",
]
