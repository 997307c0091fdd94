"""Subjects that nothing references any more are freed, with their K~/V~ caches (weak-reference counts).

Through the Apply node (pack_helpers.run_node) and ComfyUI's real sampler, which fills each subject's K~/V~
cache and registers the patched model with ComfyUI's memory management. The soak (tests/e2e/soak.py) counts
the same in a running server after ComfyUI lets go of its caches.
"""

from __future__ import annotations

import gc
import weakref

from pack_helpers import apply, encode_subject

from nested_attention_comfy.model import attn2_replacements

LAYER = ("input", 4, 0)


def test_kv_caches_of_subjects_no_longer_referenced_are_freed(pack, tiny_unet, tiny_clip, load_handle, encode,
                                                              sample):
    handle = load_handle()
    negative = encode(tiny_clip, "")
    refs, kept = [], {}
    for i in range(5):
        subject = encode_subject(pack, handle, seed=i)
        model, conditioning = apply(pack, tiny_unet, tiny_clip, subject, "a photo of a pet", lambda_=1.0 + i)
        if i == 3:  # a chained model on top of subject 3's: it holds both subjects
            other = encode_subject(pack, handle, seed=10)
            model, conditioning = apply(pack, model, tiny_clip, other, "a photo of a pet", token="photo")
        sample(model, conditioning, negative, seed=0, steps=1)
        bindings = attn2_replacements(model)[LAYER].subjects
        assert all(b._kv for b in bindings)  # sampling filled the caches
        refs.append([(weakref.ref(b), [weakref.ref(t) for kv in b._kv.values() for t in kv]) for b in bindings])
        if i == 1:  # still referenced: its subject must stay, cache and all
            kept.update(model=model, conditioning=conditioning)
        del model, conditioning, bindings, subject
    gc.collect()

    def alive(i: int) -> list[bool]:
        return [binding() is not None for binding, _ in refs[i]]

    assert [alive(i) for i in range(5)] == [[False], [True], [False], [False, False], [False]]
    assert all(t() is not None for t in refs[1][0][1])
    assert all(t() is None for i in (0, 2, 3, 4) for _, kv in refs[i] for t in kv)
    # The subject still referenced samples again from the same cached K~/V~ tensors.
    sample(kept["model"], kept["conditioning"], negative, seed=0, steps=1)
    (binding,) = attn2_replacements(kept["model"])[LAYER].subjects
    assert binding is refs[1][0][0]()
    assert [id(t) for kv in binding._kv.values() for t in kv] == [id(t()) for t in refs[1][0][1]]
