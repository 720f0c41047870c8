"""`quick convert AWQ_CHECKPOINT OUT`: repack an AutoAWQ GEMM checkpoint into a QUICK one, exactly."""

from __future__ import annotations

import argparse

NAME = "convert"
HELP = "repack an AutoAWQ GEMM checkpoint into the QUICK layout (no recalibration, bit-exact weights)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="AWQ_CHECKPOINT", help="AutoAWQ checkpoint directory (version 'gemm')")
    parser.add_argument("out", metavar="OUT", help="output directory (written atomically)")
    parser.add_argument("--layout", default=None, help="target layout (default: the preferred one, 'quick')")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from quick.auto import _load_tokenizer
    from quick.checkpoint import load_quantized, make_quant_config, preferred_layout, save_quantized

    src = Path(args.src)
    layout = args.layout or preferred_layout(torch.device("cpu"))
    # Dense tensors keep the stored dtype (dtype=None) and packed tensors are only repacked, so the
    # converted checkpoint holds exactly the same weights.
    model = load_quantized(src, device="cpu", layout=layout)
    src_qc = model.quick_source_quant_config
    qc = make_quant_config(
        layout,
        model.quick_quant_config["group_size"],
        bool(src_qc.get("zero_point", True)),
        src_qc.get("modules_to_not_convert") or ("lm_head",),
    )
    out = save_quantized(model, args.out, qc, tokenizer=_load_tokenizer(src))
    n = sum(1 for m in model.modules() if hasattr(m, "qweight"))
    print(
        f"repacked {n} layers of {src} ({src_qc.get('quant_method')}/{src_qc.get('version')}) into '{layout}' at {out}"
    )
    return 0
