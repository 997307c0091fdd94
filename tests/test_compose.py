"""Nested attention on top of another pack's attn2 patch (IPAdapter_plus, InstantID, PuLID), in both node orders.

The other pack is the stand-in of tests/other_packs.py (their shared contract); tests/e2e/test_other_packs_e2e.py
runs the real IPAdapter_plus through a server. Expected values come from the float64 references: the paper's
per-query nested attention (nested_attention/reference.py) plus the other pack's own term, written out here.
"""

from __future__ import annotations

import copy
from collections import Counter

import comfy.model_management
import pytest
import tiny_models
import torch
import torch.nn.functional as F
from other_packs import (
    OtherPackPatch,
    image_kwargs,
    install_like_other_packs,
    reference_their_term,
    same_state,
    state,
    with_other_pack,
)
from pack_helpers import apply
from torch.overrides import TorchFunctionMode

from benchmark import counters, workload
from nested_attention import (
    EncoderConfig,
    LayerSpec,
    NestedEncoder,
    NestedSubject,
    QFormerConfig,
    nested_attention,
    unet_layers,
)
from nested_attention.patch import (
    NestedAttentionPatch,
    NestedOrderError,
    SubjectBinding,
    plain_host_attention,
)
from nested_attention.reference import reference_nested_attention
from nested_attention_comfy.model import attn2_replacements

PROMPT = "a photo of a pet"
LAYER = LayerSpec("input", 4, 0, 32)
HEADS = 2
TOL = {"atol": 2e-5, "rtol": 1e-4}  # float32 against the float64 reference, as tests/test_attention.py
COND, UNCOND = [2, 3], [0, 1]  # rows of the batch below: ComfyUI's chunks [uncond, cond], two images each
CPU, META = torch.device("cpu"), torch.device("meta")


# ------------------------------------------------------------------------------------------------
# One layer, against the references


def binding(seed: int, positions: tuple, lam: float = 1.0, masked: bool = False, **kwargs) -> SubjectBinding:
    qformer = QFormerConfig(clip_dim=8, dim=8, depth=1, heads=1, dim_head=8, num_queries=3, output_dim=16)
    torch.manual_seed(seed)
    encoder = NestedEncoder(EncoderConfig(layers=(LAYER,), qformer=qformer))
    # A region at the layer's own 4 x 4 grid (so resizing it is the identity), zero on part of it.
    mask = (torch.rand(4, 4) * (torch.rand(4, 4) > 0.3)) if masked else None
    return SubjectBinding(encoder=encoder, tokens=torch.randn(1, 3, 16), positions=positions, prompt_tokens=77,
                          lam=lam, alpha=2.0, mask=mask, **kwargs)


def reference_subject(b: SubjectBinding) -> NestedSubject:
    """What a binding means at LAYER, built from its fields: K~ = E W_K~^T, V~ = E W_V~^T, the region as weights."""
    proj = b.encoder.projections[0]
    with torch.no_grad():
        key, value = b.tokens[0] @ proj.to_k.weight.T, b.tokens[0] @ proj.to_v.weight.T
    weight = None if b.mask is None else b.mask.flatten()
    return NestedSubject(key, value, torch.tensor(b.positions), lam=b.lam, alpha=b.alpha, region_weight=weight)


def their_patch(dim: int = 32) -> OtherPackPatch:
    """Two of the other pack's nodes on one layer: the first sets the patch, the second adds to it."""
    theirs = OtherPackPatch(**image_kwargs(dim, context=24, tokens=5, seed=11))
    theirs.add(theirs.callbacks[0], **image_kwargs(dim, context=24, tokens=6, weight=0.5, seed=12))
    return theirs


def layer_call(flags=(1, 0), batch: int = 4, device: torch.device = CPU) -> tuple:
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(batch, n, LAYER.dim, generator=g).to(device) for n in (16, 77, 77))
    extra = {"n_heads": HEADS, "cond_or_uncond": list(flags), "sigmas": torch.full((batch,), 3.0, device=device),
             "activations_shape": (batch, LAYER.dim, 4, 4)}
    return q, k, v, extra


