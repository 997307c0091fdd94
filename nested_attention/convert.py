"""python -m nested_attention.convert IN OUT: any supported weight file -> the pack's own format.

Reads the pack's files, IP-Adapter Plus SDXL files and IP-Adapter-derived layouts (the authors' release),
and writes a nested attention encoder (.safetensors with the config in its metadata) that loads without any
guessing. `--config-from` restores the metadata of a pack file that a merge or convert tool dropped, from
another file of the same training run. Core module: no ComfyUI import.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

from .encoder import HIDDEN_LAYERS
from .formats import FORMAT, NestedWeightsError, load_planned, plan_encoder, read_header
from .weights import save_encoder

DTYPES = {"keep": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m nested_attention.convert", description=__doc__.splitlines()[0])
    parser.add_argument("input", help="The file to convert (.safetensors of any supported layout).")
    parser.add_argument("output", help="Where to write the encoder in the pack's format (.safetensors).")
    parser.add_argument("--dim-head", type=int, default=None,
                        help="Width of one Resampler attention head; shapes fix only heads x dim_head. Default 64, "
                        "as in every IP-Adapter Resampler.")
    parser.add_argument("--hidden-layer", choices=sorted(HIDDEN_LAYERS), default=None,
                        help="Which CLIP vision hidden layer the encoder reads; default: what the layout implies "
                        "(penultimate for IP-Adapter Plus and the layouts derived from it).")
    parser.add_argument("--token", default=None, help="Default subject word written into the config (e.g. 'person', 'dog').")
    parser.add_argument("--domain", default=None, help="Domain name written into the config (e.g. 'faces').")
    parser.add_argument("--alpha", type=float, default=None, help="Norm regularization alpha (default 2.0).")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="keep", help="Tensor dtype of the output file.")
    parser.add_argument("--config-from", default=None, metavar="FILE",
                        help="For a file in this pack's layout whose metadata was dropped: take the config from FILE "
                        "(an export or checkpoint encoder of the same training run); every tensor's shape is "
                        "checked against it.")
    parser.add_argument("--force", action="store_true", help="Overwrite OUTPUT if it exists.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.path.exists(args.output) and not args.force:
        print(f"{args.output} exists; pass --force to overwrite it.", file=sys.stderr)
        return 2
    try:
        header = read_header(args.input)
        config = None
        if args.config_from:
            if header.metadata.get("format") == FORMAT:
                raise NestedWeightsError(f"{header.name} has its own config; --config-from is for a file of this "
                                         "pack whose metadata was dropped.")
            donor = read_header(args.config_from)
            if donor.metadata.get("format") != FORMAT:
                raise NestedWeightsError(f"--config-from {donor.name} has no config of this pack in its metadata; "
                                         "give a file exported by the trainer.")
            config = plan_encoder(donor).config
        plan = plan_encoder(header, dim_head=args.dim_head, hidden_layer=args.hidden_layer, config=config)
        for field, value in (("token", args.token), ("domain", args.domain), ("alpha", args.alpha)):
            if value is not None:
                setattr(plan.config, field, value)
        encoder = load_planned(args.input, plan, dtype=DTYPES[args.dtype])
    except NestedWeightsError as e:
        print(f"cannot convert: {e}", file=sys.stderr)
        return 1
    extra = {"converted_from": header.name, "source_format": plan.format}
    if args.config_from:
        extra["config_from"] = os.path.basename(args.config_from)
    save_encoder(args.output, encoder, extra=extra)
    c = encoder.config
    print(f"{header.name} ({plan.format}) -> {args.output}: domain {c.domain!r}, token {c.token!r}, "
          f"M={c.num_tokens}, {len(c.layers)} layers, CLIP {c.clip_vision.name} ({c.clip_vision.hidden_layer} "
          f"hidden layer), licence {c.licence or 'unknown'}")
    for note in plan.notes:
        print(f"  note: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
