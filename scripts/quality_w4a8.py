"""Issue-7 figure: W4A8 (QQQ) perplexity of a real model, per-channel and g128, on the held-out wiki split.

    python scripts/quality_w4a8.py smollm2 --out benchmarks/results                  # full calibration
    python scripts/quality_w4a8.py smollm2 --n-samples 32 --search-samples 8         # reduced, for 2 CPU cores
    python scripts/quality_w4a8.py --merge --out ALL.json A.json B.json              # runs made side by side

Same evaluation as ``scripts/quality_report.py`` (10k held-out tokens, windows of 512, BOS as the tokenizer
does it), so the numbers compare with its W4A16 baseline / RTN / AWQ figures; the newest
``quality-<model>-<device>-*.json`` next to the output, if there is one, is copied in as ``w4a16_reference``
(with its file name), nothing else is. Writes ``quality-w4a8-<model>-<device>-<date>.json``. Every number
here is measured in this run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from quick.auto import AutoQuickForCausalLM
from quick.data.corpus import load_eval_text
from quick.generation import generate_text
from quick.nn.linear_w4a8 import QuickLinearW4A8
from quick.quant.qqq import fake_quant_activations

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_report import PROMPTS, add_eval_arguments, eval_perplexity, run_stamp  # noqa: E402  (the same evaluation)


def _bos(auto: AutoQuickForCausalLM, mode: str) -> int | None:
    tok = auto.tokenizer
    if mode == "yes" or (mode == "auto" and getattr(tok, "add_bos_token", False)):
        return tok.bos_token_id
    return None


def _w4a16_reference(out_dir: Path, name: str, device: str) -> dict | None:
    files = sorted(out_dir.glob(f"quality-{name}-{device}-*.json"))
    if not files:
        return None
    data = json.loads(files[-1].read_text())
    keys = ("ppl_baseline", "ppl_rtn_g128", "ppl_awq_g128", "eval", "calibration", "date")
    return {"file": files[-1].name, **{k: data[k] for k in keys if k in data}}


def _smoothing_summary(reports: list) -> dict:
    """Per scale group: the alpha chosen in each layer (None = no smoothing won) and the mean loss ratio."""
    out: dict = {}
    for rep in reports:
        for group, r in rep.groups.items():
            g = out.setdefault(group, {"alpha": [], "loss_over_unsmoothed": []})
            g["alpha"].append(None if r["alpha"] != r["alpha"] else r["alpha"])
            g["loss_over_unsmoothed"].append(r["loss"] / r["identity_loss"] if r["identity_loss"] > 0 else None)
    for g in out.values():
        ratios = [x for x in g["loss_over_unsmoothed"] if x is not None]
        g["mean_loss_over_unsmoothed"] = sum(ratios) / len(ratios) if ratios else None
    return out


def _set_backend(auto: AutoQuickForCausalLM, backend: str) -> None:
    for m in auto.model.modules():
        if isinstance(m, QuickLinearW4A8):
            m.backend = backend


def _kernel_available(auto: AutoQuickForCausalLM) -> bool:
    """Whether a W4A8 GPU kernel is registered and takes this model's activations."""
    from quick.nn.linear_w4a8 import _kernel_for

    layer = next(m for m in auto.model.modules() if isinstance(m, QuickLinearW4A8))
    x = torch.zeros(1, layer.in_features, dtype=layer.dtype, device=auto.device)
    return layer.storage != "unpacked" and _kernel_for(layer.storage, x) is not None


def _option_suffix(calibration: dict) -> str:
    return ("_clip" if calibration.get("clip") else "") + ("_actorder" if calibration.get("act_order") else "")


