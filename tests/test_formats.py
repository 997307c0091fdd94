"""Loading other projects' weights exactly: IP-Adapter Plus SDXL and the IP-Adapter-derived layouts.

No real file can be downloaded here, so the tests build files with the real key names and shapes (random
values): the full-size ip-adapter-plus_sdxl_vit-h layout (checked key by key against an independent table),
and tiny files for the tiny test UNet whose encoders must compute what IP-Adapter computes, checked against an
independent implementation of IP-Adapter's Resampler and attention branch.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import folder_paths
import pytest
import torch
import torch.nn.functional as F
from pack_helpers import TINY_CLIP_VISION_SPEC, photos, run_node
from safetensors import safe_open
from weight_layouts import (
    TINY_DIFFUSERS_NAMES,
    TINY_IP_ADAPTER_NUMBERS,
    RandomPool,
    ip_adapter_plus_sdxl_keys,
    plain_ip_adapter_keys,
    resampler_keys,
    sdxl_ip_adapter_table,
    write_safetensors,
)

from nested_attention import (
    SDXL_LAYERS,
    ClipVisionSpec,
    NestedEncoder,
    NestedWeightsError,
    diffusers_order,
    formats,
    ip_adapter_numbers,
    load_encoder,
    nested_values,
    plan_encoder,
    read_config,
    read_header,
    save_encoder,
    unet_layers,
)
from nested_attention import convert as convert_cli

REPO = Path(__file__).resolve().parents[1]
TINY_SPEC = ClipVisionSpec(**TINY_CLIP_VISION_SPEC)
TOL = {"atol": 1e-10, "rtol": 1e-9}  # float64 throughout: only summation order differs from the reference


# ------------------------------------------------------------------------------------------------
# The layer order rule


def test_ip_adapter_numbering_rule_gives_the_sdxl_table_of_the_ip_adapter_sources():
    expected = {key: number for number, (key, _) in sdxl_ip_adapter_table().items()}
    assert len(expected) == 70
    assert ip_adapter_numbers(SDXL_LAYERS) == expected
    widths = {layer.key: layer.dim for layer in SDXL_LAYERS}
    assert all(widths[key] == width for key, width in sdxl_ip_adapter_table().values())


def test_the_rule_orders_the_tiny_unet_as_diffusers_does(tiny_unet):
    layers = unet_layers(tiny_unet.model.diffusion_model)
    assert ip_adapter_numbers(layers) == TINY_IP_ADAPTER_NUMBERS
    assert [layer.key for layer in diffusers_order(layers)][-2:] == [("middle", 0, 0), ("middle", 0, 1)]


# ------------------------------------------------------------------------------------------------
# Full size: ip-adapter-plus_sdxl_vit-h.safetensors


@pytest.fixture(scope="session")
def full_ip_adapter_file(tmp_path_factory):
    """The real names and full-size shapes of ip-adapter-plus_sdxl_vit-h (848 MB fp16), written once."""
    path = tmp_path_factory.mktemp("ipadapter") / "ip-adapter-plus_sdxl_vit-h.safetensors"
    keys = ip_adapter_plus_sdxl_keys()
    write_safetensors(path, [(k, s, torch.float16) for k, s in keys], RandomPool(seed=11))
    return path


def test_full_size_file_has_the_real_size(full_ip_adapter_file):
    header = read_header(str(full_ip_adapter_file))
    assert len(header.tensors) == 4 * 11 + 7 + 140
    params = sum(math.prod(t.shape) for t in header.tensors.values())
    assert 840e6 < 2 * params < 850e6  # 848 MB in fp16, as the real file


def test_full_size_ip_adapter_plus_loads_every_layer_from_its_key(full_ip_adapter_file):
    path = str(full_ip_adapter_file)
    plan = plan_encoder(read_header(path))
    assert plan.format == "ip-adapter-plus-sdxl"
    c = plan.config
    assert c.layers == SDXL_LAYERS
    q = c.qformer
    assert (q.clip_dim, q.dim, q.depth, q.heads, q.dim_head, q.num_queries, q.output_dim, q.ff_mult, q.ff_bias) == (
        1280, 1280, 4, 20, 64, 16, 2048, 4, False)
    assert c.clip_vision.hidden_layer == "penultimate" and c.clip_vision.output_key == "penultimate_hidden_states"
    assert c.clip_vision.name == "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors" and c.clip_vision.num_tokens == 257
    assert (c.token, c.alpha, c.licence) == ("person", 2.0, "Apache-2.0")

    encoder = load_encoder(path)
    table = sdxl_ip_adapter_table()
    number_of = {key: number for number, (key, _) in table.items()}
    with safe_open(path, framework="pt") as f:
        for i, layer in enumerate(encoder.layers):
            n = number_of[layer.key]
            sources = (plan.sources[f"projections.{i}.to_k.weight"], plan.sources[f"projections.{i}.to_v.weight"])
            assert sources == (f"ip_adapter.{n}.to_k_ip.weight", f"ip_adapter.{n}.to_v_ip.weight")
            assert torch.equal(encoder.projections[i].to_k.weight, f.get_tensor(f"ip_adapter.{n}.to_k_ip.weight")), layer
            assert torch.equal(encoder.projections[i].to_v.weight, f.get_tensor(f"ip_adapter.{n}.to_v_ip.weight")), layer
        # The Resampler, name by name (pack name -> IP-Adapter name, written out here).
        qf = encoder.qformer
        assert torch.equal(qf.latents, f.get_tensor("image_proj.latents")[0])
        for ours, theirs in [("proj_in", "proj_in"), ("proj_out", "proj_out"), ("norm_out", "norm_out")]:
            for kind in ("weight", "bias"):
                assert torch.equal(getattr(getattr(qf, ours), kind), f.get_tensor(f"image_proj.{theirs}.{kind}"))
        for n, (attn, ff) in enumerate(qf.blocks):
            p = f"image_proj.layers.{n}."
            pairs = [(attn.norm_media.weight, p + "0.norm1.weight"), (attn.norm_media.bias, p + "0.norm1.bias"),
                     (attn.norm_latents.weight, p + "0.norm2.weight"), (attn.norm_latents.bias, p + "0.norm2.bias"),
                     (attn.to_q.weight, p + "0.to_q.weight"), (attn.to_kv.weight, p + "0.to_kv.weight"),
                     (attn.to_out.weight, p + "0.to_out.weight"), (ff[0].weight, p + "1.0.weight"),
                     (ff[0].bias, p + "1.0.bias"), (ff[1].weight, p + "1.1.weight"), (ff[3].weight, p + "1.3.weight")]
            for tensor, key in pairs:
                assert torch.equal(tensor, f.get_tensor(key)), key
            assert ff[1].bias is None and ff[3].bias is None
    assert len(encoder.projections) == 70
    assert {p.to_k.weight.shape[0] for p in encoder.projections} == {640, 1280}


def test_convert_cli_writes_the_full_size_file_in_the_packs_format(full_ip_adapter_file, tmp_path, capsys):
    out = tmp_path / "converted.safetensors"
    assert convert_cli.main([str(full_ip_adapter_file), str(out)]) == 0
    assert "ip-adapter-plus-sdxl" in capsys.readouterr().out
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "nested-attention" and meta["format_version"] == "1"
    assert meta["source_format"] == "ip-adapter-plus-sdxl"
    assert meta["converted_from"] == "ip-adapter-plus_sdxl_vit-h.safetensors"
    config = json.loads(meta["config"])
    assert config["qformer"]["ff_bias"] is False and config["clip_vision"]["hidden_layer"] == "penultimate"
    converted = load_encoder(str(out))
    original = load_encoder(str(full_ip_adapter_file))
    assert converted.config == original.config
    for (name, a), (_, b) in zip(original.state_dict().items(), converted.state_dict().items()):
        assert a.dtype == torch.float16 and torch.equal(a, b), name
    assert convert_cli.main([str(full_ip_adapter_file), str(out)]) == 2  # no silent overwrite


def test_loader_node_refuses_a_clip_vision_of_another_architecture_before_loading_tensors(
    pack, full_ip_adapter_file, tmp_path, monkeypatch, tiny_clip_vision
):
    folder = tmp_path / "ipadapter"
    folder.mkdir()
    (folder / full_ip_adapter_file.name).symlink_to(full_ip_adapter_file)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "ipadapter", ([str(folder)], {".safetensors", ".bin"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    assert full_ip_adapter_file.name in pack.loader.encoder_files()
    with pytest.raises(pack.loader.NestedEncoderLoadError, match=r"CLIP-ViT-H-14.*width 1280.*width 64"):
        run_node(pack, "NestedAttentionLoadEncoder", encoder_name=full_ip_adapter_file.name, clip_vision=tiny_clip_vision)


# ------------------------------------------------------------------------------------------------
# Tiny files: exactly what IP-Adapter computes


TINY = {"dim": 128, "depth": 2, "inner": 128, "num_queries": 4, "clip_dim": 64, "output_dim": 2048, "ff_mult": 2}


def tiny_names(layout: str, layers) -> tuple[str, dict]:
    """Resampler prefix and, per layer key, its (k, v) tensor names in `layout`."""
    position = {layer.key: i for i, layer in enumerate(diffusers_order_by_hand(layers))}
    if layout == "ip-adapter":
        prefix, kv = "image_proj.", {key: (f"ip_adapter.{n}.to_k_ip.weight", f"ip_adapter.{n}.to_v_ip.weight")
                                     for key, n in TINY_IP_ADAPTER_NUMBERS.items()}
    elif layout == "numbered":  # another prefix and suffix, attn_processors numbering
        prefix, kv = "image_proj_model.", {key: (f"adapter_modules.{n}.to_k_nested.weight", f"adapter_modules.{n}.to_v_nested.weight")
                                           for key, n in TINY_IP_ADAPTER_NUMBERS.items()}
    elif layout == "consecutive":  # one entry per cross-attention layer, 0..L-1 in diffusers order
        prefix, kv = "resampler.", {key: (f"nested_layers.{i}.to_k_ip.weight", f"nested_layers.{i}.to_v_ip.weight")
                                    for key, i in position.items()}
    elif layout == "diffusers":  # diffusers module paths, processor attributes
        prefix, kv = "encoder.", {key: (f"unet.{name}.attn2.processor.to_k_ip.weight", f"unet.{name}.attn2.processor.to_v_ip.weight")
                                  for key, name in TINY_DIFFUSERS_NAMES.items()}
    else:
        raise ValueError(layout)
    return prefix, kv


def diffusers_order_by_hand(layers):
    return ([l for l in layers if l.block == "input"] + [l for l in layers if l.block == "output"]
            + [l for l in layers if l.block == "middle"])


def build_tiny(path, layout, layers, *, seed=0, drop=(), extra=(), truncate=0, order=None, **overrides):
    """A tiny file in `layout`; values depend only on the role of a tensor, so every layout holds the same."""
    shape = {**TINY, **overrides}
    prefix, kv = tiny_names(layout, layers)
    keys = resampler_keys(prefix, **shape)
    for layer in (order or layers):
        k, v = kv[layer.key]
        keys += [(k, (layer.dim, shape["output_dim"])), (v, (layer.dim, shape["output_dim"]))]
    keys += list(extra)
    keys = [(k, s) for k, s in keys if k not in drop]
    roles = {name: name.removeprefix(prefix) for name, _ in keys}
    for key, (k, v) in kv.items():
        roles[k], roles[v] = f"{key}/k", f"{key}/v"

    def fill(name, shape_, dtype):
        g = torch.Generator().manual_seed(seed * 100003 + sum(ord(c) * (i + 1) for i, c in enumerate(roles[name])))
        scale = 0.5 if name.endswith("latents") else (1.0 if len(shape_) == 1 else shape_[-1] ** -0.5)
        return torch.randn(shape_, generator=g, dtype=torch.float64) * scale + (1.0 if name.endswith("norm1.weight") else 0.0)

    write_safetensors(path, [(k, s, torch.float32) for k, s in keys], fill, truncate=truncate)
    return kv


def reference_resampler(x, W, prefix, depth, heads):
    """IP-Adapter's Resampler (resampler.py), written out: latents attend to [image tokens, latents]."""
    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], W[name + ".weight"], W[name + ".bias"])

    p = prefix
    lat = W[p + "latents"][0].expand(x.shape[0], -1, -1)
    x = x @ W[p + "proj_in.weight"].T + W[p + "proj_in.bias"]
    for n in range(depth):
        q_ = f"{p}layers.{n}."
        xn, ln_ = ln(x, q_ + "0.norm1"), ln(lat, q_ + "0.norm2")
        q = ln_ @ W[q_ + "0.to_q.weight"].T
        k, v = (torch.cat([xn, ln_], dim=1) @ W[q_ + "0.to_kv.weight"].T).chunk(2, dim=-1)
        b, m, inner = q.shape
        d = inner // heads
        q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        w = torch.softmax((q * d**-0.25) @ (k * d**-0.25).transpose(-1, -2), dim=-1)
        out = (w @ v).transpose(1, 2).reshape(b, m, inner)
        lat = lat + out @ W[q_ + "0.to_out.weight"].T
        h = F.gelu(ln(lat, q_ + "1.0") @ W[q_ + "1.1.weight"].T) @ W[q_ + "1.3.weight"].T
        lat = lat + h
    return ln(lat @ W[p + "proj_out.weight"].T + W[p + "proj_out.bias"], p + "norm_out")


