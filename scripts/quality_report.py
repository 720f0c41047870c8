"""Issue-5 figures for one real model: baseline / RTN / AWQ perplexity, quantization time, save-reload, generation.

    python scripts/quality_report.py smollm2 --out benchmarks/results
    python scripts/quality_report.py PATH_TO_DENSE_DIR --bos yes

Writes ``quality-<model>-<device>-<date>.json`` (and prints a table). Everything is measured in this run;
nothing is copied from elsewhere. On 2 CPU cores SmolLM2-135M takes ~45 min (AWQ search dominates).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import torch

from quick.auto import AutoQuickForCausalLM
from quick.commands.eval import bos_for
from quick.data.corpus import load_eval_text
from quick.eval.perplexity import perplexity, tokenize_eval_text
from quick.generation import generate_text

PROMPTS = ("The capital of France is", "Water is made of")


def _bos(auto: AutoQuickForCausalLM, mode: str) -> int | None:
    return bos_for(auto.tokenizer, mode)  # same rule as `quick eval`: auto = when the tokenizer adds BOS itself


def eval_perplexity(
    auto: AutoQuickForCausalLM, text: str, seqlen: int, max_tokens: int, bos_token_id: int | None, name: str
) -> tuple[float, float]:
    """``(perplexity, seconds)`` of the model on the held-out ``text`` (windows of ``seqlen``, at most
    ``max_tokens`` tokens); the evaluation of this script."""
    ids = tokenize_eval_text(auto.tokenizer, text)
    start = time.perf_counter()
    value = perplexity(auto.model, ids, seqlen=seqlen, max_tokens=max_tokens, bos_token_id=bos_token_id, desc=name)
    return value, time.perf_counter() - start


def run_stamp(model: str) -> dict:
    """The head of a result file: model, date, torch version, host."""
    return {
        "model": str(model),
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "host": platform.processor() or platform.machine(),
    }


def add_eval_arguments(ap: argparse.ArgumentParser) -> None:
    """The model, output folder and evaluation window arguments every quality script shares, so that their
    perplexities are measured the same way and stay comparable."""
    ap.add_argument("model", help="dense checkpoint directory or 'smollm2'")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=10_000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_arguments(ap)
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--bos", choices=("auto", "yes", "no"), default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--save", metavar="DIR", help="keep the AWQ checkpoint here (default: a temporary directory)")
    args = ap.parse_args()

    qc = {"w_bit": 4, "q_group_size": 128, "zero_point": True, "version": "quick"}
    text = load_eval_text("wiki")
    result: dict = {
        **run_stamp(args.model),
        "eval": {"data": "wiki held-out", "seqlen": args.seqlen, "max_tokens": args.max_tokens},
        "calibration": {"n_samples": args.n_samples, "seqlen": args.calib_seqlen},
    }

    def ppl(auto: AutoQuickForCausalLM, name: str) -> float:
        value, _ = eval_perplexity(auto, text, args.seqlen, args.max_tokens, _bos(auto, args.bos), name)
        print(f"{name}: perplexity {value:.3f}", flush=True)
        return value

    def gens(auto: AutoQuickForCausalLM) -> dict[str, str]:
        return {p: generate_text(auto.model, auto.tokenizer, p, max_new_tokens=24) for p in PROMPTS}

    dense = AutoQuickForCausalLM.from_pretrained(args.model, device=args.device)
    device = str(dense.device)
    result["device"] = device
    result["ppl_baseline"] = ppl(dense, "baseline")
    result["generation_baseline"] = gens(dense)
    del dense

    rtn = AutoQuickForCausalLM.from_pretrained(args.model, device=args.device)
    rtn.quantize(quant_config=qc, method="rtn")
    result["ppl_rtn_g128"] = ppl(rtn, "rtn g128")
    result["rtn_time_s"] = rtn.quantization_time_s
    del rtn

    awq = AutoQuickForCausalLM.from_pretrained(args.model, device=args.device)
    awq.quantize(quant_config=qc, method="awq", n_samples=args.n_samples, seqlen=args.calib_seqlen)
    result["awq_time_s"] = awq.quantization_time_s
    result["ppl_awq_g128"] = ppl(awq, "awq g128")
    result["generation_awq"] = gens(awq)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.save) if args.save else Path(tmp) / "ckpt"
        awq.save_quantized(ckpt)
        del awq
        reloaded = AutoQuickForCausalLM.from_quantized(ckpt, device=args.device)
        result["ppl_awq_reloaded"] = ppl(reloaded, "awq reloaded")
        result["generation_awq_reloaded"] = gens(reloaded)
    rel = abs(result["ppl_awq_reloaded"] - result["ppl_awq_g128"]) / result["ppl_awq_g128"]
    result["reload_rel_diff"] = rel
    gap = result["ppl_rtn_g128"] - result["ppl_baseline"]
    result["awq_gap_closed"] = (result["ppl_rtn_g128"] - result["ppl_awq_g128"]) / gap if gap > 0 else math.nan

    name = Path(str(args.model)).name.lower()
    out = Path(args.out) / f"quality-{name}-{device.split(':')[0]}-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
