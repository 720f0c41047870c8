"""`quick convert CHECKPOINT OUT`: repack a 4-bit checkpoint (AutoAWQ GEMM, compressed-tensors W4A16, GPTQ, or
QUICK) into a QUICK one, exactly (no requantization)."""

from __future__ import annotations

import argparse

NAME = "convert"
HELP = (
    "repack a 4-bit checkpoint (AutoAWQ GEMM, compressed-tensors W4A16, GPTQ) into a QUICK layout "
    "(no recalibration, bit-exact weights)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src",
        metavar="CHECKPOINT",
        help="checkpoint directory: AutoAWQ (version 'gemm'), compressed-tensors 'pack-quantized' W4A16, GPTQ "
        "(gptq / gptq_v2, act-order included) or QUICK; the format is read from config.json's quantization_config",
    )
    parser.add_argument("out", metavar="OUT", help="output directory (written atomically)")
    parser.add_argument("--layout", default=None, help="target layout (default: the preferred one, 'quick')")
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the SHA-256 check of a QUICK checkpoint's shards (only for files you trust)",
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from quick.auto import _load_tokenizer
    from quick.checkpoint import load_quantized, make_quant_config, preferred_layout, processor_files, save_quantized

    src = Path(args.src)
    layout = args.layout or preferred_layout(torch.device("cpu"))
    # Dense tensors keep the stored dtype (dtype=None) and packed tensors are only repacked, so the
    # converted checkpoint holds exactly the same weights.
    model = load_quantized(src, device="cpu", layout=layout, verify=not args.no_verify)
    src_qc = model.quick_source_quant_config
    qc = make_quant_config(
        layout,
        model.quick_quant_config["group_size"],
        bool(model.quick_quant_config.get("zero_point", True)),
        model.quick_quant_config.get("modules_to_not_convert") or ("lm_head",),
    )
    out = save_quantized(model, args.out, qc, tokenizer=_load_tokenizer(src), extra_files=processor_files(src))
    from quick.nn.moe import QuickExpertStack

    packed = [m for m in model.modules() if hasattr(m, "qweight")]
    stacks = sum(isinstance(m, QuickExpertStack) for m in packed)
    extra = f" and {stacks} expert stacks" if stacks else ""
    what = getattr(model, "quick_source_format", None) or f"{src_qc.get('quant_method')}/{src_qc.get('version')}"
    print(f"repacked {len(packed) - stacks} layers{extra} of {src} ({what}) into '{layout}' at {out}")
    return 0
