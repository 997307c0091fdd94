"""Apply Nested Attention: ComfyUI's real sampler on tiny models; full-size SDXL (meta) for structure."""

from __future__ import annotations

import copy
from collections import Counter
from types import SimpleNamespace

import comfy.ldm.modules.attention as comfy_attention_module
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import pytest
import tiny_models
import torch
import torch.nn.functional as F
from other_packs import with_other_pack
from pack_helpers import TINY_CLIP_VISION_SPEC, apply, encode_subject, layer_inputs, tiny_encoder

import nested_attention.patch as core_patch
from nested_attention import (
    SDXL_LAYERS,
    ClipVisionSpec,
    EncoderConfig,
    NestedEncoder,
    QFormerConfig,
    unet_layers,
)
from nested_attention.patch import NestedAttentionPatch
from nested_attention_comfy.attention import comfy_attention
from nested_attention_comfy.model import attn2_replacements
from nested_attention_comfy.words import SubjectWordError

PROMPT = "a photo of a pet"
CPU = torch.device("cpu")


def run(model, positive, negative, *, steps: int = 2, seed: int = 0, size: int = 16, cfg: float = 5.0):
    """Sample with ComfyUI's real sampler and record every UNet evaluation (flags, sigma, input, output)."""
    evals = []

    def wrapper(apply_model, args):
        out = apply_model(args["input"], args["timestep"], **args["c"])
        evals.append(
            SimpleNamespace(
                flags=list(args["cond_or_uncond"]),
                sigma=float(args["timestep"].max()),
                input=args["input"].clone(),
                out=out.clone(),
            )
        )
        return out

    recorded = model.clone()
    recorded.set_model_unet_function_wrapper(wrapper)
    latent = tiny_models.sample(recorded, positive, negative, seed, steps=steps, size=size, cfg=cfg)
    return latent, evals


def rows(evaluation, flag: int) -> torch.Tensor:
    """The output rows of the chunks marked `flag` (0 conditional, 1 unconditional)."""
    chunk = evaluation.out.shape[0] // len(evaluation.flags)
    return torch.cat(
        [evaluation.out[i * chunk : (i + 1) * chunk] for i, f in enumerate(evaluation.flags) if f == flag]
    )


# ------------------------------------------------------------------------------------------------
# Structure


def test_every_layer_key_is_patched_and_called_once_per_unet_evaluation(
    pack, tiny_unet, tiny_clip, pet, monkeypatch
):
    patched, positive = apply(pack, tiny_unet, tiny_clip, pet, PROMPT)
    keys = {layer.key for layer in unet_layers(tiny_unet.model.diffusion_model)}
    assert set(attn2_replacements(patched)) == keys
    calls = Counter()
    original = NestedAttentionPatch.__call__

    def counting(self, q, k, v, extra_options):
        calls[self.layer.key] += 1
        return original(self, q, k, v, extra_options)

    monkeypatch.setattr(NestedAttentionPatch, "__call__", counting)
    _, evals = run(patched, positive, tiny_models.encode_text(tiny_clip, ""), steps=2)
    assert all(sorted(e.flags) == [0, 1] for e in evals)  # cond and uncond batched, as on a real GPU
    assert calls == Counter({key: len(evals) for key in keys})


