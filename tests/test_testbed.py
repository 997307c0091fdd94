"""The test bed itself: ComfyUI runs as a library and the tiny models behave like SDXL's, in seconds."""

from __future__ import annotations

import tiny_models
import torch


def test_tiny_unet_samples_through_comfy_sampler_with_finite_output(tiny_unet, tiny_clip, sample, encode):
    # Speed is the benchmark's business, not a test's: this only checks the sampler runs the tiny UNet.
    positive = encode(tiny_clip, "a photo of a person")
    negative = encode(tiny_clip, "")
    latent = sample(tiny_unet, positive, negative, seed=0)
    assert latent.shape == (1, 4, 32, 32)
    assert torch.isfinite(latent).all()
    assert latent.abs().max() > 0


def test_tiny_unet_sampling_is_deterministic_and_follows_the_prompt(tiny_unet, tiny_clip, sample, encode):
    negative = encode(tiny_clip, "")
    cat = sample(tiny_unet, encode(tiny_clip, "a photo of a cat"), negative, seed=3)
    cat_again = sample(tiny_unet, encode(tiny_clip, "a photo of a cat"), negative, seed=3)
    dog = sample(tiny_unet, encode(tiny_clip, "a photo of a dog"), negative, seed=3)
    torch.testing.assert_close(cat, cat_again, rtol=0, atol=0)
    assert (cat - dog).abs().max() > 1e-3


def test_tiny_unet_builder_is_deterministic_given_a_seed():
    def first_weights(model):
        return next(model.model.diffusion_model.parameters()).detach().clone()

    torch.testing.assert_close(first_weights(tiny_models.tiny_sdxl_unet(seed=1)),
                               first_weights(tiny_models.tiny_sdxl_unet(seed=1)), rtol=0, atol=0)
    assert not torch.equal(first_weights(tiny_models.tiny_sdxl_unet(seed=1)),
                           first_weights(tiny_models.tiny_sdxl_unet(seed=2)))


def test_tiny_clip_built_again_has_the_values_a_fresh_draw_gives_in_its_own_tensors():
    """Later builds of one (seed, dtype) copy the values the first drew (training.tiny.models._CLIP_STATES)."""
    from training.tiny import models

    def state(clip):
        return clip.cond_stage_model.state_dict()

    key = (3, torch.float16)
    try:
        models._CLIP_STATES.pop(key, None)
        drawn = models.tiny_sdxl_clip(seed=3, dtype=torch.float16)  # drawn from the seed, and remembered
        assert key in models._CLIP_STATES
        copied = models.tiny_sdxl_clip(seed=3, dtype=torch.float16)  # from what was remembered
        for name, tensor in state(drawn).items():
            assert torch.equal(state(copied)[name], tensor), name
        for tensor in state(drawn).values():
            tensor.add_(1.0)  # a build's tensors are its own: changing them changes no other build
        again = models.tiny_sdxl_clip(seed=3, dtype=torch.float16)
        for name, tensor in state(again).items():
            assert torch.equal(state(copied)[name], tensor), name
            assert not torch.equal(state(drawn)[name], tensor), name
    finally:
        models._CLIP_STATES.pop(key, None)


def test_tiny_unet_has_the_sdxl_block_layout_with_context_2048(tiny_unet):
    unet = tiny_unet.model.diffusion_model
    attn2 = [m for name, m in unet.named_modules() if name.endswith("attn2")]
    # transformer_depth [0,0,1,1,2,2] + middle 2 + output [0,0,0,1,1,1,2,2,2]
    assert len(attn2) == 1 + 1 + 2 + 2 + 2 + 1 + 1 + 1 + 2 + 2 + 2
    assert all(m.to_k.in_features == 2048 and m.to_v.in_features == 2048 for m in attn2)
    assert {m.heads for m in attn2} == {4, 8}  # 64 and 128 channels at 16 per head
    assert 15.5e6 < sum(p.numel() for p in unet.parameters()) < 16e6


def test_tiny_clip_gives_sdxl_shaped_conditioning(tiny_clip, encode):
    [[cond, extra]] = encode(tiny_clip, "a photo of a person")
    assert cond.shape == (1, 77, 2048)
    assert extra["pooled_output"].shape == (1, 1280)
    assert torch.isfinite(cond).all() and torch.isfinite(extra["pooled_output"]).all()


def test_tiny_clip_long_prompt_concatenates_77_token_chunks(tiny_clip, encode):
    [[cond, _]] = encode(tiny_clip, " ".join(["person"] * 100))
    assert cond.shape == (1, 154, 2048)


def test_tiny_clip_different_prompts_give_different_conditioning(tiny_clip, encode):
    [[cat, cat_extra]] = encode(tiny_clip, "a photo of a cat")
    [[dog, dog_extra]] = encode(tiny_clip, "a photo of a dog")
    [[cat_again, _]] = encode(tiny_clip, "a photo of a cat")
    torch.testing.assert_close(cat, cat_again, rtol=0, atol=0)
    # Causal text encoder: the tokens before the differing word agree, the ones from it on do not.
    # Positions: 0 start, 1 "a", 2 "photo", 3 "of", 4 "a", 5 "cat" / "dog".
    torch.testing.assert_close(cat[:, :5], dog[:, :5], rtol=0, atol=0)
    assert (cat[:, 5:] - dog[:, 5:]).abs().amax(dim=-1).min() > 1e-3
    assert (cat_extra["pooled_output"] - dog_extra["pooled_output"]).abs().max() > 1e-3


def test_tiny_clip_uses_comfy_tokenizer_with_word_ids(tiny_clip):
    tokens = tiny_clip.tokenize("a photo of a person", return_word_ids=True)
    assert set(tokens) == {"l", "g"}
    for chunks in tokens.values():
        assert len(chunks) == 1 and len(chunks[0]) == 77
        assert all(len(entry) == 3 for entry in chunks[0])


def test_tiny_clip_vision_gives_last_hidden_state(tiny_clip_vision):
    images = torch.rand(2, 48, 40, 3, generator=torch.Generator().manual_seed(0))
    out = tiny_clip_vision.encode_image(images)
    assert out["last_hidden_state"].shape == (2, 1 + (32 // 8) ** 2, 64)
    assert out["image_embeds"].shape == (2, 32)
    assert torch.isfinite(out["last_hidden_state"]).all()
    assert not torch.allclose(out["last_hidden_state"][0], out["last_hidden_state"][1])


def test_full_sdxl_unet_on_meta_has_70_cross_attention_layers_reading_2048():
    model = tiny_models.full_sdxl_unet_meta()
    unet = model.diffusion_model
    attn2 = [m for name, m in unet.named_modules() if name.endswith("attn2")]
    assert len(attn2) == 70
    assert all(m.to_k.in_features == 2048 and m.to_v.in_features == 2048 for m in attn2)
    assert all(p.device.type == "meta" for p in unet.parameters())
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684


def test_the_root_init_imports_as_a_plain_module_as_pytest_does_in_a_hyphenated_checkout():
    # pytest imports the repo root's __init__.py before the first test; in a checkout whose folder name is
    # not an identifier (comfyui-nested-attention) it does so as the top-level module `__init__`.
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("__init__", root / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("__init__")
    try:
        spec.loader.exec_module(module)  # no "attempted relative import with no known parent package"
    finally:
        if saved is not None:
            sys.modules["__init__"] = saved
    assert not hasattr(module, "comfy_entrypoint")  # the nodes are for ComfyUI, which loads a package
