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
    binding.context_positions(77, CPU)
    binding.context_positions(154, torch.device("meta"))
    assert patch.to(CPU) is patch
    assert list(binding._kv) == [(0, CPU, torch.float32)]
    assert list(binding._positions) == [(77, CPU)]


def test_positions_are_made_once_per_device_and_follow_comfys_context_repetition():
    _, binding = tiny_patch()
    first = binding.context_positions(154, CPU)
    assert first.tolist() == [1, 78]
    assert binding.context_positions(154, CPU) is first
    assert binding.context_positions(77, CPU).tolist() == [1]


def test_sigma_is_read_once_per_sigmas_tensor_and_again_when_it_changes():
    _, binding = tiny_patch()
    binding.sigma_start, binding.sigma_end = 10.0, 1.0
    sigmas = torch.tensor([5.0, 5.0])
    assert binding.active(sigmas)
    sigmas.fill_(0.5)  # changed in place: its version moves on, so it is read again
    assert not binding.active(sigmas)
    assert binding.active(torch.tensor([10.0]))  # a new tensor
    assert not binding.active(torch.tensor([10.5]))
    with torch.inference_mode():  # ComfyUI samples in inference mode: no version counter there
        later = torch.tensor([2.0])
        assert binding.active(later) and binding.current_sigma(later) == 2.0
        assert not binding.active(torch.tensor([0.9]))
    binding.sigma_start, binding.sigma_end = float("inf"), 0.0
    assert binding.active(torch.tensor([1e12]))