def test_full_size_sdxl_has_all_70_layers_patched_and_each_called_once_per_evaluation(
    pack, tiny_clip, monkeypatch
):
    base = tiny_models.full_sdxl_unet_meta()
    model = comfy.model_patcher.ModelPatcher(base, load_device=CPU, offload_device=CPU)
    config = EncoderConfig(
        qformer=QFormerConfig(clip_dim=64, dim=32, depth=1, heads=2, dim_head=16, num_queries=4),
        clip_vision=ClipVisionSpec(**TINY_CLIP_VISION_SPEC),
    )  # SDXL's 70-layer table
    with torch.device("meta"):
        encoder = NestedEncoder(config)
    handle = pack.wires.EncoderHandle(
        encoder=encoder,
        patcher=comfy.model_patcher.ModelPatcher(encoder, CPU, CPU),
        clip_vision=None,
        name="sdxl_meta.safetensors",
    )
    subject = pack.wires.Subject(tokens=torch.zeros(1, 4, 2048), encoder=handle, name="pet", images=1)
    patched, _ = apply(pack, model, tiny_clip, subject, PROMPT)
    patches = attn2_replacements(patched)
    assert unet_layers(base.diffusion_model) == SDXL_LAYERS
    assert set(patches) == {layer.key for layer in SDXL_LAYERS} and len(patches) == 70
    assert [patches[layer.key].index for layer in SDXL_LAYERS] == list(range(70))

    # One UNet evaluation on the meta device: no values, the patch counts and forwards to ComfyUI's attention.
    calls = Counter()

    def counting(self, q, k, v, extra_options):
        calls[self.layer.key] += 1
        assert q.shape[-1] == self.layer.dim == extra_options["n_heads"] * extra_options["dim_head"]
        return self.host_attention(q, k, v, extra_options["n_heads"], extra_options)

    monkeypatch.setattr(NestedAttentionPatch, "__call__", counting)
    monkeypatch.setattr(
        comfy_attention_module, "optimized_attention", comfy_attention_module.attention_pytorch
    )
    meta = torch.device("meta")
    with torch.no_grad():
        base.diffusion_model(
            torch.empty(2, 4, 16, 16, device=meta, dtype=torch.float16),
            timesteps=torch.empty(2, device=meta),
            context=torch.empty(2, 77, 2048, device=meta, dtype=torch.float16),
            y=torch.empty(2, 2816, device=meta, dtype=torch.float16),
            transformer_options=dict(patched.model_options["transformer_options"]),
        )
    assert calls == Counter({layer.key: 1 for layer in SDXL_LAYERS})


# ------------------------------------------------------------------------------------------------
# Exact invariants through the real sampler


def test_unconditional_rows_are_bit_identical_to_the_unpatched_model(pack, tiny_unet, tiny_clip, pet):
    patched, positive = apply(pack, tiny_unet, tiny_clip, pet, PROMPT)
    negative = tiny_models.encode_text(tiny_clip, "")
    _, plain = run(tiny_unet, positive, negative, steps=1)
    _, nested = run(patched, positive, negative, steps=1)
    assert torch.equal(plain[0].input, nested[0].input)
    assert torch.equal(rows(nested[0], 1), rows(plain[0], 1))
    assert (
        rows(nested[0], 0) - rows(plain[0], 0)
    ).abs().max() > 1e-3  # the subject does act on the cond rows


def test_conditioning_output_is_the_prompt_encoded_like_clip_text_encode(pack, tiny_unet, tiny_clip, pet):
    text = "a photo of a (pet:1.2), on the beach"
    _, conditioning = apply(pack, tiny_unet, tiny_clip, pet, text)
    [[cond, extra]] = conditioning
    [[expected, expected_extra]] = tiny_models.encode_text(tiny_clip, text)
    assert torch.equal(cond, expected) and torch.equal(
        extra["pooled_output"], expected_extra["pooled_output"]
    )


def unet_attn2_weights(unet_patcher):
    """to_k and to_v of every cross-attention layer, in the order of unet_layers()."""
    modules = [m for name, m in unet_patcher.model.diffusion_model.named_modules() if name.endswith("attn2")]
    return [m.to_k.weight.detach().float() for m in modules], [
        m.to_v.weight.detach().float() for m in modules
    ]