def reference_ip_branch(q, tokens, to_k_ip, to_v_ip, heads):
    """IP-Adapter's attention branch (IPAttnProcessor): softmax(q K_ip^T / sqrt(d)) V_ip per head."""
    k, v = tokens @ to_k_ip.T, tokens @ to_v_ip.T  # (B, M, dim)
    b, n, dim = q.shape
    d = dim // heads
    qh = q.reshape(b, n, heads, d).transpose(1, 2)
    kh, vh = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (k, v))
    out = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1) @ vh
    return out.transpose(1, 2).reshape(b, n, dim)


def read_all(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).double() for k in f.keys()}  # noqa: SIM118  (safe_open is not a mapping)


@pytest.fixture(scope="module")
def tiny_layers(_tiny_unet_shared):
    return unet_layers(_tiny_unet_shared.model.diffusion_model)


@pytest.mark.parametrize("layout", ["ip-adapter", "numbered", "consecutive", "diffusers"])
def test_tiny_file_computes_ip_adapters_resampler_and_attention_branch(layout, tmp_path, tiny_layers, tiny_clip_vision):
    path = tmp_path / f"{layout}.safetensors"
    kv = build_tiny(path, layout, tiny_layers)
    encoder = load_encoder(str(path), dtype=torch.float64, layers=tiny_layers, clip_vision=TINY_SPEC)
    assert encoder.config.qformer.heads == 2 and encoder.config.qformer.ff_bias is False
    assert encoder.config.clip_vision.hidden_layer == "penultimate"
    assert read_config(str(path), layers=tiny_layers, clip_vision=TINY_SPEC) == encoder.config  # header alone
    expected_format = "ip-adapter-plus-sdxl" if layout == "ip-adapter" else "ip-adapter-derived"
    assert plan_encoder(read_header(str(path)), layers=tiny_layers, clip_vision=TINY_SPEC).format == expected_format

    encoded = tiny_clip_vision.encode_image(photos(5, 2))
    hidden = encoded["penultimate_hidden_states"].detach().double()  # (2, 17, 64)
    assert not torch.allclose(hidden, encoded["last_hidden_state"].double())  # the layer matters
    W = read_all(path)
    prefix, _ = tiny_names(layout, tiny_layers)
    tokens_ref = reference_resampler(hidden, W, prefix, depth=2, heads=2)
    with torch.no_grad():
        tokens = encoder.encode(hidden)
        torch.testing.assert_close(tokens, tokens_ref, **TOL)
        g = torch.Generator().manual_seed(1)
        for i, layer in enumerate(encoder.layers):
            heads = layer.dim // 16  # the tiny UNet's num_head_channels
            q = torch.randn(2, 24, layer.dim, generator=g, dtype=torch.float64)
            k_name, v_name = kv[layer.key]
            ref = reference_ip_branch(q, tokens_ref, W[k_name], W[v_name], heads)
            key, value = encoder.projections[i](tokens)
            torch.testing.assert_close(nested_values(q, key, value, heads), ref, **TOL)


