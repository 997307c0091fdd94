"""The subject encoder (Q-Former + per-layer projections) and its weight file."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nested_attention import (
    SDXL_LAYERS,
    ClipVisionSpec,
    EncoderConfig,
    NestedEncoder,
    NestedSubject,
    NestedWeightsError,
    QFormerConfig,
    concat_subject_tokens,
    load_encoder,
    nested_attention,
    read_config,
    save_encoder,
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
    k, v = enc.projections[1](tokens)
    assert k.shape == v.shape == (3, 4, 16)
    assert concat_subject_tokens(tokens).shape == (1, 12, 24)


def test_gradients_reach_qformer_and_projections_and_nothing_frozen():
    torch.manual_seed(0)
    enc = NestedEncoder(tiny_config())
    frozen_q = torch.nn.Linear(8, 8).requires_grad_(False)  # stands for the frozen UNet's to_q
    text_v = torch.randn(1, 6, 8)
    tokens = enc.encode(torch.randn(1, 5, 16))
    k, v = enc.projections[0](tokens)
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
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open is not a mapping)
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


@pytest.mark.parametrize("content, says", [
    (b"\x80\x02}q\x00.a pickle", r"is a Python pickle \(an old-style PyTorch .bin/.pt checkpoint\).*never pickle"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(64), r"is a JPEG image, not a .safetensors file: images go into Load Image"),
    (b"\x89PNG\r\n\x1a\n" + bytes(64), r"is a PNG image"),
    (b"PK\x03\x04" + bytes(64), r"is a zip archive \(what torch.save writes"),
    (b"<!DOCTYPE html><html><body>403 Forbidden</body></html>", r"is a web page \(HTML\).*log-in page"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n", r"is a Git LFS pointer.*without git-lfs"),
    (b"model weights go here\n", r"is a text file, not a .safetensors file"),
    (b"", r"is empty \(0 bytes\): an interrupted download or copy"),
    (b"\x07\x00\x00\x00\x00\x00\x00\x00{\"a\":", r"is truncated: its header alone needs 15 bytes and the file has 13"),
])
def test_a_file_that_is_not_safetensors_is_named_for_what_it_is(tmp_path, content, says):
    path = tmp_path / "encoder.safetensors"
    path.write_bytes(content)
    with pytest.raises(NestedWeightsError, match=r"^encoder.safetensors " + says):
        load_encoder(str(path))


def test_a_truncated_file_says_so_and_a_damaged_one_is_not_called_truncated(saved, tmp_path):
    data = Path(saved).read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-100])
    with pytest.raises(NestedWeightsError, match=rf"is truncated: its tensors need {len(data)} bytes and the file has "
                       rf"{len(data) - 100} \(an interrupted download\). Download it again"):
        load_encoder(str(cut))
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(NestedWeightsError, match=r"is not a .safetensors file \(its first 8 bytes give a header length"):
        load_encoder(str(noise))


def test_a_tensor_named_twice_in_the_header_is_refused(saved, tmp_path):
    data = Path(saved).read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    entry = json.dumps(header["qformer.latents"])
    text = json.dumps(header)[:-1] + f', "qformer.latents": {entry}}}'  # safetensors itself keeps one of them
    text += " " * (-len(text) % 8)
    twice = tmp_path / "twice.safetensors"
    twice.write_bytes(len(text).to_bytes(8, "little") + text.encode() + data[8 + length :])
    with pytest.raises(NestedWeightsError, match=r"damaged header \('qformer.latents' appears 2 times"):
        load_encoder(str(twice))


def test_nan_or_inf_weights_are_refused_by_name(saved, tmp_path):
    for value in (float("nan"), float("inf")):
        with safe_open(saved, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
            meta = f.metadata()
        tensors["projections.1.to_v.weight"][3, 5] = value
        bad = str(tmp_path / "nan.safetensors")
        save_file(tensors, bad, metadata=meta)
        with pytest.raises(NestedWeightsError, match=r"'projections.1.to_v.weight' holds 1 NaN or infinite value.*black"):
            load_encoder(bad)


def test_count_non_finite_counts_what_numpys_isfinite_rejects_in_every_float_dtype():
    """The loaders' NaN/inf check (a min/max pass, then a count) against numpy's isfinite on the same values."""
    import numpy as np

    from nested_attention.formats import count_non_finite

    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert count_non_finite(torch.empty(0, 3, dtype=dtype)) == 0
        huge = torch.full((4097,), torch.finfo(dtype).max, dtype=dtype)  # finite, though their sum is not
        huge[::2] = torch.finfo(dtype).min
        assert count_non_finite(huge) == 0
        for n in (1, 2, 17, 64, 4097, 100_003):
            values = torch.randn(n, generator=generator).to(dtype)
            assert count_non_finite(values) == 0
            for bad in ((0,), (n - 1,), (n // 2,), tuple(range(0, n, 7))):
                for fill in (float("nan"), float("inf"), float("-inf"), None):  # None: a mix of the three
                    damaged = values.clone()
                    for k, at in enumerate(bad):
                        damaged[at] = fill if fill is not None else (float("nan"), float("inf"), float("-inf"))[k % 3]
                    expected = int((~np.isfinite(damaged.double().numpy())).sum())
                    assert count_non_finite(damaged.reshape(1, n)) == expected == len(set(bad)), (dtype, n, bad, fill)


def test_mixed_dtypes_load_as_one_and_integer_weights_are_refused_by_name(saved, tmp_path):
    with safe_open(saved, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        meta = f.metadata()
    mixed = dict(tensors, **{"qformer.latents": tensors["qformer.latents"].half()})
    save_file(mixed, str(tmp_path / "mixed.safetensors"), metadata=meta)
    loaded = load_encoder(str(tmp_path / "mixed.safetensors"))
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    ints = dict(tensors, **{"qformer.proj_in.bias": tensors["qformer.proj_in.bias"].long()})
    save_file(ints, str(tmp_path / "ints.safetensors"), metadata=meta)
    with pytest.raises(NestedWeightsError, match=r"tensor 'qformer.proj_in.bias' is I64; encoder weights are F16/BF16"):
        load_encoder(str(tmp_path / "ints.safetensors"))


@pytest.mark.parametrize("field, value, says", [
    (("qformer", "depth"), 10**9, r"the config has 1000000000 Q-Former blocks and 2 layers, the file's tensors 2 blocks"),
    (("alpha",), "x", r"malformed 'config'.*alpha is 'x', expected a positive number"),
    (("qformer", "heads"), 2.5, r"qformer.heads is 2.5, expected a whole number >= 1"),
    (("layers",), [["input", 4, 0, 16], ["sideways", 1, 0, 24]], r"layer \['sideways', 1, 0, 24\]: expected a block"),
    (("face_align",), "tilted", r"face_align is 'tilted', expected 'none' or 'ffhq'"),
])
def test_a_config_value_of_the_wrong_type_or_size_is_refused_before_any_module_is_built(saved, tmp_path, field,
                                                                                        value, says):
    with safe_open(saved, framework="pt") as f:
        config = json.loads(f.metadata()["config"])
    node = config
    for key in field[:-1]:
        node = node[key]
    node[field[-1]] = value
    bad = _rewrite(saved, str(tmp_path / "cfg.safetensors"), metadata={"config": json.dumps(config)})
    with pytest.raises(NestedWeightsError, match=says):
        load_encoder(bad)


def test_malformed_config_is_refused(saved, tmp_path):
    bad = _rewrite(saved, str(tmp_path / "cfg.safetensors"), metadata={"config": json.dumps({"domain": "pets"})})
    with pytest.raises(NestedWeightsError, match="malformed 'config'"):
        load_encoder(bad)


def test_save_is_atomic_and_leaves_no_temp_file(saved):
    assert os.listdir(os.path.dirname(saved)) == ["enc.safetensors"]


def test_a_pack_file_whose_metadata_was_dropped_names_it_and_convert_restores_it_bitwise(saved, tmp_path, capsys):
    from nested_attention import convert as convert_cli
    from nested_attention import describe as describe_cli

    with safe_open(saved, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    stripped = tmp_path / "merged.safetensors"
    save_file(tensors, str(stripped))  # what merge and convert tools write: the tensors, no metadata
    with pytest.raises(NestedWeightsError) as error:
        load_encoder(str(stripped))
    message = str(error.value)
    assert message.startswith("merged.safetensors holds this pack's own encoder tensors (qformer.*, projections.*) "
                              "but its metadata lacks 'config', 'format', 'format_version'")
    assert "M=4 subject tokens, a Q-Former 32 wide and 2 blocks deep, reading CLIP tokens 16 wide, 2 cross-" in message
    assert "cannot give the head count (to_q has 16 rows: heads x head width)" in message
    assert message.endswith("python -m nested_attention.convert merged.safetensors FIXED.safetensors --config-from "
                            "ORIGINAL.safetensors")
    assert describe_cli.main([str(stripped)]) == 1
    assert "format: not supported" in capsys.readouterr().out

    fixed = tmp_path / "fixed.safetensors"
    assert convert_cli.main([str(stripped), str(fixed), "--config-from", saved]) == 0
    original, restored = load_encoder(saved), load_encoder(str(fixed))
    assert restored.config == original.config
    clip_tokens = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
    tokens = original.encode(clip_tokens)
    assert torch.equal(restored.encode(clip_tokens), tokens)  # the same tokens, bitwise
    for layer in range(len(original.layers)):
        for a, b in zip(original.projections[layer](tokens), restored.projections[layer](tokens)):
            assert torch.equal(a, b)

    other = tmp_path / "other.safetensors"  # a config whose shapes differ: refused, naming the first difference
    save_encoder(str(other), NestedEncoder(tiny_config(m=8)))
    assert convert_cli.main([str(stripped), str(tmp_path / "x.safetensors"), "--config-from", str(other)]) == 1
    assert ("tensor 'qformer.latents' has shape (4, 32), expected (8, 32) from its config (taken from another file)"
            in capsys.readouterr().err)
    assert convert_cli.main([saved, str(tmp_path / "y.safetensors"), "--config-from", str(other)]) == 1
    assert "has its own config; --config-from is for a file of this pack whose metadata was dropped" in (
        capsys.readouterr().err)