@pytest.mark.parametrize("under", ["nothing", "another pack"])
def test_nested_values_equal_to_v_sstar_with_lambda_1_sample_the_image_without_the_subject(
    pack, tiny_unet, tiny_clip, load_handle, under
):
    positive = tiny_models.encode_text(tiny_clip, PROMPT)
    negative = tiny_models.encode_text(tiny_clip, "")
    position = 5  # <start> a photo of a pet
    # Every subject token E equals the prompt's own context vector at s*, and W_K~/W_V~ are the UNet's
    # to_k/to_v, so every row of V~ is V[s*]; alpha = 1 keeps its norm. Then v* = V[s*] and nested attention
    # is plain attention.
    encoder = tiny_encoder(tiny_unet, seed=3, alpha=1.0)
    with torch.no_grad():
        encoder.qformer.norm_out.weight.zero_()
        encoder.qformer.norm_out.bias.copy_(positive[0][0][0, position])
    encoder.init_from_unet(*unet_attn2_weights(tiny_unet))
    subject = encode_subject(pack, load_handle(encoder=encoder), seed=0)
    # On another pack's patch (their own term unchanged), the image is the one their model alone samples.
    base = tiny_unet if under == "nothing" else with_other_pack(tiny_unet)
    patched, conditioning = apply(pack, base, tiny_clip, subject, PROMPT, lambda_=1.0)
    assert patched.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 4, 0)].subjects[
        0
    ].positions == (position,)

    expected = tiny_models.sample(base, positive, negative, 0, steps=2, size=16)
    latent = tiny_models.sample(patched, conditioning, negative, 0, steps=2, size=16)
    scale = expected.abs().max()
    torch.testing.assert_close(latent, expected, rtol=0, atol=1e-4 * scale)
    # Control: the same encoder with its norm regularization at alpha = 2 visibly changes the image.
    boosted, _ = apply(pack, base, tiny_clip, subject, PROMPT)
    for patch in attn2_replacements(boosted).values():
        patch.subjects[0].alpha = 2.0
    assert (
        tiny_models.sample(boosted, conditioning, negative, 0, steps=2, size=16) - expected
    ).abs().max() > 1e-2 * scale


@pytest.mark.parametrize("under", ["nothing", "another pack"])
def test_chained_subjects_act_together_and_order_does_not_change_the_result(
    pack, tiny_unet, tiny_clip, pet, person, under
):
    text = "a person and their pet"
    negative = tiny_models.encode_text(tiny_clip, "")
    base = tiny_unet if under == "nothing" else with_other_pack(tiny_unet)
    pet_model, conditioning = apply(pack, base, tiny_clip, pet, text)
    person_model, _ = apply(pack, base, tiny_clip, person, text)
    pet_then_person, _ = apply(pack, pet_model, tiny_clip, person, text)
    person_then_pet, _ = apply(pack, person_model, tiny_clip, pet, text)

    both = tiny_models.sample(pet_then_person, conditioning, negative, 0, steps=2, size=16)
    assert torch.equal(both, tiny_models.sample(person_then_pet, conditioning, negative, 0, steps=2, size=16))
    only_pet = tiny_models.sample(pet_model, conditioning, negative, 0, steps=2, size=16)
    only_person = tiny_models.sample(person_model, conditioning, negative, 0, steps=2, size=16)
    scale = both.abs().max()
    assert (both - only_pet).abs().max() > 1e-3 * scale and (both - only_person).abs().max() > 1e-3 * scale

    # The upstream models are never modified; a chained subject keeps the patch it builds on.
    assert attn2_replacements(tiny_unet) == {}
    assert all(len(p.subjects) == 1 for p in attn2_replacements(pet_model).values())
    assert all(len(p.subjects) == 2 for p in attn2_replacements(pet_then_person).values())
    for key, patch in attn2_replacements(pet_then_person).items():
        assert patch.wrapped is attn2_replacements(pet_model)[key].wrapped
        assert (patch.wrapped is None) == (under == "nothing")


def test_chaining_shares_weights_tokens_and_caches_instead_of_copying(
    pack, tiny_unet, tiny_clip, pet, person
):
    text = "a person and their pet"
    first, _ = apply(pack, tiny_unet, tiny_clip, pet, text)
    second, _ = apply(pack, first, tiny_clip, person, text)
    key = ("input", 4, 0)
    a, b = attn2_replacements(first)[key], attn2_replacements(second)[key]
    assert a is not b and a.subjects[0] is b.subjects[1 if b.subjects[0].name.startswith("faces") else 0]
    copied = copy.deepcopy(second.model_options)  # what every clone() does
    c = copied["transformer_options"]["patches_replace"]["attn2"][key]
    assert c is not b and all(x is y for x, y in zip(c.subjects, b.subjects))
    for x, y in zip(c.subjects, b.subjects):
        assert x.tokens.data_ptr() == y.tokens.data_ptr() and x.encoder is y.encoder
    # ComfyUI loads the encoders with the UNet: both patchers are listed, one each.
    assert set(second.model_patches_models()) == {pet.encoder.patcher, person.encoder.patcher}


