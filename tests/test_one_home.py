"""Concepts the nodes, the trainer and the benchmark share have one home each (issue 19, item 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("__init__.py", "nested_attention", "nested_attention_comfy", "nodes", "training", "benchmark", "devtools")


def product_files() -> list[Path]:
    files = []
    for name in PRODUCT:
        path = REPO / name
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return files


def test_the_log_prefix_is_written_once():
    from nested_attention.logs import LOG_PREFIX

    assert LOG_PREFIX == "[nested-attention]"  # what users search ComfyUI's console for
    written = [str(f.relative_to(REPO)) for f in product_files() if LOG_PREFIX in f.read_text()]
    assert written == ["nested_attention/logs.py"]


def test_pixels_go_to_8_bit_by_rounding_to_the_nearest_level_and_back_exactly():
    import numpy as np
    import torch
    from PIL import Image

    from nested_attention.images import from_pil, from_uint8, to_pil, to_uint8

    levels = np.arange(256)
    # Values a third of a level off each level, and outside [0, 1]: each rounds (or clamps) to one level.
    values = np.concatenate([levels / 255, (levels + 1 / 3) / 255, (levels - 1 / 3) / 255, [-0.5, 1.5]])
    expected = [min(255, max(0, round(v * 255))) for v in values.tolist()]  # plain Python, float64
    image = torch.tensor(values, dtype=torch.float32).reshape(1, -1, 1)
    assert to_uint8(image).dtype == np.uint8
    assert to_uint8(image).reshape(-1).tolist() == expected
    assert to_uint8(image.numpy()).reshape(-1).tolist() == expected  # an array reads the same

    eight_bit = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    pixels = from_uint8(eight_bit)
    assert pixels.dtype == torch.float32
    assert pixels.reshape(-1).tolist() == [np.float32(v / 255) for v in eight_bit.reshape(-1).tolist()]
    assert np.array_equal(to_uint8(pixels), eight_bit)  # every level survives the round trip

    picture = to_pil(pixels)
    assert picture.mode == "RGB" and np.array_equal(np.asarray(picture), eight_bit)
    assert torch.equal(from_pil(picture), pixels)
    grey = Image.fromarray(eight_bit[..., 0])  # any mode is read as RGB
    assert torch.equal(from_pil(grey), from_uint8(np.repeat(eight_bit[..., :1], 3, axis=-1)))


def test_the_weights_fingerprint_is_the_sha256_the_trainer_and_the_evaluation_recorded():
    """Checkpoints (trainer_state's weights_sha256: named parameters) and evaluations (settings.json's
    encoder_sha256: the state dict) wrote SHA-256 over names and float32 bytes; the one definition gives the same
    digests, so checkpoints and evaluation folders written before still match."""
    import hashlib

    import torch

    from nested_attention import EncoderConfig, LayerSpec, NestedEncoder, QFormerConfig
    from nested_attention.weights import weights_fingerprint

    torch.manual_seed(0)
    qformer = QFormerConfig(clip_dim=16, dim=32, depth=1, heads=2, dim_head=16, num_queries=4, output_dim=24)
    layers = (LayerSpec("input", 4, 0, 8), LayerSpec("output", 2, 0, 12))
    encoder = NestedEncoder(EncoderConfig(qformer=qformer, layers=layers))

    def sha256(items) -> str:
        digest = hashlib.sha256()
        for name, tensor in sorted(items, key=lambda item: item[0]):
            digest.update(name.encode() + tensor.detach().to(torch.float32).numpy().tobytes())
        return digest.hexdigest()

    fingerprint = weights_fingerprint(encoder)
    assert fingerprint == sha256(encoder.state_dict().items()) == sha256(encoder.named_parameters())
    assert len(fingerprint) == 64
    with torch.no_grad():
        encoder.projections[1].to_v.weight[3, 5] += 1e-3  # one value of one layer
    assert weights_fingerprint(encoder) != fingerprint


def test_the_clip_vision_architecture_reads_the_same_from_a_model_and_from_its_file(tmp_path):
    """Load Nested Encoder reads a connected model's parameters; the trainer's dry run reads a file's header;
    both through nested_attention.encoder.clip_vision_architecture."""
    import tiny_models  # ComfyUI set up
    from safetensors import safe_open
    from safetensors.torch import save_file

    from nested_attention.encoder import ClipVisionSpec, clip_vision_architecture
    from nested_attention_comfy.clip_vision import clip_vision_spec

    model = tiny_models.tiny_clip_vision(seed=0)  # 32 px, patch 8: CLS + 4 x 4 patches, width 64, 2 layers
    save_file({k: v.contiguous() for k, v in model.model.state_dict().items()}, str(tmp_path / "tower.safetensors"))
    with safe_open(str(tmp_path / "tower.safetensors"), "pt") as f:
        header = {key: f.get_slice(key).get_shape() for key in list(f.keys())}
    expected = ClipVisionSpec(name="tower", hidden_size=64, num_tokens=17, num_layers=2, image_size=32)
    assert clip_vision_spec(model, "tower") == expected
    assert clip_vision_architecture(header, "tower") == expected  # the input size from the patch grid

    # ViT-H/14 as a whole CLIP file holds it (names and shapes of the real file): the text tower is not read.
    vit_h = {"vision_model.embeddings.position_embedding.weight": (257, 1280),
             "vision_model.embeddings.patch_embedding.weight": (1280, 3, 14, 14),
             "text_model.embeddings.position_embedding.weight": (77, 1024),
             **{f"vision_model.encoder.layers.{i}.mlp.fc1.weight": (5120, 1280) for i in range(32)},
             **{f"text_model.encoder.layers.{i}.mlp.fc1.weight": (4096, 1024) for i in range(24)}}
    assert clip_vision_architecture(vit_h) == ClipVisionSpec(name="", hidden_size=1280, num_tokens=257,
                                                             num_layers=32, image_size=224)
    del vit_h["vision_model.embeddings.patch_embedding.weight"]
    with pytest.raises(ValueError, match="patch_embedding"):
        clip_vision_architecture(vit_h)  # no input size without the patch size


def test_both_weight_fillers_follow_one_rule():
    """training/tiny/models.py: init_parameters (each value drawn, the tiny models) and fill_parameters_ (tiled from a
    pool, the full-size benchmark models) give norms 1 / 0, linear weights std 1/sqrt(fan_in), embedding tables
    std 1, everything else std 0.02; written out here in the order the parameters come."""
    import torch

    from training.tiny import models as builders

    def module() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 6), torch.nn.LayerNorm(6))

    sizes = [(10, 4), (6, 4), (6,)]  # embedding, linear weight, linear bias
    stds = [1.0, 4**-0.5, 0.02]
    drawn = module()
    builders.init_parameters(drawn, seed=3)
    g = torch.Generator().manual_seed(3)
    expected = [torch.randn(size, generator=g) * std for size, std in zip(sizes, stds)]
    tiled = module()
    builders.fill_parameters_(tiled, seed=3)
    pool = torch.randn(builders.POOL, generator=torch.Generator().manual_seed(3))
    offsets = [0, 7919, 2 * 7919]  # each tensor starts elsewhere in the pool
    for model, values in ((drawn, expected),
                          (tiled, [pool[o : o + torch.Size(s).numel()].reshape(s) * std
                                   for o, s, std in zip(offsets, sizes, stds)])):
        params = [model[0].weight, model[1].weight, model[1].bias]
        for param, value in zip(params, values):
            torch.testing.assert_close(param.detach(), value, rtol=0, atol=0)
        assert torch.equal(model[2].weight, torch.ones(6)) and torch.equal(model[2].bias, torch.zeros(6))
