"""Concepts the nodes, the trainer and the benchmark share have one home each (issue 19, item 2)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("__init__.py", "nested_attention", "nodes", "training", "benchmark")


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