def test_all_layouts_give_the_same_encoder(tmp_path, tiny_layers):
    encoders = {}
    for layout in ("ip-adapter", "numbered", "consecutive", "diffusers"):
        build_tiny(tmp_path / f"{layout}.safetensors", layout, tiny_layers)
        encoders[layout] = load_encoder(str(tmp_path / f"{layout}.safetensors"), layers=tiny_layers, clip_vision=TINY_SPEC)
    base = encoders.pop("ip-adapter").state_dict()
    for layout, encoder in encoders.items():
        assert encoder.config.domain == "faces" and encoder.config.token == "person"
        for name, tensor in encoder.state_dict().items():
            assert torch.equal(tensor, base[name]), (layout, name)


def test_a_registered_unet_and_tower_let_a_file_load_without_a_layer_table(tmp_path, tiny_layers,
                                                                           monkeypatch):
    # Load Nested Encoder passes no layer table: the file's layer count picks a known UNet (SDXL's by default;
    # the e2e server registers the tiny one), its token width a known CLIP vision tower.
    path = tmp_path / "ip.safetensors"
    build_tiny(path, "ip-adapter", tiny_layers)
    with pytest.raises(NestedWeightsError, match=f"{len(tiny_layers)} cross-attention layers; SDXL has 70"):
        load_encoder(str(path), clip_vision=TINY_SPEC)
    monkeypatch.setitem(formats.KNOWN_UNET_LAYERS, len(tiny_layers), tuple(tiny_layers))
    with pytest.raises(NestedWeightsError, match="reads CLIP tokens 64 wide"):
        load_encoder(str(path))
    monkeypatch.setitem(formats.KNOWN_CLIP_VISION, 64, replace(TINY_SPEC, hidden_layer="penultimate"))
    encoder = load_encoder(str(path))
    expected = load_encoder(str(path), layers=tiny_layers, clip_vision=TINY_SPEC)
    assert encoder.config == expected.config and encoder.config.layers == tuple(tiny_layers)
    assert plan_encoder(read_header(str(path))).format == "ip-adapter-plus-sdxl"
    base = expected.state_dict()
    assert all(torch.equal(tensor, base[name]) for name, tensor in encoder.state_dict().items())


