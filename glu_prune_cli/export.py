"""``export``: a model, pruned or not, written as a GGUF file for llama.cpp."""

from __future__ import annotations

import argparse
from pathlib import Path

from calibrate.files import check_output
from calibrate.glu import glu_layers
from calibrate.models import load_model
from pruning.export_gguf import KQUANTS, OUTTYPES, export_gguf, outtype_of


def add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="model directory (pruned or not), .gguf file, hub id or alias")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--outtype", default="f16",
                   help=f"tensor type: {', '.join(OUTTYPES)} (default f16; k-quants such as q4_k_m: run "
                        f"llama.cpp's llama-quantize on an f16 export)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")


def run_export(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if args.outtype not in KQUANTS:  # a k-quant is refused once the widths are known (its note names them)
        outtype_of(args.outtype, out, [])
    check_output(out, args.force)
    model, tokenizer = load_model(args.model, device="cpu", dtype="float32")
    export_gguf(model, tokenizer, out, outtype=args.outtype, force=args.force)
    sizes = [layer.intermediate_size for layer in glu_layers(model)]
    widths = str(sizes[0]) if len(set(sizes)) == 1 else f"{min(sizes)}..{max(sizes)} (per layer)"
    print(f"wrote {out} ({args.outtype}, {len(sizes)} layers, GLU width {widths}, "
          f"{out.stat().st_size / 2**20:.1f} MiB)")
