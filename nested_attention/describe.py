"""python -m nested_attention.describe FILE: what a weight file is, and what the pack would make of it.

Prints the detected format, the key groups with their shapes, the derived encoder config and the
assumptions made; for a file the pack cannot read, the groups and the reason, so it can be reported.
Reads only the header: no tensor is loaded. Core module: no ComfyUI import.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

from .encoder import HIDDEN_LAYERS
from .formats import NestedWeightsError, plan_encoder, read_header, summarize_groups


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nested_attention.describe", description=__doc__.splitlines()[0])
    parser.add_argument("file", help="A .safetensors file.")
    parser.add_argument("--dim-head", type=int, default=None, help="Resampler head width to assume (default 64).")
    parser.add_argument("--hidden-layer", choices=sorted(HIDDEN_LAYERS), default=None,
                        help="CLIP vision hidden layer to assume.")
    args = parser.parse_args(argv)
    try:
        header = read_header(args.file)
    except NestedWeightsError as e:
        print(f"file: {args.file}\nerror: {e}")
        return 1
    size = os.path.getsize(args.file)
    print(f"file: {header.name} ({size / 2**20:.1f} MiB, {len(header.tensors)} tensors, dtypes "
          f"{sorted({t.dtype for t in header.tensors.values()})})")
    shown = {k: (v if len(v) <= 80 else v[:77] + "...") for k, v in header.metadata.items()}
    print(f"metadata: {json.dumps(shown, sort_keys=True) if shown else '(none)'}")
    print("key groups (digits shown as #):")
    for line in summarize_groups(header, limit=60):
        print(f"  {line}")
    try:
        plan = plan_encoder(header, dim_head=args.dim_head, hidden_layer=args.hidden_layer)
    except NestedWeightsError as e:
        print(f"format: not supported\nreason: {e}")
        return 1
    c = plan.config
    print(f"format: {plan.format}")
    print(f"encoder: domain {c.domain!r}, token {c.token!r}, alpha {c.alpha}, M={c.num_tokens}, "
          f"{len(c.layers)} cross-attention layers")
    print(f"source: {c.source or '(not recorded)'}\nlicence: {c.licence or '(not recorded)'}")
    print(f"config: {json.dumps(json.loads(c.to_json())['qformer'], sort_keys=True)}")
    print(f"clip vision: {c.clip_vision.describe()}; reads encode_image()['{c.clip_vision.output_key}'], "
          f"crop {c.clip_vision.crop}")
    for note in plan.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