SUBJECTS = {  # lambda of each subject; the second (if any) sits at two positions of the prompt
    "one, λ = 1": (1.0,),
    "one, λ = 2.5": (2.5,),
    "two, λ = 1": (1.0, 1.0),
    "two, λ = 1 and 3": (1.0, 3.0),
}


@pytest.mark.parametrize("masked", [False, True], ids=["everywhere", "region mask"])
@pytest.mark.parametrize("lams", SUBJECTS.values(), ids=SUBJECTS.keys())
def test_on_another_packs_patch_the_output_is_nested_attention_plus_their_own_term_unchanged(lams, masked):
    bindings = [binding(10 + i, ((5,), (9, 30))[i], lam, masked=masked and i == 0) for i, lam in enumerate(lams)]
    theirs = their_patch()
    before = state(theirs)
    patch = NestedAttentionPatch(LAYER, 0, bindings, plain_host_attention, wrapped=theirs)
    q, k, v, extra = layer_call()

    out = patch(q, k, v, extra)
    assert same_state(state(theirs), before)
    their_term = reference_their_term(q, extra, theirs.kwargs)
    expected = reference_nested_attention(q, k, v, [reference_subject(b) for b in bindings], heads=HEADS, rows=COND)
    torch.testing.assert_close(out[COND].double(), (expected + their_term)[COND], **TOL)
    # The unconditional rows are the other pack's output, bit for bit.
    assert torch.equal(out[UNCOND], theirs(q, k, v, extra)[UNCOND])
    # Their term does act, and so do ours.
    assert (their_term[COND].abs().amax() > 1e-2) and ((out[COND] - theirs(q, k, v, extra)[COND]).abs().amax() > 1e-3)


def test_above_lambda_1_their_output_is_no_base_for_the_efficient_form():
    """Why λ > 1 costs one more plain attention: with base = theirs the efficient form scales their term by r."""
    bindings = [binding(10, (5,), 3.0)]
    theirs = their_patch()
    q, k, v, extra = layer_call(flags=(0,), batch=2)
    subjects = [reference_subject(b) for b in bindings]
    expected = reference_nested_attention(q, k, v, subjects, heads=HEADS) + reference_their_term(q, extra, theirs.kwargs)
    naive = nested_attention(q, k, v, subjects, heads=HEADS, base=theirs(q, k, v, extra))
    assert (naive.double() - expected).abs().amax() > 100 * TOL["atol"]
    out = NestedAttentionPatch(LAYER, 0, bindings, plain_host_attention, wrapped=theirs)(q, k, v, extra)
    torch.testing.assert_close(out.double(), expected, **TOL)


@pytest.mark.parametrize("lam", [1.0, 2.5])
def test_rows_and_steps_without_the_subject_are_their_output_bit_for_bit(lam):
    theirs = their_patch()
    late = binding(10, (5,), lam, masked=True, sigma_start=2.0)  # the calls below are at sigma 3
    early = binding(11, (7,), lam)
    q, k, v, extra = layer_call()
    assert torch.equal(NestedAttentionPatch(LAYER, 0, [late], wrapped=theirs)(q, k, v, extra), theirs(q, k, v, extra))
    only_uncond = layer_call(flags=(1,), batch=2)
    assert torch.equal(NestedAttentionPatch(LAYER, 0, [early], wrapped=theirs)(*only_uncond), theirs(*only_uncond))


def counting_host(calls: list):
    def host(q, k, v, heads, extra_options):
        calls.append(k.shape[1])
        return plain_host_attention(q, k, v, heads, extra_options)

    return host


