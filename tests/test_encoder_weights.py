"""The subject encoder (Q-Former + per-layer projections) and its weight file."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nested_attention import (
    SDXL_LAYERS, ClipVisionSpec, EncoderConfig, NestedEncoder, NestedSubject, NestedWeightsError, QFormerConfig,
    concat_subject_tokens, load_encoder, nested_attention, read_config, save_encoder,
)
from nested_attention.layers import LayerSpec


def tiny_config(m=4, layers=None):
    return EncoderConfig(
        domain="pets", token="pet", alpha=2.0,
        qformer=QFormerConfig(clip_dim=16, dim=32, depth=2, heads=2, dim_head=8, num_queries=m, output_dim=24),
        clip_vision=ClipVisionSpec(name="tiny-clip.safetensors", hidden_size=16, num_tokens=5, num_layers=2, image_size=32),
        layers=layers or (LayerSpec("input", 4, 0, 8), LayerSpec("middle", 0, 0, 16)),
    )


def test_sdxl_layer_table_has_70_layers_with_sdxl_widths():
    assert len(SDXL_LAYERS) == 70
    assert len({layer.key for layer in SDXL_LAYERS}) == 70
    assert sum(layer.dim == 640 for layer in SDXL_LAYERS) == 10
    assert sum(layer.dim == 1280 for layer in SDXL_LAYERS) == 60
    assert ("input", 4, 0) in {layer.key for layer in SDXL_LAYERS}
    assert ("output", 5, 1) in {layer.key for layer in SDXL_LAYERS}


def test_qformer_maps_clip_tokens_to_m_subject_tokens():
    torch.manual_seed(0)
    enc = NestedEncoder(tiny_config(m=4))
    tokens = enc.encode(torch.randn(3, 5, 16))
    assert tokens.shape == (3, 4, 24)
    k, v = enc.project(tokens, 1)
    assert k.shape == v.shape == (3, 4, 16)
    assert concat_subject_tokens(tokens).shape == (1, 12, 24)


def test_gradients_reach_qformer_and_projections_and_nothing_frozen():
    torch.manual_seed(0)
    enc = NestedEncoder(tiny_config())
    frozen_q = torch.nn.Linear(8, 8).requires_grad_(False)  # stands for the frozen UNet's to_q
    text_v = torch.randn(1, 6, 8)
    tokens = enc.encode(torch.randn(1, 5, 16))
    k, v = enc.project(tokens, 0)
    q = frozen_q(torch.randn(1, 10, 8))
    out = nested_attention(q, torch.randn(1, 6, 8), text_v, [NestedSubject(k[0], v[0], torch.tensor([2]))], heads=2)
    out.square().sum().backward()
    for name, p in enc.named_parameters():
        if name.startswith("projections.1."):  # layer 1 was not used in this forward
            assert p.grad is None
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in frozen_q.parameters())


def test_weight_file_round_trips(tmp_path):
    torch.manual_seed(0)
    enc = NestedEncoder(tiny_config())
    path = str(tmp_path / "enc.safetensors")
    save_encoder(path, enc)
    loaded = load_encoder(path)
    assert loaded.config == enc.config
    for (name, a), (_, b) in zip(enc.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randn(1, 5, 16)
    torch.testing.assert_close(loaded.encode(x), enc.encode(x), atol=0, rtol=0)
    assert read_config(path).layers == enc.config.layers


def test_full_size_config_round_trips_through_json():
    config = EncoderConfig(qformer=QFormerConfig(num_queries=1024), domain="faces", token="person")
    assert EncoderConfig.from_json(config.to_json()) == config
    assert config.layers == SDXL_LAYERS


def _rewrite(path, out, *, metadata=None, drop=None, reshape=None):
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(metadata or {})
    if drop:
        tensors.pop(drop)
    if reshape:
        tensors[reshape] = torch.zeros(3, 3)
    save_file(tensors, out, metadata=meta)
    return out


@pytest.fixture
def saved(tmp_path):
    path = str(tmp_path / "enc.safetensors")
    save_encoder(path, NestedEncoder(tiny_config()))
    return path


def test_wrong_version_says_expected_and_found(saved, tmp_path):
    bad = _rewrite(saved, str(tmp_path / "v9.safetensors"), metadata={"format_version": "9"})
    with pytest.raises(NestedWeightsError, match=r"format version '9'.*reads version 1"):
        load_encoder(bad)


def test_other_safetensors_file_is_refused(tmp_path):
    path = str(tmp_path / "lora.safetensors")
    save_file({"w": torch.zeros(2)}, path, metadata={"format": "pt"})
    with pytest.raises(NestedWeightsError, match=r"expected metadata format 'nested-attention', found 'pt'"):
        load_encoder(path)


def test_missing_tensor_is_named(saved, tmp_path):
    bad = _rewrite(saved, str(tmp_path / "missing.safetensors"), drop="projections.0.to_k.weight")
    with pytest.raises(NestedWeightsError, match=r"missing tensors \['projections.0.to_k.weight'\]"):
        load_encoder(bad)


def test_wrong_shape_names_tensor_expected_and_found(saved, tmp_path):
    bad = _rewrite(saved, str(tmp_path / "shape.safetensors"), reshape="projections.1.to_v.weight")
    with pytest.raises(NestedWeightsError, match=r"'projections.1.to_v.weight' has shape \(3, 3\), expected \(16, 24\)"):
        load_encoder(bad)


def test_not_safetensors_is_refused(tmp_path):
    path = tmp_path / "encoder.ckpt"
    path.write_bytes(b"\x80\x02}q\x00.not a safetensors file")
    with pytest.raises(NestedWeightsError, match="not a readable .safetensors file"):
        load_encoder(str(path))


def test_malformed_config_is_refused(saved, tmp_path):
    bad = _rewrite(saved, str(tmp_path / "cfg.safetensors"), metadata={"config": json.dumps({"domain": "pets"})})
    with pytest.raises(NestedWeightsError, match="malformed 'config'"):
        load_encoder(bad)


def test_save_is_atomic_and_leaves_no_temp_file(saved):
    assert not os.path.exists(saved + ".tmp")
