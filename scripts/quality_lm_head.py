"""What quantizing the output projection (lm_head) too costs in quality: perplexity of a real model, dense, RTN w4
g128 of every linear but lm_head (AutoAWQ's choice, the library default), and RTN w4 g128 of every linear including
lm_head (the e2e benchmark's ``<layout>+lm_head`` impls, which read fewer bytes per decode step).

    python scripts/quality_lm_head.py smollm2 --out benchmarks/results
    python scripts/quality_lm_head.py PATH_TO_DENSE_DIR --bos yes --dtype float32

Writes ``quality-lm-head-<model>-<device>-<date>.json``; everything in it is measured in this run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_report import _bos, add_eval_arguments, eval_perplexity, run_stamp  # noqa: E402

from quick.auto import AutoQuickForCausalLM, quantize_model_rtn  # noqa: E402
from quick.data.corpus import load_eval_text  # noqa: E402
from quick.generation import generate_text  # noqa: E402
from quick.nn.linear import QuickLinear  # noqa: E402

PROMPT = "The capital of France is"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_arguments(ap)
    ap.add_argument("--bos", choices=("auto", "yes", "no"), default="auto")
    ap.add_argument("--dtype", default=None, help="weights dtype (Gemma: float32 or bfloat16, not float16)")
    args = ap.parse_args()
    text = load_eval_text("wiki")
    result: dict = {**run_stamp(args.model), "eval": {"data": "wiki held-out", "seqlen": args.seqlen,
                                                       "max_tokens": args.max_tokens}}  # fmt: skip

    def load() -> AutoQuickForCausalLM:
        kw = {"dtype": getattr(torch, args.dtype)} if args.dtype else {}
        return AutoQuickForCausalLM.from_pretrained(args.model, **kw)

    for name, skip in (("dense", None), ("rtn_g128", ("lm_head",)), ("rtn_g128_with_lm_head", ())):
        auto = load()
        if skip is not None:
            quantize_model_rtn(auto.model, 128, "quick", True, auto.weight_dtype or torch.float16, skip)
        head = auto.model.get_output_embeddings()
        value, secs = eval_perplexity(auto, text, args.seqlen, args.max_tokens, _bos(auto, args.bos), name)
        result[name] = {
            "ppl": value,
            "eval_s": round(secs, 1),
            "lm_head_quantized": isinstance(head, QuickLinear),
            "lm_head_shape": [head.out_features, getattr(head, "logical_in_features", head.in_features)],
            "completion": generate_text(auto.model, auto.tokenizer, PROMPT, max_new_tokens=16),
        }
        print(f"{name}: perplexity {value:.3f}", flush=True)
        del auto
    base, rtn, both = (result[k]["ppl"] for k in ("dense", "rtn_g128", "rtn_g128_with_lm_head"))
    result["lm_head_extra_ppl"] = both - rtn
    result["lm_head_extra_rel"] = (both - rtn) / rtn
    result["rtn_gap"] = rtn - base
    name = Path(str(args.model)).name.lower()
    out = Path(args.out) / f"quality-lm-head-{name}-cpu-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("lm_head", "rtn"))}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
