#!/usr/bin/env python3
"""W4A8 kernels against the W4A8 reference path on a GPU, layer by layer and for the whole model.

A SmolLM2-135M-shaped Llama (30 layers, hidden 576, FFN 1536, 9 / 3 heads, vocab 49152) with random weights of a
trained model's scale, round-to-nearest W4A8 (per-channel and g128), fused q/k/v and gate/up with the norms' int8
hand-off attached (as the loaders do), fp16 and bf16. Per layer: the input the model gives it, through the kernel and
through the reference (dequantize-then-matmul with the same int8 activations); how many outputs differ and by how many
ulps of the output dtype. Per model: the NLL of random tokens with every layer on the kernel and with every layer on
the reference, with ``QUICK_FUSIONS`` ``all`` and ``none``. Where the perplexity of a real checkpoint differs between
the two backends, this says whether single layers or the fusions account for it.

    OUT=$OUT python3 scripts/w4a8_layer_diff.py [--dtypes fp16 bf16] [--groups 128 -1]

Writes ``$OUT/w4a8_layer_diff.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

from quick.models.fuse import fuse_model  # noqa: E402
from quick.nn.linear_w4a8 import QuickLinearW4A8  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def build(dtype: torch.dtype, group_size: int) -> nn.Module:
    cfg = transformers.LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, tie_word_embeddings=True, rms_norm_eps=1e-5,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.04)
    model = model.to(dtype).cuda().eval()
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and name != "lm_head":
                setattr(mod, name, QuickLinearW4A8.from_linear(child, group_size=group_size, dtype=dtype).cuda())
    fuse_model(model)
    return model


def ulps(diff: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    fi = torch.finfo(ref.dtype)
    a = ref.abs().float().clamp_min(fi.smallest_normal)
    return diff / (torch.exp2(torch.floor(torch.log2(a))) * fi.eps)


@torch.no_grad()
def per_layer(model: nn.Module, ids: torch.Tensor) -> list[dict]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuickLinearW4A8)]
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: inputs.__setitem__(n, a[0].clone())) for n, m in layers]
    model(ids)
    for h in hooks:
        h.remove()
    rows = []
    for name, m in layers:
        x = inputs[name]
        m.backend = "kernel"
        a = m(x)
        m.backend = "reference"
        b = m(x)
        m.backend = "auto"
        d = (a.float() - b.float()).abs()
        rows.append({"layer": name, "differ": int((d > 0).sum()), "outputs": d.numel(),
                     "max_ulp": float(ulps(d, b).max()), "rel": float(d.norm() / b.float().norm())})  # fmt: skip
    return rows


@torch.no_grad()
def model_nll(model: nn.Module, ids: torch.Tensor) -> dict:
    layers = [m for m in model.modules() if isinstance(m, QuickLinearW4A8)]
    out = {}
    for fusions in ("all", "none"):
        os.environ["QUICK_FUSIONS"] = fusions
        logits = {}
        for backend in ("kernel", "reference"):
            for m in layers:
                m.backend = backend
            logits[backend] = model(ids).logits.float()
        for m in layers:
            m.backend = "auto"
        nll = {
            b: float(torch.nn.functional.cross_entropy(v[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))
            for b, v in logits.items()
        }
        rel = float((logits["kernel"] - logits["reference"]).norm() / logits["reference"].norm())
        out[fusions] = {"nll": nll, "nll_rel_diff": abs(nll["kernel"] - nll["reference"]) / nll["reference"],
                        "logits_rel": rel}  # fmt: skip
    os.environ.pop("QUICK_FUSIONS", None)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--groups", nargs="+", type=int, default=[128, -1])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    ids = torch.randint(0, 49152, (4, 256), generator=torch.Generator().manual_seed(1)).cuda()
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": {}}
    for dt in args.dtypes:
        for g in args.groups:
            model = build(DTYPES[dt], g)
            rows = per_layer(model, ids[:1, :64])
            case = {
                "layers": len(rows),
                "layers_differing": sum(r["differ"] > 0 for r in rows),
                "max_ulp": max(r["max_ulp"] for r in rows),
                "worst": sorted(rows, key=lambda r: -r["max_ulp"])[:5],
                "model": model_nll(model, ids),
            }
            result["cases"][f"{dt}_g{g}"] = case
            print(f"{dt} g{g}:", json.dumps({k: v for k, v in case.items() if k != "worst"}), flush=True)
            del model
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "w4a8_layer_diff.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
