"""The prefix of every line the pack logs, so users find the pack's messages in ComfyUI's console and the
trainer's output. Defined here once; the nodes, the glue, the trainer and the benchmark import it."""

LOG_PREFIX = "[nested-attention]"