@pytest.mark.parametrize("lam", [1.0, 2.5])
def test_on_their_patch_every_lambda_adds_only_our_own_attentions_all_through_the_host(lam):
    theirs = their_patch()
    q, k, v, extra = layer_call()
    calls: list = []
    wrapped = NestedAttentionPatch(LAYER, 0, [binding(10, (5,), lam)], counting_host(calls), wrapped=theirs)
    alone = NestedAttentionPatch(LAYER, 0, [binding(10, (5,), lam)], counting_host([]))
    wrapped(q, k, v, extra)
    # The host attention (ComfyUI's, with its override): the subject row's text attention with widened heads
    # (P V and P[s] together), then the nested attention over the 3 tokens; no plain attention beside them.
    alone_calls: list = []
    NestedAttentionPatch(LAYER, 0, [binding(10, (5,), lam)], counting_host(alone_calls))(q, k, v, extra)
    assert calls == [77, 3] and alone_calls == [77, 3, 77]  # alone, the unconditional row's own attention too

    def attentions(fn) -> Counter:
        """The attention kernels `fn` runs, by the number of keys each attends over."""
        seen = Counter()

        class Recorder(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func is F.scaled_dot_product_attention:
                    seen[args[1].shape[-2]] += 1
                return func(*args, **(kwargs or {}))

        with Recorder():
            fn()
        return seen

    ours, theirs_alone = attentions(lambda: alone(q, k, v, extra)), attentions(lambda: theirs(q, k, v, extra))
    # Alone: the subject row's widened text attention, v*, the unconditional row's text attention. Theirs: PV, X.
    assert ours == Counter({77: 2, 3: 1}) and theirs_alone == Counter({77: 1, 5: 1, 6: 1})
    # On their patch, at every λ: theirs, then ours for the subject row only (their output is the other row's).
    assert attentions(lambda: wrapped(q, k, v, extra)) == theirs_alone + Counter({77: 1, 3: 1})


@pytest.mark.parametrize("lam", [1.0, 2.5])
def test_a_warm_call_on_another_packs_patch_never_waits_for_the_device(lam):
    """On meta, as the benchmark counts: no read-back and no blocking copy from host memory per attn2 call."""
    b = binding(10, (5,), lam, masked=True)
    b.encoder.to(META)
    b.tokens = b.tokens.to(META)
    theirs = OtherPackPatch(**{k: v.to(META) if isinstance(v, torch.Tensor) else v
                               for k, v in image_kwargs(LAYER.dim, seed=11).items()})
    q, k, v, extra = layer_call(device=META)
    with workload.comfy_sdpa_attention():
        patch = NestedAttentionPatch(LAYER, 0, [b], workload.host_attention(), wrapped=theirs)
        work = counters.device_work_per_call(lambda: patch(q, k, v, extra))
    assert work["syncs"] == []
    assert "nonzero" not in work["kernels"]


# ------------------------------------------------------------------------------------------------
# ComfyUI's calls on patches reach the wrapped one


class RecordingPatch(OtherPackPatch):
    """The stand-in with the optional parts of ComfyUI's patch protocol, logging each call to `log`."""

    def __init__(self, log: list, moved_to: RecordingPatch | None = None, **kwargs):
        super().__init__(**kwargs)
        self.log, self.moved_to = log, moved_to

    def to(self, device, *args, **kwargs):
        self.log.append(("to", device))
        return self if self.moved_to is None or isinstance(device, torch.dtype) else self.moved_to

    def models(self) -> list:
        return ["their model"]

    def cleanup(self) -> None:
        self.log.append(("cleanup",))


def test_comfys_to_models_and_cleanup_reach_the_wrapped_patch():
    log: list = []
    b = binding(10, (5,))
    theirs = RecordingPatch(log, **image_kwargs(LAYER.dim))
    patch = NestedAttentionPatch(LAYER, 0, [b], models=["encoder"], wrapped=theirs)
    assert patch.to(torch.float16) is patch and patch.to(torch.device("cpu")) is patch
    patch.cleanup()
    assert log == [("to", torch.float16), ("to", torch.device("cpu")), ("cleanup",)]
    assert patch.models() == ["encoder", "their model"]

    # Where their `to` answers with another object, ComfyUI puts ours in the layer's place: a new patch around it.
    moved = RecordingPatch([], **image_kwargs(LAYER.dim))
    theirs.moved_to = moved
    new = patch.to(torch.device("meta"))
    assert new is not patch and new.wrapped is moved and new.subjects == patch.subjects
    assert patch.wrapped is theirs  # the patch that was there is not changed


def test_a_deep_copy_shares_the_wrapped_patch():
    """What clone() does to model_options up to ComfyUI 0.13: a new patch, the same subjects and wrapped patch."""
    theirs = their_patch()
    patch = NestedAttentionPatch(LAYER, 0, [binding(10, (5,))], wrapped=theirs)
    copied = copy.deepcopy({"attn2": {LAYER.key: patch}})["attn2"][LAYER.key]
    assert copied is not patch and copied.wrapped is theirs and copied.subjects == patch.subjects


# ------------------------------------------------------------------------------------------------
# Through the nodes and ComfyUI's real sampler on the tiny models


def sample(model, positive, negative) -> torch.Tensor:
    return tiny_models.sample(model, positive, negative, 0, steps=2, size=16)


@pytest.mark.parametrize("lambda_", [1.0, 2.0])
def test_apply_after_another_pack_builds_on_its_patches_and_never_changes_them(
    pack, tiny_unet, tiny_clip, pet, lambda_
):
    negative = tiny_models.encode_text(tiny_clip, "")
    theirs = with_other_pack(tiny_unet)
    their_patches = dict(attn2_replacements(theirs))
    before = {key: state(p) for key, p in their_patches.items()}
    positive = tiny_models.encode_text(tiny_clip, PROMPT)
    their_image = sample(theirs, positive, negative)

    both, conditioning = apply(pack, theirs, tiny_clip, pet, PROMPT, lambda_=lambda_)
    nested_only, _ = apply(pack, tiny_unet, tiny_clip, pet, PROMPT, lambda_=lambda_)
    # From ComfyUI 0.14 on clone() shares their object, and ours wraps it; up to 0.13 clone() deep-copies it
    # first, and ours wraps the copy.
    shares = all(p is their_patches[key] for key, p in attn2_replacements(theirs.clone()).items())
    for key, patch in attn2_replacements(both).items():
        assert isinstance(patch, NestedAttentionPatch) and type(patch.wrapped) is OtherPackPatch
        assert (patch.wrapped is their_patches[key]) == shares
        assert torch.equal(patch.wrapped.kwargs[0]["to_k"], their_patches[key].kwargs[0]["to_k"])
    image = sample(both, conditioning, negative)
    comfy.model_management.load_models_gpu([both])  # model_patches_to(...) reaches their patches too

    scale = image.abs().max()
    assert (image - their_image).abs().max() > 1e-3 * scale
    assert (image - sample(nested_only, conditioning, negative)).abs().max() > 1e-3 * scale
    # Their model and their patch objects are as they were.
    assert attn2_replacements(theirs) == their_patches
    assert all(same_state(state(p), before[key]) for key, p in their_patches.items())
    assert torch.equal(sample(theirs, positive, negative), their_image)


def test_their_nodes_after_apply_get_our_error_saying_to_put_them_before(pack, tiny_unet, tiny_clip, pet):
    patched, _ = apply(pack, tiny_unet, tiny_clip, pet, PROMPT)
    later = patched.clone()
    key = unet_layers(tiny_unet.model.diffusion_model)[0].key
    with pytest.raises(NestedOrderError, match=r"Put IPAdapter, InstantID and PuLID nodes before Apply Nested") as e:
        install_like_other_packs(later, key, **image_kwargs(LAYER.dim))
    assert isinstance(e.value, ValueError) and "other_packs.image_attention" in str(e.value)
    assert str(key) in str(e.value)


def test_a_layer_holding_something_that_is_no_patch_is_refused(pack, tiny_unet, tiny_clip, pet):
    other = tiny_unet.clone()
    other.set_model_attn2_replace("not a patch", "middle", 0, 1)
    with pytest.raises(pack.apply.NestedApplyError, match=r"\('middle', 0, 1\) of this model holds a builtins.str"):
        apply(pack, other, tiny_clip, pet, PROMPT)


def test_cloning_a_model_keeps_the_same_wrapped_patch_on_this_host(pack, tiny_unet, tiny_clip, pet):
    both, _ = apply(pack, with_other_pack(tiny_unet), tiny_clip, pet, PROMPT)
    key = next(iter(attn2_replacements(both)))
    assert attn2_replacements(both.clone())[key].wrapped is attn2_replacements(both)[key].wrapped