def test_dim_head_override_changes_the_heads_and_matches_the_reference(tmp_path, tiny_layers):
    path = tmp_path / "ip.safetensors"
    build_tiny(path, "ip-adapter", tiny_layers)
    encoder = load_encoder(str(path), dtype=torch.float64, layers=tiny_layers, clip_vision=TINY_SPEC, dim_head=32)
    assert (encoder.config.qformer.heads, encoder.config.qformer.dim_head) == (4, 32)
    hidden = torch.randn(1, 17, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode(hidden), reference_resampler(hidden, read_all(path), "image_proj.", 2, 4), **TOL)
    plan = plan_encoder(read_header(str(path)), layers=tiny_layers, clip_vision=TINY_SPEC)
    assert any("assumed" in note and "dim_head" in note for note in plan.notes)


def test_encode_subject_node_reads_the_penultimate_layer_of_a_converted_ip_adapter(pack, models_folder, tmp_path,
                                                                                    tiny_layers, tiny_clip_vision,
                                                                                    monkeypatch):
    source = tmp_path / "tiny-ip.safetensors"
    build_tiny(source, "ip-adapter", tiny_layers)
    encoder = load_encoder(str(source), layers=tiny_layers, clip_vision=TINY_SPEC)
    ipadapter = models_folder.ipadapter
    save_encoder(str(ipadapter / "tiny-ip-converted.safetensors"), encoder)
    (ipadapter / "pickled.bin").write_bytes(b"not listed")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "ipadapter", ([str(ipadapter)], {".safetensors", ".bin"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    files = pack.loader.encoder_files()
    assert "tiny-ip-converted.safetensors" in files and "pickled.bin" not in files

    (handle,) = run_node(pack, "NestedAttentionLoadEncoder", encoder_name="tiny-ip-converted.safetensors", clip_vision=tiny_clip_vision)
    image = photos(7)
    subject, _encoded = run_node(pack, "NestedAttentionEncodeSubject", encoder=handle, image=image, crop="center")
    hidden = tiny_clip_vision.encode_image(image)["penultimate_hidden_states"].detach().double()
    expected = reference_resampler(hidden, read_all(source), "image_proj.", depth=2, heads=2).float()
    torch.testing.assert_close(subject.tokens, expected, atol=1e-5, rtol=1e-4)  # float32 encoder in the node
    last = tiny_clip_vision.encode_image(image)["last_hidden_state"].detach().double()
    assert not torch.allclose(subject.tokens, reference_resampler(last, read_all(source), "image_proj.", 2, 2).float(),
                              atol=1e-3)


# ------------------------------------------------------------------------------------------------
# Files written before the new config fields still load


def test_a_format_version_1_file_without_the_new_fields_loads_as_before(tmp_path, tiny_layers):
    from test_encoder_weights import tiny_config

    encoder = NestedEncoder(tiny_config())
    path = str(tmp_path / "old.safetensors")
    save_encoder(path, encoder)
    with safe_open(path, framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open is not a mapping)
    config = json.loads(meta["config"])
    for gone in ("source", "licence"):
        config.pop(gone)
    config["qformer"].pop("ff_bias")
    config["clip_vision"].pop("hidden_layer")
    config["clip_vision"].pop("crop")
    meta["config"] = json.dumps(config)
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=meta)
    loaded = load_encoder(path)
    assert loaded.config == encoder.config
    assert loaded.config.qformer.ff_bias is True and loaded.config.clip_vision.hidden_layer == "last"
    assert loaded.config.clip_vision.output_key == "last_hidden_state"


# ------------------------------------------------------------------------------------------------
# Files that are not usable: a clear error at load


def test_truncated_file_is_refused(tmp_path, tiny_layers):
    path = tmp_path / "cut.safetensors"
    build_tiny(path, "ip-adapter", tiny_layers, truncate=4096)
    with pytest.raises(NestedWeightsError, match=r"is truncated: its tensors need \d+ bytes and the file has \d+ \(an "
                       r"interrupted download\). Download it again"):
        load_encoder(str(path), layers=tiny_layers, clip_vision=TINY_SPEC)


def test_sd15_ip_adapter_plus_is_refused(tmp_path):
    # SD1.5 Plus: Resampler 768 wide, 12 heads, context 768, 16 cross-attention layers (320/640/1280 wide).
    keys = resampler_keys("image_proj.", dim=768, depth=4, inner=768, num_queries=16, clip_dim=1280, output_dim=768)
    widths = [320] * 4 + [640] * 4 + [1280] * 4 + [1280] * 3 + [640] * 3 + [320] * 3 + [1280]
    for i, width in enumerate(widths[:16]):
        keys += [(f"ip_adapter.{2 * i + 1}.to_k_ip.weight", (width, 768)), (f"ip_adapter.{2 * i + 1}.to_v_ip.weight", (width, 768))]
    path = tmp_path / "ip-adapter-plus_sd15.safetensors"
    write_safetensors(path, [(k, s, torch.float16) for k, s in keys], lambda n, s, d: torch.zeros(s))
    with pytest.raises(NestedWeightsError, match=r"768 wide.*2048.*SD1.5 IP-Adapter.*ip-adapter-plus_sdxl_vit-h"):
        load_encoder(str(path))


@pytest.mark.parametrize("kind", ["faceid", "faceid-plus"])
def test_faceid_files_are_refused(tmp_path, kind):
    if kind == "faceid":
        keys = [("image_proj.proj.0.weight", (1024, 512)), ("image_proj.proj.0.bias", (1024,)),
                ("image_proj.proj.2.weight", (8192, 1024)), ("image_proj.norm.weight", (2048,))]
    else:
        keys = [("image_proj.perceiver_resampler.proj_in.weight", (2048, 1280)), ("image_proj.proj.0.weight", (1024, 512))]
    keys += [("ip_adapter.1.to_k_ip.weight", (640, 2048)), ("ip_adapter.0.to_q_lora.down.weight", (128, 640))]
    path = tmp_path / "faceid.safetensors"
    write_safetensors(path, [(k, s, torch.float16) for k, s in keys], lambda n, s, d: torch.zeros(s))
    with pytest.raises(NestedWeightsError, match=r"FaceID.*not a Resampler over CLIP image tokens"):
        load_encoder(str(path))


def test_plain_ip_adapter_is_refused(tmp_path):
    keys = plain_ip_adapter_keys()
    path = tmp_path / "ip-adapter_sdxl_vit-h.safetensors"
    write_safetensors(path, [(k, s, torch.float16) for k, s in keys], lambda n, s, d: torch.zeros(s))
    with pytest.raises(NestedWeightsError, match=r"plain IP-Adapter.*pooled embedding"):
        load_encoder(str(path))


def test_missing_layer_is_named(tmp_path, tiny_layers):
    path = tmp_path / "gap.safetensors"
    build_tiny(path, "ip-adapter", tiny_layers, drop=("ip_adapter.15.to_k_ip.weight", "ip_adapter.15.to_v_ip.weight"))
    with pytest.raises(NestedWeightsError, match=r"ip_adapter\.\{n\}\.to_k_ip\.weight.*expected n = 1, 3, \.\.\., 33 \(17 layers\): missing n = \[15\]"):
        load_encoder(str(path), layers=tiny_layers, clip_vision=TINY_SPEC)
    # Without the table (SDXL by default) the gap is found all the same.
    with pytest.raises(NestedWeightsError, match=r"missing n = \[15\]"):
        load_encoder(str(path))


def test_missing_layer_in_consecutive_numbering_is_named(tmp_path, tiny_layers):
    path = tmp_path / "gap0.safetensors"
    build_tiny(path, "consecutive", tiny_layers, drop=("nested_layers.9.to_k_ip.weight", "nested_layers.9.to_v_ip.weight"))
    with pytest.raises(NestedWeightsError, match=r"expected 0, 1, \.\.\., 16 \(17 layers\): missing n = \[9\]"):
        load_encoder(str(path), layers=tiny_layers, clip_vision=TINY_SPEC)


def test_diffusers_paths_for_another_unet_structure_are_refused(tmp_path, tiny_layers):
    # Transformer depth 1 everywhere in the file, 2 at input 7/8 in the model: groups do not line up.
    path = tmp_path / "shallow.safetensors"
    keep = [l for l in tiny_layers if not (l.block == "input" and l.index == 1)]
    build_tiny(path, "diffusers", keep)
    with pytest.raises(NestedWeightsError, match=r"down_blocks attn2 layers of the file \(transformer blocks per attention: \[1, 1, 1, 1\]\) do not match the model's \(\[1, 1, 2, 2\]\)"):
        load_encoder(str(path), layers=tiny_layers, clip_vision=TINY_SPEC)


def test_missing_value_weight_of_one_layer_is_named(tmp_path, tiny_layers):
    path = tmp_path / "half.safetensors"
    build_tiny(path, "diffusers", tiny_layers, drop=("unet.mid_block.attentions.0.transformer_blocks.1.attn2.processor.to_v_ip.weight",))
    with pytest.raises(NestedWeightsError, match=r"has only 'unet\.mid_block.*to_k_ip\.weight'; every layer needs both"):
        load_encoder(str(path), layers=tiny_layers, clip_vision=TINY_SPEC)


def test_layers_in_another_order_are_refused_by_their_widths(tmp_path, tiny_layers):
    # Consecutive numbers in ComfyUI's table order (middle before output) instead of diffusers order.
    path = tmp_path / "order.safetensors"
    prefix, _kv = tiny_names("consecutive", tiny_layers)
    position = {layer.key: i for i, layer in enumerate(tiny_layers)}
    keys = resampler_keys(prefix, **TINY)
    for layer in tiny_layers:
        i = position[layer.key]
        keys += [(f"nested_layers.{i}.to_k_ip.weight", (layer.dim, 2048)), (f"nested_layers.{i}.to_v_ip.weight", (layer.dim, 2048))]
    write_safetensors(path, [(k, s, torch.float32) for k, s in keys], lambda n, s, d: torch.zeros(s))
    with pytest.raises(NestedWeightsError, match=r"is the weight of layer \('output', 3, 0\) \(width 64\).*must be \[64, 2048\]"):
        load_encoder(str(path), layers=tiny_layers, clip_vision=TINY_SPEC)


def test_unknown_file_lists_its_key_groups_and_what_was_expected(tmp_path):
    path = tmp_path / "lora.safetensors"
    keys = [(f"lora_unet_down_blocks_{i}.alpha", (1,)) for i in range(3)] + [("model.diffusion_model.x.weight", (4, 4))]
    write_safetensors(path, [(k, s, torch.float16) for k, s in keys], lambda n, s, d: torch.zeros(s))
    with pytest.raises(NestedWeightsError) as error:
        load_encoder(str(path))
    message = str(error.value)
    assert "Key groups found" in message
    assert "lora_unet_down_blocks_#.alpha  x3  [1]" in message
    assert "model.diffusion_model.x.weight  x1  [4, 4]" in message
    assert "Expected one of" in message and "ip_adapter.#.to_k_ip.weight" in message
    assert "python -m nested_attention.describe" in message


def test_resampler_with_a_positional_embedding_is_refused(tmp_path, tiny_layers):
    path = tmp_path / "pos.safetensors"
    build_tiny(path, "ip-adapter", tiny_layers, extra=[("image_proj.pos_emb.weight", (257, 64))])
    with pytest.raises(NestedWeightsError, match=r"unexpected \['image_proj.pos_emb.weight'\].*positional embedding"):
        load_encoder(str(path), layers=tiny_layers, clip_vision=TINY_SPEC)


def test_unknown_clip_width_asks_for_the_clip_vision_model(tmp_path, tiny_layers):
    path = tmp_path / "w64.safetensors"
    build_tiny(path, "ip-adapter", tiny_layers)
    with pytest.raises(NestedWeightsError, match=r"reads CLIP tokens 64 wide.*clip_vision"):
        load_encoder(str(path), layers=tiny_layers)


# ------------------------------------------------------------------------------------------------
# The command lines


def _run(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_describe_and_convert_command_lines_work_without_comfyui(tmp_path, tiny_layers, capsys):
    # The command lines assume SDXL's 70 layers; a tiny-UNet IP-Adapter file must be refused by them (with its
    # groups shown), and a pack file made from it (with the tiny table stored) is read.
    good = tmp_path / "pack.safetensors"
    source = tmp_path / "ip.safetensors"
    build_tiny(source, "ip-adapter", tiny_layers)
    save_encoder(str(good), load_encoder(str(source), layers=tiny_layers, clip_vision=TINY_SPEC))
    # `python -m nested_attention.describe` in a fresh interpreter, which must not import ComfyUI.
    script = ("import runpy, sys; sys.argv = ['describe', sys.argv[1]]\n"
              "try:\n    runpy.run_module('nested_attention.describe', run_name='__main__')\n"
              "except SystemExit as e:\n    code = e.code\n"
              "print('comfy imported:', any(m == 'comfy' or m.startswith('comfy.') for m in sys.modules))\n"
              "sys.exit(code)")
    done = _run("-c", script, str(good))
    assert done.returncode == 0, done.stderr
    assert "format: nested-attention" in done.stdout and "penultimate hidden layer" in done.stdout
    assert "qformer.blocks.#.#.to_kv.weight  x2  [256, 128]" in done.stdout
    assert "comfy imported: False" in done.stdout

    from nested_attention import describe as describe_cli

    assert describe_cli.main([str(source)]) == 1
    shown = capsys.readouterr().out
    assert "format: not supported" in shown and "17 cross-attention layers; SDXL has 70" in shown
    assert "ip_adapter.#.to_k_ip.weight  x17" in shown

    out = tmp_path / "again.safetensors"
    done = _run("-m", "nested_attention.convert", str(good), str(out), "--token", "dog", "--domain", "pets")
    assert done.returncode == 0, done.stderr
    assert read_config(str(out)).token == "dog" and read_config(str(out)).domain == "pets"
    assert convert_cli.main([str(source), str(tmp_path / "no.safetensors")]) == 1
    assert "cannot convert" in capsys.readouterr().err and not (tmp_path / "no.safetensors").exists()
