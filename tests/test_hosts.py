"""What changed in ComfyUI between 0.3.75 and 0.33 that the pack relies on; each test runs on every host.

`python3 dev.py test` runs the whole suite once per ComfyUI host (README, Supported ComfyUI):
- `ModelPatcher.clone()` shares patch objects with its parent since 0.14 (0.3.75 deep-copies them);
- `.to(device)` may be called on a shared patch from worker threads, one per GPU, since 0.23;
- ComfyUI calls `cleanup()` on the patches of a model after sampling with it since 0.17;
- `clip_preprocess` lives in `comfy.clip_model` since 0.8 (`comfy.clip_vision` keeps an alias);
- a node's `VALIDATE_INPUTS` / `validate_inputs` must return exactly True when the inputs are valid;
- `transformer_options["optimized_attention_override"]` (set by attention-backend nodes; 0.33 has
  `ModelPatcher.set_model_optimized_attention` for it) wraps ComfyUI's optimized attention wherever it is called
  with the transformer_options: both hosts' `wrap_attn` honour it.
"""

from __future__ import annotations

import sys
import threading

import comfy.clip_model
import comfy.clip_vision
import comfy.ldm.modules.attention
import comfy.model_patcher
import pytest
import tiny_models
import torch
from comfy_api.latest import io
from pack_helpers import (
    apply,
    assert_inputs_valid,
    combo_choices,
    encode_subject,
    input_specs,
    run_node,
    validate_inputs,
)

from nested_attention import EncoderConfig, LayerSpec, NestedEncoder, QFormerConfig
from nested_attention.patch import NestedAttentionPatch, SubjectBinding
from nested_attention_comfy.model import attn2_replacements

TEXT = "a person and their pet"
CPU = torch.device("cpu")


def sample(model, positive, negative, **kwargs) -> torch.Tensor:
    return tiny_models.sample(model, positive, negative, 0, steps=2, size=16, **kwargs)


def snapshot(model) -> dict:
    """Everything of a model's attn2 patches that sampling reads, by identity or value."""
    out = {"prompt": model.model_options.get("nested_attention_prompt")}
    for key, patch in attn2_replacements(model).items():
        out[key] = (
            id(patch), patch.layer, patch.index, patch.host_attention, id(patch.wrapped), tuple(patch.models()),
            tuple(
                (id(s), s.encoder, s.tokens.data_ptr(), s.tokens._version, s.positions, s.prompt_tokens,
                 s.lam, s.alpha, s.sigma_start, s.sigma_end, s.mask, s.rows, s.cache, s.name)
                for s in patch.subjects
            ),
        )
    return out


# ------------------------------------------------------------------------------------------------
# clone() shares patch objects (0.14 on): Apply never changes a patch that is already on a model


@pytest.mark.parametrize("clone", ["as_this_host_clones", "sharing_patches"])
def test_apply_never_changes_a_patch_already_set_on_a_model(
    pack, tiny_unet, tiny_clip, pet, person, clone, monkeypatch
):
    if clone == "sharing_patches":  # what clone() does from ComfyUI 0.14 on, whatever this host does
        monkeypatch.setattr(NestedAttentionPatch, "__deepcopy__", lambda self, memo: self)
    negative = tiny_models.encode_text(tiny_clip, "")
    first, conditioning = apply(pack, tiny_unet, tiny_clip, pet, TEXT)
    if clone == "sharing_patches":
        key = next(iter(attn2_replacements(first)))
        assert attn2_replacements(first.clone())[key] is attn2_replacements(first)[key]
    before = snapshot(first)
    reference = sample(first, conditioning, negative)

    second, _ = apply(pack, first, tiny_clip, person, TEXT)
    third, _ = apply(pack, second.clone(), tiny_clip, person, "a person and their pet", token="their")
    chained = sample(second, conditioning, negative)
    sample(third, conditioning, negative)
    comfy.model_management.load_models_gpu([second])  # model_patches_to(...) on the shared patches

    assert snapshot(first) == before
    assert torch.equal(sample(first, conditioning, negative), reference)  # the first branch, run again
    unchained, _ = apply(pack, tiny_unet, tiny_clip, pet, TEXT)
    assert torch.equal(sample(unchained, conditioning, negative), reference)
    assert not torch.equal(chained, reference)  # the second subject did act
    assert attn2_replacements(tiny_unet) == {}


