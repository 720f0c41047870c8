"""`quick quantize MODEL OUT`: AWQ (default) or round-to-nearest 4-bit quantization to a checkpoint."""

from __future__ import annotations

import argparse

NAME = "quantize"
HELP = "quantize a Hugging Face causal LM to 4 bits (AWQ or RTN; W4A8: QQQ or RTN) and save a QUICK checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="dense Hugging Face directory, or 'smollm2' (bundled model)")
    parser.add_argument("out", metavar="OUT", help="output directory (written atomically)")
    parser.add_argument(
        "--method", default=None, choices=("awq", "rtn", "qqq"), help="default: awq (W4A16), qqq (W4A8)"
    )
    parser.add_argument(
        "--a-bit", type=int, default=None, choices=(8, 16), help="activation bits: 16 (default) or 8 (W4A8, QQQ)"
    )
    parser.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128, -1), help="default: 128")
    parser.add_argument("--no-zero-point", action="store_true", help="symmetric quantization (default: zero points)")
    parser.add_argument(
        "--version",
        default=None,
        help="storage layout: quick (default), quick_sm90, gemm (AutoAWQ format: every K a multiple of the group "
        "size, checked before calibrating), w4a8 (= --a-bit 8)",
    )
    parser.add_argument("--calib", metavar="FILE", help="calibration text file (default: Wikipedia calibration split)")
    parser.add_argument("--n-samples", type=int, default=128, help="calibration samples (default: 128)")
    parser.add_argument("--seqlen", type=int, default=512, help="calibration sample length in tokens (default: 512)")
    parser.add_argument(
        "--search-samples", type=int, default=None, help="samples for AWQ's attention/MLP grid search (default: all)"
    )
    parser.add_argument("--duo-scaling", action="store_true", help="AutoAWQ's x^r / w^(1-r) scale grid")
    parser.add_argument("--seed", type=int, default=0, help="calibration window seed (default: 0)")
    parser.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from quick.auto import AutoQuickForCausalLM, validate_quant_config
    from quick.formats.weights import QuantizationError

    w4a8 = args.a_bit == 8 or str(args.version).lower() == "w4a8"
    if w4a8:
        qc = {"w_bit": 4, "a_bit": args.a_bit or 8, "q_group_size": args.group_size, "version": args.version or "w4a8"}
        if args.no_zero_point:
            print("quick quantize: note: W4A8 weights are always symmetric (--no-zero-point is implied)")
    else:
        qc = {
            "w_bit": 4,
            "q_group_size": args.group_size,
            "zero_point": not args.no_zero_point,
            "version": args.version or "quick",
        }
        if args.a_bit is not None:
            qc["a_bit"] = args.a_bit
    qc = validate_quant_config(qc)  # fail before loading the model
    method = args.method or ("qqq" if w4a8 else "awq")
    if method != "rtn" and (method == "qqq") != w4a8:
        raise QuantizationError(f"--method {method} does not make {'W4A8' if w4a8 else 'W4A16'} models (W4A8: qqq/rtn)")
    model = AutoQuickForCausalLM.from_pretrained(args.model, device=args.device)
    if model.is_quantized:
        print(f"quick quantize: error: {args.model} is already quantized")
        return 2
    model.quantize(
        quant_config=qc,
        calib_data=args.calib,
        method=method,
        n_samples=args.n_samples,
        seqlen=args.seqlen,
        seed=args.seed,
        search_samples=args.search_samples,
        duo_scaling=args.duo_scaling,
        progress=not args.quiet,
    )
    out = model.save_quantized(args.out)
    bits = "w4a8" if w4a8 else "w4"
    print(
        f"{method.upper()} {bits} g{args.group_size} ({model.quant_config['version']}) of {model.path}: "
        f"quantization time {model.quantization_time_s:.1f} s; saved to {out}"
    )
    return 0
