"""The ComfyUI glue that the nodes and the trainer share: one copy of everything that needs `comfy`.

The core package `nested_attention` is pure torch and never imports this package (tests/test_layers.py
walks every module's imports and proves it). The nodes (`nodes/`) and the trainer (`training/`) import the
modules below, so both call ComfyUI's attention the same way, read a CLIP vision tower the same way, bind the
subject to the same token of the same tokenizer stream, and install the same patch: what is trained is what
runs.

- `attention`: `comfy_attention`, ComfyUI's `optimized_attention` called as CrossAttention calls it.
- `model`: `check_sdxl`, `attn2_patches`, `attn2_replacements` and `install_subject` (the per-layer patch
  install).
- `sampling`: per sampling run, `sigma_window`, `add_capture`, `add_auto_regions` (ComfyUI's OUTER_SAMPLE
  wrapper `SamplingRunWrapper` makes each run's `nested_attention.capture.SamplingRun`).
- `clip_vision`: `clip_vision_spec`, `check_clip_vision`, `load_clip_vision`; photos -> tokens:
  `clip_vision_tokens`, `photo_tokens`.
- `words`: the subject word in ComfyUI's tokenizer: `subject_stream`, `word_token_ids`, `word_positions`,
  `locate_word` -> `TokenLocation`. The matching rule itself is the core's `nested_attention.tokens`.

Errors are ValueError subclasses whose messages are written for the person at the graph. A top-level package
beside `nested_attention` (not inside it) with a name of its own: ComfyUI's custom nodes share sys.modules.
"""
