"""The benchmark: nested attention's cost next to plain SDXL and an IP-Adapter-style injection.

    python -m benchmark                   # CPU: 512x512, float32
    python -m benchmark --device cuda     # GPU: 1024x1024, float16

One run, one machine. The full-size SDXL UNet (ComfyUI's own classes, random weights) is called as
ComfyUI's sampler calls it for one step with classifier-free guidance: cond and uncond in one batch
of 2. Variants:
  - plain SDXL;
  - nested attention, one subject with M = 256 and M = 1024 tokens, installed exactly as the Apply
    node installs it (one `SubjectBinding`, a `NestedAttentionPatch` on each of the 70 layers, host
    attention = ComfyUI's `optimized_attention`), and beside each the previous implementation on the
    same subject ("(previous)", benchmark/previous.py), so before and after come from one run;
  - an IP-Adapter-style decoupled cross-attention over 16 image tokens on every row, K/V projected
    on every call as IP-Adapter does.
Each measured overhead sits next to its FLOP floor (4 N M D per layer; docs/ARCHITECTURE.md,
Performance model) and next to the FLOPs torch's counter sees for the variant on the meta device,
at the run's resolution and at 1024x1024. Also measured: the 70 cross-attention calls alone (less
noisy than whole steps) beside the nested SDPA alone (the subject row's attention over its M tokens:
what the floor counts, so where this machine's kernels put the limit); per attn2 call at 1024x1024's
widest layer, counted on meta, the kernel launches, device syncs and peak memory; the Encode
node's seconds per photo for 1 and 4 photos (IP-Adapter Plus layout, M = 256, M = 1024) and the
K~/V~ projections at Apply; the K~/V~ cache; peak memory per variant; K~/V~ projections per step (0
after the first); the tiny trainer's command line and the trainer's step on the full-size UNet, with
the share of a step outside the frozen UNet and its AdamW step.

Output: a table on stdout and a JSON file (default runs/benchmark/benchmark.json).

Modules: `workload` (ComfyUI's set-up, one CFG step), `variants` (what is compared), `counters`
(FLOPs, projections, syncs and launches, memory), `timing`, `trainer` (throughput), `run` (one
whole run), `report` (the table), `cli`. Models with random weights come from the builders the test
bed shares (training/tiny/models.py). Importing this package imports neither ComfyUI nor the trainer.
"""
