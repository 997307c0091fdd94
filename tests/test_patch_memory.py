"""The attn2 patch under ComfyUI's memory management protocol (core only, no ComfyUI import)."""

from __future__ import annotations

import torch

from nested_attention import EncoderConfig, LayerSpec, NestedEncoder, QFormerConfig
from nested_attention.patch import NestedAttentionPatch, SubjectBinding

CPU = torch.device("cpu")


def tiny_patch() -> tuple[NestedAttentionPatch, SubjectBinding]:
    layer = LayerSpec("input", 4, 0, 32)
    qformer = QFormerConfig(clip_dim=8, dim=8, depth=1, heads=1, dim_head=8, num_queries=2, output_dim=16)
    encoder = NestedEncoder(EncoderConfig(layers=(layer,), qformer=qformer))
    binding = SubjectBinding(encoder=encoder, tokens=torch.randn(1, 2, 16), positions=(1,), prompt_tokens=77)
    return NestedAttentionPatch(layer, 0, [binding]), binding


def test_to_a_dtype_keeps_the_caches_comfy_model_load_passes_the_model_dtype():
    # ComfyUI's LoadedModel.model_load calls model_patches_to(device) and then model_patches_to(model_dtype()).
    patch, binding = tiny_patch()
    binding.layer_kv(0, CPU, torch.float32)
    assert patch.to(torch.float16) is patch
    assert list(binding._kv) == [(0, CPU, torch.float32)]


def test_to_a_device_drops_the_caches_of_other_devices():
    patch, binding = tiny_patch()
    binding.layer_kv(0, CPU, torch.float32)
    binding._kv[(0, torch.device("meta"), torch.float32)] = (None, None)  # as if cached on an accelerator
    assert patch.to(CPU) is patch
    assert list(binding._kv) == [(0, CPU, torch.float32)]