def test_a_patch_cannot_be_changed_in_place(pack, tiny_unet, tiny_clip, pet):
    first, _ = apply(pack, tiny_unet, tiny_clip, pet, TEXT)
    patch = next(iter(attn2_replacements(first).values()))
    assert isinstance(patch.subjects, tuple) and isinstance(patch._models, tuple)
    grown = patch.with_subjects([patch.subjects[0]], [object()])
    assert grown is not patch and len(patch.subjects) == 1 and len(patch.models()) == 1
    assert len(grown.subjects) == 2 and len(grown.models()) == 2


# ------------------------------------------------------------------------------------------------
# .to(device) from worker threads (0.23 on), cleanup() after sampling (0.17 on)


def tiny_binding(mask: bool = True) -> tuple[NestedAttentionPatch, SubjectBinding]:
    layer = LayerSpec("input", 4, 0, 32)
    qformer = QFormerConfig(clip_dim=8, dim=8, depth=1, heads=1, dim_head=8, num_queries=2, output_dim=16)
    torch.manual_seed(0)
    encoder = NestedEncoder(EncoderConfig(layers=(layer,), qformer=qformer))
    binding = SubjectBinding(encoder=encoder, tokens=torch.randn(1, 2, 16), positions=(1,), prompt_tokens=77,
                             mask=torch.rand(8, 8) if mask else None, sigma_start=20.0, sigma_end=0.5)
    return NestedAttentionPatch(layer, 0, [binding]), binding


def attn2_call(patch: NestedAttentionPatch) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(2, 16, 32, generator=generator)
    k = torch.randn(2, 77, 32, generator=generator)
    v = torch.randn(2, 77, 32, generator=generator)
    options = {"n_heads": 2, "cond_or_uncond": [0, 1], "sigmas": torch.tensor([3.0, 3.0]),
               "activations_shape": (2, 32, 4, 4)}
    return patch(q, k, v, options)


def test_to_from_worker_threads_never_breaks_a_model_that_is_sampling():
    # Readers sample through the patch while other threads move it between device types (each move drops
    # the other type's caches), as several models sharing one subject do on several GPUs. A tiny switch
    # interval makes the threads interleave inside the cache code.
    patch, _binding = tiny_binding()
    reference = attn2_call(patch)
    errors, results = [], []
    stop = threading.Event()

    def reader():
        try:
            for _ in range(150):
                results.append(attn2_call(patch))
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    def mover(device):
        try:
            while not stop.is_set():
                patch.to(device)
                patch.to(CPU)
                patch.cleanup()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        readers = [threading.Thread(target=reader) for _ in range(3)]
        movers = [threading.Thread(target=mover, args=(torch.device(d),)) for d in ("meta", "cuda")]
        for t in readers + movers:
            t.start()
        for t in readers:
            t.join()
        stop.set()
        for t in movers:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert len(results) == 450 and all(torch.equal(r, reference) for r in results)


def test_to_another_gpu_keeps_the_entries_of_the_gpus_other_models_sample_on():
    patch, binding = tiny_binding()
    attn2_call(patch)
    for index in (0, 1):  # as if cached by a model on each of two GPUs
        binding._kv[(0, torch.device("cuda", index), torch.float16)] = (None, None)
    assert patch.to(torch.device("cuda", 1)) is patch
    assert sorted(str(k[1]) for k in binding._kv) == ["cuda:0", "cuda:1"]
    assert binding._positions == {} and binding._masks == {}  # the CPU's went with the move to a GPU


def test_cleanup_lets_go_of_the_runs_sigmas_and_keeps_the_caches():
    patch, binding = tiny_binding()
    reference = attn2_call(patch)
    kv, masks, positions = dict(binding._kv), dict(binding._masks), dict(binding._positions)
    assert binding._sigma[0] is not None
    patch.cleanup()
    assert binding._sigma[0] is None
    assert binding._kv == kv and binding._masks == masks and binding._positions == positions
    assert torch.equal(attn2_call(patch), reference)