def test_kv_are_projected_once_per_subject_and_layer_not_per_step(
    pack, tiny_unet, tiny_clip, pet, monkeypatch
):
    patched, positive = apply(pack, tiny_unet, tiny_clip, pet, PROMPT)
    negative = tiny_models.encode_text(tiny_clip, "")
    projections = []

    class CountingF:
        def __getattr__(self, name):
            return getattr(F, name)

        @staticmethod
        def linear(*args, **kwargs):
            projections.append(args[1].shape)
            return F.linear(*args, **kwargs)

    monkeypatch.setattr(core_patch, "F", CountingF())
    _, evals = run(patched, positive, negative, steps=3)
    run(patched, positive, negative, steps=3)  # a second prompt run reuses the cache too
    layers = len(attn2_replacements(patched))
    assert len(evals) == 3 and len(projections) == 2 * layers
    binding = attn2_replacements(patched)[("input", 4, 0)].subjects[0]
    assert len(binding._kv) == layers


def test_patches_follow_comfy_memory_management(pack, tiny_unet, tiny_clip, pet):
    patched, _ = apply(pack, tiny_unet, tiny_clip, pet, PROMPT)
    patch = attn2_replacements(patched)[("input", 4, 0)]
    assert patch.models() == [pet.encoder.patcher]
    assert patch.to(torch.float16) is patch  # ComfyUI's model_load passes the model dtype too
    binding = patch.subjects[0]
    binding._kv[(0, torch.device("meta"), torch.float16)] = (None, None)
    assert patch.to(CPU) is patch and not any(k[1].type == "meta" for k in binding._kv)
    comfy.model_management.load_models_gpu([patched])
    loaded = [m.model for m in comfy.model_management.current_loaded_models]
    assert pet.encoder.patcher in loaded and patched in loaded


# ------------------------------------------------------------------------------------------------
# Window, mask, precision


def test_outside_the_start_end_window_the_patch_is_inactive(pack, tiny_unet, tiny_clip, pet):
    negative = tiny_models.encode_text(tiny_clip, "")
    late, positive = apply(pack, tiny_unet, tiny_clip, pet, PROMPT, start=0.5, end=1.0)
    binding = attn2_replacements(late)[("input", 4, 0)].subjects[0]
    sampling = tiny_unet.get_model_object("model_sampling")
    assert binding.sigma_start == pytest.approx(sampling.percent_to_sigma(0.5)) and binding.sigma_end == 0.0
    _, plain = run(tiny_unet, positive, negative, steps=4)
    _, nested = run(late, positive, negative, steps=4)
    before = [i for i, e in enumerate(plain) if e.sigma > binding.sigma_start]
    assert 0 < len(before) < len(plain)
    for i in before:
        assert torch.equal(nested[i].out, plain[i].out)
    assert not torch.equal(nested[before[-1] + 1].out, plain[before[-1] + 1].out)

    # The end of the window, at the layer: below sigma_end the patch is the host's attention, bit for bit.
    early, _ = apply(pack, tiny_unet, tiny_clip, pet, PROMPT, start=0.0, end=0.5)
    patch = attn2_replacements(early)[("input", 4, 0)]
    sigma_end = patch.subjects[0].sigma_end
    q, k, v, extra = layer_inputs(patch, sigma=sigma_end * 0.9)
    assert torch.equal(patch(q, k, v, extra), comfy_attention(q, k, v, extra["n_heads"], extra))
    extra["sigmas"] = torch.tensor([sigma_end * 1.1])
    assert not torch.equal(
        patch(q, k, v, extra), comfy_attention(q, k, v, extra["n_heads"], extra)
    )