def merge(files: list[str], out: str) -> None:
    """One result file from runs measured in separate processes (e.g. one per group size, side by side):
    same model, device and evaluation required; settings that differ are kept per run."""
    parts = [json.loads(Path(f).read_text()) for f in files]
    first = parts[0]
    for p, f in zip(parts, files, strict=True):
        for key in ("model", "device", "eval"):
            if p[key] != first[key]:
                raise SystemExit(f"{f}: {key} {p[key]!r} differs from {first[key]!r}")
    merged = {k: v for k, v in first.items() if k not in ("runs", "calibration", "w4a16_reference")}
    merged["merged_from"] = [Path(f).name for f in files]
    merged["runs"] = {}
    for p in parts:
        for key, run in p["runs"].items():
            suffix = _option_suffix(p["calibration"]) if run["method"] == "qqq" else ""
            key = key if key.endswith(suffix) else key + suffix
            if run["method"] == "qqq":  # runs with different calibration sizes side by side
                key += f"_n{p['calibration']['n_samples']}"
            if key in merged["runs"]:
                raise SystemExit(f"run {key} appears twice")
            merged["runs"][key] = {**run, "calibration": p["calibration"], "threads": p.get("threads")}
        for key in ("ppl_baseline", "ppl_a8_only", "w4a16_reference"):
            if key in p:
                merged.setdefault(key, p[key])
    if "w4a16_reference" not in merged:
        ref = _w4a16_reference(Path(out).parent, Path(str(first["model"])).name.lower(), first["device"].split(":")[0])
        if ref is not None:
            merged["w4a16_reference"] = ref
    Path(out).write_text(json.dumps(merged, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--merge":
        ap = argparse.ArgumentParser(description="merge result files: --merge --out FILE FILES...")
        ap.add_argument("--merge", action="store_true")
        ap.add_argument("--out", required=True)
        ap.add_argument("files", nargs="+")
        a = ap.parse_args()
        merge(a.files, a.out)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_arguments(ap)
    ap.add_argument("--groups", default="-1,128", help="comma-separated W4A8 group sizes (default: -1,128)")
    ap.add_argument("--methods", default="qqq,rtn", help="comma-separated methods (default: qqq,rtn)")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--search-samples", type=int, default=None, help="smoothing-search samples (default: QQQ's)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the dense perplexity")
    ap.add_argument(
        "--a8-baseline",
        action="store_true",
        help="also the dense model with only its linear inputs quantized per token to int8 (the A8 share of the loss)",
    )
    ap.add_argument("--reload", action="store_true", help="also save, reload and re-measure each model")
    ap.add_argument("--n-grid", type=int, default=None, help="smoothing grid points (default: QQQ's 20)")
    ap.add_argument("--no-act-order", dest="act_order", action="store_false", help="GPTQ in column order")
    ap.add_argument("--no-clip", dest="clip", action="store_false", help="GPTQ ranges = max|w| (no clip search)")
    ap.add_argument("--act-order", action="store_true", help=argparse.SUPPRESS)  # the default; kept for old commands
    ap.add_argument("--clip", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--backend",
        choices=("auto", "reference"),
        default="reference",
        help="W4A8 layers during calibration and the main perplexity: reference arithmetic (default) or the GPU "
        "kernel when available; with a kernel present, the perplexity is also measured on the other backend",
    )
    ap.add_argument("--bos", choices=("auto", "yes", "no"), default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--tag", default="", help="suffix of the output file name")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    text = load_eval_text("wiki")
    result: dict = {
        **run_stamp(args.model),
        "threads": torch.get_num_threads(),
        "eval": {"data": "wiki held-out", "seqlen": args.seqlen, "max_tokens": args.max_tokens},
        "calibration": {
            "n_samples": args.n_samples,
            "seqlen": args.calib_seqlen,
            "search_samples": args.search_samples,
            "n_grid": args.n_grid,
            "act_order": args.act_order,
            "clip": args.clip,
        },
        "backend": args.backend,
        "runs": {},
    }
    out_path: Path | None = None

    def ppl(auto: AutoQuickForCausalLM, name: str) -> float:
        value, secs = eval_perplexity(auto, text, args.seqlen, args.max_tokens, _bos(auto, args.bos), name)
        print(f"{name}: perplexity {value:.3f} ({secs:.0f} s)", flush=True)
        return value

    def write() -> None:
        nonlocal out_path
        name = Path(str(args.model)).name.lower()
        dev = result["device"].split(":")[0]
        ref = _w4a16_reference(Path(args.out), name, dev)
        if ref is not None:
            result["w4a16_reference"] = ref
        tag = f"-{args.tag}" if args.tag else ""
        out_path = Path(args.out) / f"quality-w4a8-{name}-{dev}-{result['date']}{tag}.json"
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")

    QuickLinearW4A8.default_backend = args.backend
    options = {"act_order": args.act_order, "clip": args.clip, **({"n_grid": args.n_grid} if args.n_grid else {})}
    dense = AutoQuickForCausalLM.from_pretrained(args.model, device=args.device)
    result["device"] = str(dense.device)
    if not args.no_baseline:
        result["ppl_baseline"] = ppl(dense, "baseline")
        write()
    if args.a8_baseline:
        handles = [
            m.register_forward_pre_hook(lambda _m, a: (fake_quant_activations(a[0]), *a[1:]))
            for n, m in dense.model.named_modules()
            if isinstance(m, torch.nn.Linear) and "lm_head" not in n
        ]
        result["ppl_a8_only"] = ppl(dense, "float weights, int8 activations")
        for h in handles:
            h.remove()
        write()
    del dense

    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        for g in [int(x) for x in args.groups.split(",")]:
            key = f"{method}_{'channel' if g == -1 else f'g{g}'}"
            if method == "qqq":
                key += _option_suffix(result["calibration"])
            qc = {"w_bit": 4, "a_bit": 8, "q_group_size": g, "version": "w4a8"}
            auto = AutoQuickForCausalLM.from_pretrained(args.model, device=args.device)
            auto.quantize(
                quant_config=qc,
                method=method,
                n_samples=args.n_samples,
                seqlen=args.calib_seqlen,
                search_samples=args.search_samples,
                qqq_options=options if method == "qqq" else None,
            )
            run: dict = {"quant_config": qc, "method": method, "quantization_time_s": auto.quantization_time_s}
            if getattr(auto, "qqq_reports", None):
                run["smoothing"] = _smoothing_summary(auto.qqq_reports)
            run["ppl"] = ppl(auto, f"w4a8 {key}")
            if auto.device.type == "cuda" and _kernel_available(auto):
                other = "auto" if args.backend == "reference" else "reference"
                _set_backend(auto, other)
                run[f"ppl_backend_{other}"] = ppl(auto, f"w4a8 {key} ({other})")
                _set_backend(auto, args.backend)
            run["generation"] = {p: generate_text(auto.model, auto.tokenizer, p, max_new_tokens=24) for p in PROMPTS}
            if args.reload:
                with tempfile.TemporaryDirectory() as tmp:
                    auto.save_quantized(Path(tmp) / "ckpt")
                    del auto
                    reloaded = AutoQuickForCausalLM.from_quantized(Path(tmp) / "ckpt", device=args.device)
                    run["ppl_reloaded"] = ppl(reloaded, f"w4a8 {key} reloaded")
                    del reloaded
            result["runs"][key] = run
            if "ppl_baseline" in result:
                run["ppl_increase_vs_baseline"] = run["ppl"] / result["ppl_baseline"] - 1
            write()

    print(json.dumps(result, indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