def test_comfy_calls_cleanup_after_sampling_where_it_does_and_a_shared_subject_samples_the_same(
    pack, tiny_unet, tiny_clip, pet, person, monkeypatch
):
    negative = tiny_models.encode_text(tiny_clip, "")
    first, conditioning = apply(pack, tiny_unet, tiny_clip, pet, TEXT)
    second, _ = apply(pack, first, tiny_clip, person, TEXT)  # shares the pet's binding with `first`
    reference = sample(first, conditioning, negative)

    cleaned = []
    original = NestedAttentionPatch.cleanup

    def counting(self):
        cleaned.append(self)
        original(self)

    monkeypatch.setattr(NestedAttentionPatch, "cleanup", counting)
    # The chained model's patches are cleaned up at every evaluation of the first model.
    during = first.clone()

    def wrapper(apply_model, args):
        for patch in attn2_replacements(second).values():
            patch.cleanup()
        return apply_model(args["input"], args["timestep"], **args["c"])

    during.set_model_unet_function_wrapper(wrapper)
    cleaned.clear()
    assert torch.equal(sample(during, conditioning, negative), reference)
    assert len(cleaned) >= len(attn2_replacements(second))

    cleaned.clear()
    assert torch.equal(sample(first, conditioning, negative), reference)
    # 0.17 on: ModelPatcher.cleanup() calls each patch's cleanup() (model_patches_call_function).
    calls_cleanup = hasattr(comfy.model_patcher.ModelPatcher, "model_patches_call_function")
    expected = {id(p) for p in attn2_replacements(first).values()} if calls_cleanup else set()
    assert {id(p) for p in cleaned} == expected
    binding = next(iter(attn2_replacements(first).values())).subjects[0]
    if calls_cleanup:
        assert binding._sigma[0] is None  # the finished run's sigmas are not kept alive
    assert len(binding._kv) == len(attn2_replacements(first))  # K~/V~ stay for the next run


# ------------------------------------------------------------------------------------------------
# clip_preprocess moved to comfy.clip_model (0.8)


def test_clip_preprocess_comes_from_where_this_comfyui_defines_it(monkeypatch):
    from training.data.dataset import comfy_clip_preprocess

    if hasattr(comfy.clip_model, "clip_preprocess"):
        assert comfy_clip_preprocess() is comfy.clip_model.clip_preprocess
    else:
        assert comfy_clip_preprocess() is comfy.clip_vision.clip_preprocess
    old = comfy.clip_vision.clip_preprocess
    monkeypatch.delattr(comfy.clip_model, "clip_preprocess", raising=False)
    assert comfy_clip_preprocess() is old  # a ComfyUI before 0.8
    monkeypatch.delattr(comfy.clip_vision, "clip_preprocess")
    with pytest.raises(ImportError, match="neither in comfy.clip_model nor in comfy.clip_vision"):
        comfy_clip_preprocess()


