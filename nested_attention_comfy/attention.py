"""Host attention: ComfyUI's own cross-attention, as the patch's base attention."""

from __future__ import annotations

import comfy.ldm.modules.attention
import torch


def comfy_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, extra_options: dict
) -> torch.Tensor:
    """ComfyUI's own cross-attention, called exactly as CrossAttention.forward calls it."""
    # Looked up at call time: ComfyUI picks the implementation at start-up from its arguments.
    return comfy.ldm.modules.attention.optimized_attention(
        q, k, v, heads, attn_precision=extra_options.get("attn_precision"), transformer_options=extra_options
    )