def test_outside_the_mask_the_layer_output_is_unchanged(pack, tiny_unet, tiny_clip, pet):
    mask = torch.zeros(1, 32, 32)
    mask[:, :, :16] = 1.0  # left half
    patched, _ = apply(pack, tiny_unet, tiny_clip, pet, PROMPT, mask=mask)
    patch = attn2_replacements(patched)[("input", 4, 0)]
    q, k, v, extra = layer_inputs(patch, h=4, w=4)
    out = patch(q, k, v, extra)
    plain = comfy_attention(q, k, v, extra["n_heads"], extra)
    grid = lambda t: t.reshape(2, 4, 4, -1)
    assert torch.equal(grid(out)[:, :, 2:], grid(plain)[:, :, 2:])  # right half: outside the mask
    assert torch.equal(out[1], plain[1])  # unconditional row
    assert (grid(out)[0, :, :2] - grid(plain)[0, :, :2]).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_patch_runs_in_half_precision_close_to_float32(pack, tiny_unet, tiny_clip, pet, dtype):
    patched, _ = apply(pack, tiny_unet, tiny_clip, pet, PROMPT)
    patch = attn2_replacements(patched)[("middle", 0, 0)]
    q, k, v, extra = layer_inputs(patch)
    reference = patch(q, k, v, extra)
    out = patch(q.to(dtype), k.to(dtype), v.to(dtype), extra)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=0.05 if dtype == torch.float16 else 0.15)
    assert {key[2] for key in patch.subjects[0]._kv} == {torch.float32, dtype}  # one cache entry per dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_sample_with_the_patch(pack, tiny_clip, pet, dtype, monkeypatch):
    base = tiny_models.sdxl_model(tiny_models.TINY_SDXL_UNET_CONFIG, CPU, dtype)  # computes in dtype
    tiny_models.init_parameters(base.diffusion_model, 0)
    model = comfy.model_patcher.ModelPatcher(base, load_device=CPU, offload_device=CPU)
    patched, positive = apply(pack, model, tiny_clip, pet, PROMPT)
    seen = set()
    original = NestedAttentionPatch.__call__
    monkeypatch.setattr(
        NestedAttentionPatch,
        "__call__",
        lambda self, q, k, v, e: seen.add(q.dtype) or original(self, q, k, v, e),
    )
    latent = tiny_models.sample(
        patched, positive, tiny_models.encode_text(tiny_clip, ""), 0, steps=1, size=16
    )
    assert seen == {dtype} and torch.isfinite(latent).all()


def test_shorter_prompt_repeated_against_a_longer_negative_keeps_the_subject_on_every_repeat(
    pack, tiny_unet, tiny_clip, pet, monkeypatch
):
    patched, positive = apply(pack, tiny_unet, tiny_clip, pet, PROMPT)
    negative = tiny_models.encode_text(tiny_clip, " ".join(["blurry"] * 90))  # 154 tokens
    seen = []
    original = core_patch.nested_attention

    def spy(q, k, v, subjects, **kwargs):
        seen.append((k.shape[1], [s.positions.tolist() for s in subjects]))
        return original(q, k, v, subjects, **kwargs)

    monkeypatch.setattr(core_patch, "nested_attention", spy)
    run(patched, positive, negative, steps=1)
    assert seen and all(entry == (154, [[5, 82]]) for entry in seen)


# ------------------------------------------------------------------------------------------------
# Errors


def test_word_absent_from_the_prompt_is_an_error_naming_both(pack, tiny_unet, tiny_clip, pet):
    with pytest.raises(SubjectWordError) as error:
        apply(pack, tiny_unet, tiny_clip, pet, "a photo of a dog on the grass")
    assert "'pet'" in str(error.value) and "'a photo of a dog on the grass'" in str(error.value)


def test_empty_token_takes_the_encoder_word_and_a_typed_token_overrides_it(pack, tiny_unet, tiny_clip, pet):
    default, _ = apply(pack, tiny_unet, tiny_clip, pet, "a dog and a pet")
    typed, _ = apply(pack, tiny_unet, tiny_clip, pet, "a dog and a pet", token=" dog ")
    assert attn2_replacements(default)[("input", 4, 0)].subjects[0].positions == (5,)
    assert attn2_replacements(typed)[("input", 4, 0)].subjects[0].positions == (2,)