def test_prepare_clip_input_is_what_encode_image_feeds_the_tower():
    from PIL import Image

    from training.data.dataset import prepare_clip_input

    array = torch.randint(0, 256, (40, 56, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    image = array.float() / 255  # (H, W, 3), what ComfyUI's LoadImage makes of the photo
    pixels = prepare_clip_input(Image.fromarray(array.numpy()), 32)
    # Reference: centre square of the shorter side, bicubic to 32 (ComfyUI's crop=True), in [0, 1].
    assert pixels.shape == (32, 32, 3)
    assert pixels.min() >= 0 and pixels.max() <= 1
    expected = comfy_clip_preprocess_reference(image, 32)
    torch.testing.assert_close(pixels, expected, atol=1 / 255 + 1e-6, rtol=0)


def comfy_clip_preprocess_reference(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the shorter side is `size`, bicubic with antialias, centre crop, round to 8 bits."""
    h, w = image.shape[:2]
    scale = size / min(h, w)
    nh, nw = round(h * scale), round(w * scale)
    x = image.movedim(-1, 0)[None]
    x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[0, :, top : top + size, left : left + size]
    return torch.clip(torch.round(x * 255), 0, 255).movedim(0, -1) / 255


# ------------------------------------------------------------------------------------------------
# A node's validate_inputs must return exactly True when valid (pack_helpers.validate_inputs runs ComfyUI's
# own execution.validate_inputs)


def _validating(returns, seen: list | None = None, signature: str = "encoder_name"):
    """A V3 node with a combo and an INT input whose validate_inputs names `signature` (records its
    arguments in `seen`) and returns `returns`."""
    seen = [] if seen is None else seen

    class Validating(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="Validating", inputs=[
                io.Combo.Input("encoder_name", options=["x"]), io.Int.Input("steps", default=1, min=1, max=4),
            ])

        @classmethod
        def execute(cls, encoder_name, steps):
            return io.NodeOutput()

    def named(cls, encoder_name):
        seen.append({"encoder_name": encoder_name})
        return returns

    def anything(cls, **values):
        seen.append(values)
        return returns

    Validating.validate_inputs = classmethod(named if signature == "encoder_name" else anything)
    return Validating


@pytest.mark.parametrize("value", [1, "ok", "", None, [], (True,), False])
def test_comfy_refuses_a_validate_inputs_result_that_is_not_exactly_true(value):
    assert validate_inputs(_validating(True), encoder_name="x", steps=2) is True
    result = validate_inputs(_validating(value), encoder_name="x", steps=2)
    assert isinstance(result, str) and "Custom validation failed for node: encoder_name" in result, result
    with pytest.raises(AssertionError, match="ComfyUI refuses"):
        assert_inputs_valid(_validating(value), encoder_name="x", steps=2)


def test_comfy_gives_validate_inputs_what_its_signature_names_and_checks_the_rest_itself():
    seen = []
    assert validate_inputs(_validating(True, seen), encoder_name="not a choice", steps=2) is True
    too_many = validate_inputs(_validating(True, seen), encoder_name="x", steps=9)
    assert "Value 9 bigger than max of 4" in too_many, too_many
    # **values takes every input, and ComfyUI then checks none of them itself.
    assert validate_inputs(_validating(True, seen, "**values"), encoder_name="x", steps=9) is True
    assert seen == [{"encoder_name": "not a choice"}, {"encoder_name": "x"},
                    {"encoder_name": "x", "steps": 9}]


def test_every_node_passes_comfy_validation_with_its_default_widget_values(
    pack, save_tiny_encoder, load_handle, tmp_path, monkeypatch
):
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path / "output"))
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path / "input"))
    handle = load_handle(seed=5)
    run_node(pack, "NestedAttentionSaveSubject", subject=encode_subject(pack, handle),
             filename_prefix="nested_attention_subjects/s")
    for name, node in pack.mappings.items():
        values = {}
        for input_name, spec in input_specs(node).items():
            choices = combo_choices(spec)
            if choices is not None:  # a combo: its first choice
                assert choices, f"{name}.{input_name} lists no choices; give this test a valid value for it"
                values[input_name] = choices[0]
            elif "default" in spec[1]:
                values[input_name] = spec[1]["default"]
            elif spec[0] == "STRING":  # a text box without a default sends ""
                values[input_name] = ""
        assert_inputs_valid(node, **values)


# ------------------------------------------------------------------------------------------------
# The global attention override reaches every attention the patch computes


def test_the_attention_override_wraps_every_attention_of_the_patch(pack, tiny_unet, tiny_clip, pet):
    """An attention-backend node's override must see the subject rows' text attention (widened heads), each nested
    attention over K~, V~ and the other rows' attention, at every patched layer; where no override is set (every
    other test), the patch runs as it does."""
    patched, positive = apply(pack, tiny_unet, tiny_clip, pet, "a photo of a pet")
    negative = tiny_models.encode_text(tiny_clip, "")
    reference = sample(patched, positive, negative)
    seen = []

    def backend(q, k, v, heads, *args, **kwargs):  # an attention backend: records, then computes as ComfyUI would
        options = kwargs.get("transformer_options") or {}
        seen.append((options.get("block"), options.get("block_index"), q.shape[0], k.shape[1], k.shape[2] // heads))
        return comfy.ldm.modules.attention.optimized_attention(q, k, v, heads, *args, **kwargs)

    overridden = patched.clone()
    if hasattr(overridden, "set_model_optimized_attention"):  # 0.33: how attention-backend nodes set it
        overridden.set_model_optimized_attention(backend)
    else:  # 0.3.75 has no setter, but its wrap_attn honours the key the same way
        overridden.model_options["transformer_options"]["optimized_attention_override"] = (
            lambda attention, *args, **kwargs: backend(*args, **kwargs)
        )
    assert torch.equal(sample(overridden, positive, negative), reference)  # the same attention, through the override

    layers = {(key[0], key[1], key[2]) for key in attn2_replacements(patched)}
    m = pet.tokens.shape[1]
    dim_head = 16  # the tiny UNet's num_head_channels
    for block, number, index in layers:
        calls = [c[2:] for c in seen if c[0] == (block, number) and c[1] == index]
        assert (1, m, dim_head) in calls  # the subject row's nested attention over its M tokens
        assert (1, 77, dim_head + 8) in calls  # its text attention, heads widened by 8 columns
        assert (1, 77, dim_head) in calls  # the unconditional row's plain attention
