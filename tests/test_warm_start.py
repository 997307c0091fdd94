"""Trainer warm start (`--init_from`): an IP-Adapter-style file becomes the run's encoder, M and CLIP layer included."""

from __future__ import annotations

import json
from types import SimpleNamespace

import comfy.clip_vision
import pytest
import torch
from test_formats import TINY, build_tiny
from trainer_runs import TINY_FLAGS, train

from nested_attention import load_encoder, read_config, unet_layers
from nested_attention.weights import weights_fingerprint
from nested_attention_comfy.clip_vision import clip_vision_spec
from training.loop import config as train_config
from training.loop.warm_start import WarmStartError, warm_start_encoder


@pytest.fixture(scope="module")
def layers(_tiny_unet_shared):
    return unet_layers(_tiny_unet_shared.model.diffusion_model)


@pytest.fixture
def frozen(layers, tiny_clip_vision):
    """What warm_start_encoder reads of training.models.sdxl.FrozenModels: the layer table and the CLIP spec."""
    return SimpleNamespace(layers=layers, clip_vision_spec=clip_vision_spec(tiny_clip_vision, "tiny.safetensors"))


def test_warm_start_takes_m_shape_and_clip_layer_from_the_file(tmp_path, layers, frozen):
    path = tmp_path / "ip.safetensors"
    build_tiny(path, "ip-adapter", layers)
    assert frozen.clip_vision_spec.hidden_layer == "last"
    encoder = warm_start_encoder(str(path), frozen, domain="faces", token="person", alpha=1.5)
    c = encoder.config
    assert (c.num_tokens, c.qformer.dim, c.qformer.depth, c.qformer.ff_bias) == (TINY["num_queries"], 128, 2, False)
    assert (c.domain, c.token, c.alpha, c.licence) == ("faces", "person", 1.5, "Apache-2.0")
    assert c.source.startswith("warm start from ip.safetensors (ip-adapter-plus-sdxl")
    assert c.clip_vision.hidden_layer == "penultimate" and c.clip_vision.name == "tiny.safetensors"
    assert frozen.clip_vision_spec.output_key == "penultimate_hidden_states"  # the run now reads that layer
    assert encoder.training and all(p.requires_grad and p.dtype == torch.float32 for p in encoder.parameters())
    reference = load_encoder(str(path), layers=layers, clip_vision=frozen.clip_vision_spec)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(encoder.state_dict()[name], tensor.float()), name


def test_warm_start_refuses_a_file_for_another_clip_or_unet(tmp_path, layers, frozen):
    other_clip = tmp_path / "clip32.safetensors"
    build_tiny(other_clip, "ip-adapter", layers, clip_dim=32)
    with pytest.raises(WarmStartError, match=r"Q-Former input width 32.*width 64.*--clip_vision"):
        warm_start_encoder(str(other_clip), frozen, domain="faces", token="person", alpha=2.0)
    fewer = SimpleNamespace(layers=layers[:-1], clip_vision_spec=frozen.clip_vision_spec)
    good = tmp_path / "ip.safetensors"
    build_tiny(good, "ip-adapter", layers)
    with pytest.raises(WarmStartError, match=r"--init_from ip.safetensors: .*expected n = 1, 3, \.\.\., 31 \(16 layers\)"):
        warm_start_encoder(str(good), fewer, domain="faces", token="person", alpha=2.0)


def test_init_from_trains_from_the_file_reads_its_clip_layer_and_exports_the_packs_format(tmp_path, layers,
                                                                                          monkeypatch):
    from training.tiny.models import make_tiny_dataset

    source = tmp_path / "ip-adapter-plus-tiny.safetensors"
    build_tiny(source, "ip-adapter", layers)
    data = make_tiny_dataset(tmp_path / "data", count=4, size=64)
    read = []  # every CLIP vision output the run reads
    original = comfy.clip_vision.Output.__getitem__
    monkeypatch.setattr(comfy.clip_vision.Output, "__getitem__", lambda self, key: read.append(key) or original(self, key))
    out = tmp_path / "run"
    summary = train(out, "--train_data", str(data), "--max_train_steps", "1", "--checkpointing_steps", "1",
                    "--init_from", str(source))
    assert read and set(read) == {"penultimate_hidden_states"}

    state = json.loads((out / "checkpoint-1" / "trainer_state-0.json").read_text())
    start = load_encoder(str(source), dtype=torch.float32, layers=layers,
                         clip_vision=read_config(summary["encoder_path"]).clip_vision)
    assert state["initial_weights_sha256"] == weights_fingerprint(start)
    assert state["weights_sha256"] != state["initial_weights_sha256"]
    config = read_config(summary["encoder_path"])
    assert (config.num_tokens, config.qformer.ff_bias, config.clip_vision.hidden_layer) == (4, False, "penultimate")
    assert (config.domain, config.licence) == ("tiny", "Apache-2.0")
    exported = load_encoder(summary["encoder_path"])
    assert exported.config == config and len(exported.projections) == len(layers)


def test_init_from_and_init_encoder_are_exclusive(tmp_path, capsys):
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(SystemExit):
        train_config.parse_args([*TINY_FLAGS, "--init_from", str(path), "--init_encoder", str(path)])
    assert "give one" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_config.parse_args([*TINY_FLAGS, "--init_from", str(tmp_path / "missing.safetensors")])
    assert "no such file" in capsys.readouterr().err