def test_non_sdxl_model_is_a_clear_error(pack, tiny_clip, pet):
    config = {
        "use_checkpoint": False,
        "image_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 32,
        "channel_mult": [1, 2],
        "num_res_blocks": [1, 1],
        "transformer_depth": [1, 1],
        "transformer_depth_output": [1, 1, 1, 1],
        "transformer_depth_middle": 1,
        "num_head_channels": -1,
        "num_heads": 2,
        "context_dim": 768,
        "use_linear_in_transformer": False,
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": None,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }
    sd15 = comfy.supported_models.SD15(config).get_model({}, "", device=torch.device("meta"))
    model = comfy.model_patcher.ModelPatcher(sd15, load_device=CPU, offload_device=CPU)
    with pytest.raises(pack.apply.NestedApplyError, match="needs an SDXL model, but got BaseModel"):
        apply(pack, model, tiny_clip, pet, PROMPT)


def test_the_model_is_checked_once_per_apply(pack, tiny_unet, tiny_clip, pet, monkeypatch):
    checked = []
    monkeypatch.setattr(pack.apply, "check_sdxl", lambda model: checked.append(model))
    apply(pack, tiny_unet, tiny_clip, pet, PROMPT)
    assert checked == [tiny_unet]


def test_a_clip_whose_conditioning_is_not_2048_wide_is_refused_at_apply(pack, tiny_unet, pet):
    """An SD1.5 CLIP (768 wide) wired to an SDXL model: refused at Apply, not deep inside the sampler."""
    sd15_clip = tiny_models.tiny_sd15_clip(seed=0)
    assert tiny_models.encode_text(sd15_clip, PROMPT)[0][0].shape[-1] == 768
    with pytest.raises(
        pack.apply.NestedApplyError,
        match=r"conditioning 768 wide, but SDXL's cross-attention reads 2048.*Connect the CLIP output of the "
        r"SDXL checkpoint",
    ):
        apply(pack, tiny_unet, sd15_clip, pet, PROMPT)


def test_lambda_below_one_is_refused_and_the_input_starts_at_one(pack, tiny_unet, tiny_clip, pet):
    """λ < 1 cannot weaken the subject under max(logit, λ·logit), so the input's range starts at 1."""
    spec = pack.mappings["NestedAttentionApply"].INPUT_TYPES()["required"]["λ"][1]
    assert spec["default"] == 1.0 and spec["min"] == 1.0
    assert "max(logit, λ·logit)" in spec["tooltip"]
    with pytest.raises(pack.apply.NestedApplyError, match=r"λ is 0.5; expected 1 or more"):
        apply(pack, tiny_unet, tiny_clip, pet, PROMPT, lambda_=0.5)


def test_encoder_for_another_layer_table_is_refused(pack, tiny_unet, tiny_clip, load_handle):
    layers = unet_layers(tiny_unet.model.diffusion_model)[:-1]
    subject = encode_subject(pack, load_handle(layers=layers), seed=0)
    with pytest.raises(pack.apply.NestedApplyError, match="16 cross-attention layers.*has 17"):
        apply(pack, tiny_unet, tiny_clip, subject, PROMPT)


def test_two_subjects_on_the_same_word_is_an_error(pack, tiny_unet, tiny_clip, pet, person):
    first, _ = apply(pack, tiny_unet, tiny_clip, pet, PROMPT)
    with pytest.raises(pack.apply.NestedApplyError, match=r"position\(s\) \[5\] is already bound"):
        apply(pack, first, tiny_clip, person, PROMPT, token="pet")


def test_chained_nodes_with_different_prompts_is_an_error(pack, tiny_unet, tiny_clip, pet, person):
    first, _ = apply(pack, tiny_unet, tiny_clip, pet, "a person and their pet")
    with pytest.raises(pack.apply.NestedApplyError, match="different prompt"):
        apply(pack, first, tiny_clip, person, "a person with a pet")


def test_bad_window_and_missing_clip_are_errors(pack, tiny_unet, tiny_clip, pet):
    with pytest.raises(pack.apply.NestedApplyError, match="start_percent 0.8 and end_percent 0.2"):
        apply(pack, tiny_unet, tiny_clip, pet, PROMPT, start=0.8, end=0.2)
    with pytest.raises(RuntimeError, match="clip input is invalid"):
        apply(pack, tiny_unet, None, pet, PROMPT)
