"""Nested attention for SDXL: the math, the subject encoder, the layer table and the weight file.

Importable without ComfyUI; depends only on torch, einops and safetensors. The ComfyUI glue shared by
the nodes and the trainer is the package `nested_attention_comfy` beside this one, which imports `comfy`;
no module of this package imports it (tests/test_layers.py).
"""

from .attention import NestedSubject, nested_attention, nested_values, regularize_norm, sdpa_attention
from .encoder import (
    HIDDEN_LAYERS, ClipVisionSpec, EncoderConfig, NestedEncoder, QFormer, QFormerConfig, concat_subject_tokens,
)
from .layers import SDXL_CONTEXT_DIM, SDXL_LAYERS, LayerSpec, attn2_modules, unet_context_dim, unet_layers
from .weights import load_encoder, read_config, save_encoder
from .formats import FORMAT_VERSION, NestedWeightsError, Plan, diffusers_order, ip_adapter_numbers, plan_encoder, read_header

__all__ = [
    "NestedSubject", "nested_attention", "nested_values", "regularize_norm", "sdpa_attention",
    "HIDDEN_LAYERS", "ClipVisionSpec", "EncoderConfig", "NestedEncoder", "QFormer", "QFormerConfig",
    "concat_subject_tokens",
    "SDXL_CONTEXT_DIM", "SDXL_LAYERS", "LayerSpec", "attn2_modules", "unet_context_dim", "unet_layers",
    "FORMAT_VERSION", "NestedWeightsError", "load_encoder", "read_config", "save_encoder",
    "Plan", "diffusers_order", "ip_adapter_numbers", "plan_encoder", "read_header",
]
