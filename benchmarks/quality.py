"""Perplexity of this project's AWQ against llm-compressor's AWQ and GPTQ and GPTQModel's GPTQ, on the same model,
the same calibration tokens and the same held-out windows.

    python benchmarks/quality.py --llmc-python /tmp/venv-llmc/bin/python --gptq-python /tmp/venv-gptq/bin/python

Every method runs as a subprocess (llm-compressor and GPTQModel pin different torch / transformers versions, so each
runs in its own virtualenv; this project's methods run in the current interpreter) that quantizes the dense model on
CPU with the library's default algorithm settings and writes a checkpoint into ``<cache>/quality/``. All checkpoints
are then loaded by this project's importers (``AutoQuickForCausalLM.from_quantized``: QUICK, compressed-tensors and
GPTQ files, unpacked exactly, never requantized) and scored by one perplexity function on the same windows, fp32
math on CPU. ``quant_s`` is the wall time of the library's quantize call alone (not loading or saving the model).

All methods use one weight scheme: 4-bit, asymmetric, ``--group-size`` (default 64: llm-compressor refuses a group
that does not divide K, and SmolLM2's 576-wide inputs are not a multiple of 128), all linears but ``lm_head``.
BOS follows the ``quick eval`` rule (a BOS per window only where the tokenizer adds one itself, e.g. Gemma): the
held-out windows and the calibration windows alike then start with BOS. Checkpoints keep the dense checkpoint's
16-bit dtype (fp16 for SmolLM2, bf16 for Gemma). Writes ``quality-<date>.json`` and ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

THREADS = 2  # the machine is shared; no step may take more cores than this
METHODS = ("rtn", "quick-awq", "llmc-awq", "llmc-gptq", "gptqmodel-gptq")
# method -> (library label, distribution whose version is recorded, which interpreter runs it)
LIBRARY = {
    "rtn": ("quick (RTN)", "quick-llm", "self"),
    "quick-awq": ("quick", "quick-llm", "self"),
    "llmc-awq": ("llm-compressor", "llmcompressor", "llmc"),
    "llmc-gptq": ("llm-compressor", "llmcompressor", "llmc"),
    "gptqmodel-gptq": ("GPTQModel", "gptqmodel", "gptq"),
}
# the algorithm settings each library uses by default (recorded in the results; the library decides them, not us)
SETTINGS = {
    "rtn": "round to nearest, min/max per group",
    "quick-awq": "scale search (activation-only, 20-point grid) + clipping search on all tokens; on CPU the "
    "attention/MLP grid search runs on at most 16 calibration samples",
    "llmc-awq": "AWQModifier defaults: duo scaling (activations and weights), 20-point grid on all samples, "
    "no clipping search; then QuantizationModifier (min/max)",
    "llmc-gptq": "GPTQModifier defaults: block 128, dampening 0.01, actorder static",
    "gptqmodel-gptq": "QuantizeConfig defaults: damp 0.05, desc_act off, act_group_aware on",
}


# ------------------------------------------------------------------------------------------------- workers
# Each worker loads the dense model, quantizes it on the calibration ids and writes a checkpoint plus meta.json.
# They import only their own library, so that they run in its virtualenv.


def _versions(*dists: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for d in dists:
        try:
            out[d] = version(d)
        except PackageNotFoundError:
            out[d] = "not installed"
    return out


def work_quick(method: str, src: Path, out: Path, ids, group_size: int, batch: int) -> float:
    from quick.auto import AutoQuickForCausalLM

    auto = AutoQuickForCausalLM.from_pretrained(src, device="cpu")
    qc = {"w_bit": 4, "q_group_size": group_size, "zero_point": True, "version": "quick"}
    auto.quantize(
        quant_config=qc, method=method.removeprefix("quick-"), calib_data=ids, batch_size=batch, progress=False
    )
    auto.save_quantized(out)
    return float(auto.quantization_time_s)


def stored_dtype(src: Path) -> str:
    """The 16-bit dtype the dense checkpoint at ``src`` was saved in (``dtype``/``torch_dtype`` of config.json);
    ``float16`` where it names none or a 32-bit one."""
    raw = json.loads((src / "config.json").read_text())
    name = raw.get("dtype") or raw.get("torch_dtype") or (raw.get("text_config") or {}).get("dtype")
    return name if name in ("float16", "bfloat16") else "float16"


def work_llmc(method: str, src: Path, out: Path, ids, group_size: int, batch: int) -> float:
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.accelerator.is_available():
        # llm-compressor 0.14's AWQ pins cached activations for faster host-to-device copies, which raises without
        # an accelerator; pinning does not change any value, so on a CPU-only machine it is skipped
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    # fp32 calibration math, like the other methods on CPU; the checkpoint is cast to the model's 16-bit dtype before
    # saving
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=group_size)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=args)}
    if method == "llmc-awq":
        recipe = [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    else:
        recipe = [GPTQModifier(config_groups=groups, ignore=["lm_head"])]
    rows = ids.tolist()
    data = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    start = time.perf_counter()
    oneshot(
        model=model, tokenizer=tokenizer, recipe=recipe, dataset=data, num_calibration_samples=len(rows),
        max_seq_length=ids.shape[1], shuffle_calibration_samples=False, batch_size=batch,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    model.to(getattr(torch, stored_dtype(src)))
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    return seconds


def work_gptqmodel(method: str, src: Path, out: Path, ids, group_size: int, batch: int) -> float:
    import torch

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(THREADS))
    from gptqmodel import GPTQModel, QuantizeConfig

    calib = [{"input_ids": r[None], "attention_mask": torch.ones_like(r)[None]} for r in ids]
    qcfg = QuantizeConfig(bits=4, group_size=group_size, sym=False)
    model = GPTQModel.load(str(src), qcfg, device="cpu", dtype=torch.float32)
    start = time.perf_counter()
    model.quantize(calib, batch_size=batch)
    seconds = time.perf_counter() - start
    model.save(str(out))
    return seconds


WORKERS = {"self": work_quick, "llmc": work_llmc, "gptq": work_gptqmodel}


def worker_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="quality.py worker")
    ap.add_argument("method", choices=METHODS)
    ap.add_argument("--src", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--calib", type=Path, required=True)
    ap.add_argument("--group-size", type=int, required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(THREADS)
    ids = torch.load(a.calib)
    label, dist, env = LIBRARY[a.method]
    load_before = os.getloadavg()[0]
    seconds = WORKERS[env](a.method, a.src, a.out, ids, a.group_size, a.batch_size)
    deps = ("torch", "transformers") + {"llmc": ("compressed-tensors",), "gptq": (), "self": ()}[env]
    meta = {"method": a.method, "library": label, "version": _versions(dist)[dist], "quant_s": seconds,
            "settings": SETTINGS[a.method], "env": _versions(*deps), "calib_shape": list(ids.shape),
            "batch_size": a.batch_size, "loadavg_1min": [load_before, os.getloadavg()[0]]}  # fmt: skip
    (a.out / "quality-meta.json").write_text(json.dumps(meta, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- the driver


class WorkerError(RuntimeError):
    """A library's quantization run failed; ``line`` is its error in one line (kept in the results)."""

    def __init__(self, message: str, line: str):
        super().__init__(message)
        self.line = line


def last_error(log_tail: str) -> str:
    """The last exception line of a traceback (``SomeError: ...``), else the log's last line."""
    lines = [ln.strip() for ln in log_tail.splitlines() if ln.strip()]
    errors = [
        ln
        for ln in lines
        if not ln.startswith(("File ", "^", "~")) and ln.split(":")[0].endswith(("Error", "Exception"))
    ]
    return (errors or lines or ["(no output)"])[-1][:300]


def run_worker(
    method: str, python: str, src: Path, calib: Path, group_size: int, batch: int, cache: Path, log: Path
) -> Path:
    """Quantize with ``method`` in ``python`` into ``cache/<method>`` (reused when already there)."""
    out = cache / method
    meta = out / "quality-meta.json"
    if meta.is_file() and json.loads(meta.read_text()).get("batch_size") == batch:
        print(f"[{method}] cached checkpoint {out}", flush=True)
        return out
    tmp = cache / f".{method}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [python, str(Path(__file__).resolve()), "worker", method, "--src", str(src), "--out", str(tmp),
           "--calib", str(calib), "--group-size", str(group_size), "--batch-size", str(batch)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS), TOKENIZERS_PARALLELISM="false")
    print(f"[{method}] {' '.join(cmd)}  (log: {log})", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parent)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise WorkerError(f"{method} failed (exit {proc.returncode}); end of {log}:\n{tail}", last_error(tail))
    shutil.rmtree(out, ignore_errors=True)  # a checkpoint of other settings (batch size) is replaced
    os.replace(tmp, out)
    print(f"[{method}] done in {time.perf_counter() - start:.0f} s (process)", flush=True)
    return out


def evaluate(path: Path, ids, seqlen: int, bos: int | None, quantized: bool) -> float:
    """Perplexity of the checkpoint at ``path`` (dense or any supported 4-bit format) on ``ids``, fp32 on CPU."""
    from quick.auto import AutoQuickForCausalLM
    from quick.eval.perplexity import perplexity

    auto = (AutoQuickForCausalLM.from_quantized if quantized else AutoQuickForCausalLM.from_pretrained)(
        path, device="cpu"
    )
    return perplexity(auto.model, ids, seqlen=seqlen, bos_token_id=bos, progress=False)


def input_widths(src: Path) -> list[int]:
    """The input widths K of the linears that get quantized (all but ``lm_head``), from the config alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    return sorted(
        {m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    )


def summarize(result: dict) -> str:
    """The comparison in one paragraph, from the measured rows only: our AWQ against llm-compressor's, and whether
    (and by how much) the GPTQ rows beat both."""
    ppl = {r["method"]: r["ppl"] for r in result["rows"] if r["ppl"] is not None}  # rows that did not run: no ppl
    out = []
    if "quick-awq" in ppl and "llmc-awq" in ppl:
        ours, theirs = ppl["quick-awq"], ppl["llmc-awq"]
        verb = "beats" if ours < theirs else "does not beat"
        out.append(
            f"This project's AWQ {verb} llm-compressor's AWQ: perplexity {ours:.3f} against {theirs:.3f} "
            f"({ours - theirs:+.3f}, {100 * (ours / theirs - 1):+.1f} %)."
        )
        if "baseline" in ppl and "rtn" in ppl and ppl["rtn"] > ppl["baseline"]:
            gap = ppl["rtn"] - ppl["baseline"]
            closed = {m: 100 * (ppl["rtn"] - ppl[m]) / gap for m in ppl if m not in ("baseline", "rtn")}
            out.append(
                "Share of the RTN-to-baseline gap each method closes: "
                + ", ".join(f"{m} {v:.0f} %" for m, v in closed.items())
                + "."
            )
    awqs = {m: ppl[m] for m in ("quick-awq", "llmc-awq") if m in ppl}
    for g in (m for m in ("llmc-gptq", "gptqmodel-gptq") if m in ppl):
        beaten = [m for m, v in awqs.items() if ppl[g] < v]
        if not awqs:
            break
        if len(beaten) == len(awqs):
            best = min(awqs.values())
            out.append(
                f"{g} beats both AWQs, by {best - ppl[g]:.3f} ({100 * (1 - ppl[g] / best):.1f} %) over the better."
            )
        elif beaten:
            parts = ", ".join(f"{m} by {awqs[m] - ppl[g]:.3f} ({100 * (1 - ppl[g] / awqs[m]):.1f} %)" for m in beaten)
            rest = ", ".join(f"{m} ({ppl[g] - awqs[m]:+.3f})" for m in awqs if m not in beaten)
            out.append(f"{g} ({ppl[g]:.3f}) beats {parts} but not {rest}.")
        else:
            out.append(f"{g} ({ppl[g]:.3f}) beats neither AWQ.")
    out.append(
        "Quantization times are wall times on a shared 2-core CPU: the 1-minute load average at the start and end of "
        "each step is in the JSON (about 2 is this job alone), so they compare only roughly."
    )
    return " ".join(out)


def write_markdown(path: Path, result: dict) -> None:
    g = result["group_size"]
    dtype = {"float16": "fp16", "bfloat16": "bf16"}.get(result.get("dtype", "float16"), result.get("dtype"))
    if result.get("k_widths"):
        ks = ", ".join(str(k) for k in result["k_widths"])
        why = f"llm-compressor refuses a group that does not divide K; the quantized linears' K are {ks}"
    else:
        why = "llm-compressor refuses a group that does not divide K"
    bos = (
        " Every held-out and calibration window starts with BOS (the tokenizer adds one itself)."
        if result["eval"].get("bos")
        else ""
    )
    lines = [
        f"# 4-bit quality: {result['model']}, W4A16 asymmetric, group {g}",
        "",
        f"Held-out Wikipedia split, {result['eval']['tokens']} tokens in {result['eval']['seqlen']}-token windows "
        f"({result['eval']['windows']} windows); calibration: {result['calibration']['n_samples']} x "
        f"{result['calibration']['seqlen']} tokens of the calibration split (the same ids for every method, "
        f"{result['calibration']['batch_size']} samples per forward). All linears but lm_head quantized, group {g} "
        f"for every method ({why}).{bos} CPU, 2 threads, fp32 calibration and evaluation math; every checkpoint "
        "loaded with `AutoQuickForCausalLM.from_quantized` and scored by `quick.eval.perplexity`. Reproduce: "
        f"`{result.get('command', 'python benchmarks/quality.py')}`.",
        "",
        "| method | library | version | perplexity | vs baseline | quantization (s) |",
        "|---|---|---|---|---|---|",
    ]
    base = result["rows"][0]["ppl"]
    for r in result["rows"]:
        if r["ppl"] is None:
            lines.append(f"| {r['method']} | {r['library']} | {r['version']} | not run: {r['error']} |  |  |")
            continue
        q = "" if r["quant_s"] is None else f"{r['quant_s']:.1f}"
        rel = "" if r["method"] == "baseline" else f"+{100 * (r['ppl'] / base - 1):.1f} %"
        lines.append(f"| {r['method']} | {r['library']} | {r['version']} | {r['ppl']:.3f} | {rel} | {q} |")
    lines += ["", "Settings (each library's defaults):", ""]
    lines += [f"- `{r['method']}`: {r['settings']}" for r in result["rows"] if r.get("settings") and r["ppl"]]
    lines += [
        "",
        f"llm-compressor's checkpoints are cast to {dtype} (the model's dtype, like this project's scales) before "
        "saving; its activation pinning, which needs an accelerator, is skipped on CPU (it changes no value).",
        "",
        summarize(result),
    ]
    if result.get("notes"):
        lines += ["", result["notes"]]
    path.write_text("\n".join(lines) + "\n")


def write_results(out: Path, stem: str, result: dict) -> None:
    result["summary"] = summarize(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(out / f"{stem}.md", result)
    print(f"wrote {out / stem}.json and .md")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="dense checkpoint directory (default: SmolLM2-135M)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8, help="calibration samples per forward, every library")
    ap.add_argument("--eval-tokens", type=int, default=20_480)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    ap.add_argument("--llmc-python", default=os.environ.get("QUICK_LLMC_PYTHON", "/tmp/venv-llmc/bin/python"))
    ap.add_argument("--gptq-python", default=os.environ.get("QUICK_GPTQ_PYTHON", "/tmp/venv-gptq/bin/python"))
    ap.add_argument("--cache", type=Path, default=None, help="checkpoint folder (default: <quick cache>/quality)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--name", default=None, help="result file stem (default: quality-<today>)")
    ap.add_argument("--notes", default="", help="a paragraph kept with the results (JSON and markdown)")
    ap.add_argument("--render", type=Path, help="only rewrite the summary and markdown of this result JSON")
    a = ap.parse_args()
    if a.render:
        result = json.loads(a.render.read_text())
        result["notes"] = a.notes or result.get("notes", "")
        write_results(a.render.parent, a.render.stem, result)
        return
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {METHODS}")
    for flag in ("group_size", "n_samples", "batch_size", "calib_seqlen", "eval_tokens", "seqlen"):
        if getattr(a, flag) < 2:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 2, got {getattr(a, flag)}")

    import datetime as dt
    import math
    import shlex

    import torch
    from transformers import AutoTokenizer

    from quick.commands.eval import bos_for
    from quick.data.corpus import calibration_samples, load_eval_text
    from quick.eval.perplexity import eval_windows, tokenize_eval_text
    from quick.models.loading import cache_root, default_model_dir

    torch.set_num_threads(THREADS)
    src = (a.model or default_model_dir()).resolve()
    widths = input_widths(src)
    if any(k % a.group_size for k in widths):
        raise ValueError(
            f"--group-size {a.group_size} does not divide every quantized input width K {widths} (llm-compressor "
            f"refuses that); the largest group that divides all of them is {math.gcd(*widths)}"
        )
    tokenizer = AutoTokenizer.from_pretrained(src)
    tag = f"{src.name}-g{a.group_size}-{a.n_samples}x{a.calib_seqlen}"
    cache = (a.cache or cache_root() / "quality") / tag
    cache.mkdir(parents=True, exist_ok=True)
    calib = cache / "calibration_ids.pt"
    bos = bos_for(tokenizer)  # the `quick eval` rule: a BOS per window only where the tokenizer adds one itself
    ids = calibration_samples(tokenizer, a.n_samples, a.calib_seqlen, seed=0)
    if bos is not None:  # the same windows, each starting with BOS (as `AutoQuickForCausalLM.quantize` does it)
        ids = torch.cat([torch.full_like(ids[:, :1], bos), ids[:, :-1]], dim=1)
    torch.save(ids, calib)
    eval_ids = tokenize_eval_text(tokenizer, load_eval_text("wiki"))[:, : a.eval_tokens]
    dtype = stored_dtype(src)
    pythons = {"self": sys.executable, "llmc": a.llmc_python, "gptq": a.gptq_python}

    rows = []
    start = time.perf_counter()
    ppl = evaluate(src, eval_ids, a.seqlen, bos, quantized=False)
    print(f"[baseline] perplexity {ppl:.3f}", flush=True)
    short = {"float16": "fp16", "bfloat16": "bf16"}[dtype]
    rows.append({"method": "baseline", "library": f"dense checkpoint ({short})", "version": "", "ppl": ppl,
                 "quant_s": None})  # fmt: skip
    for m in methods:
        try:
            path = run_worker(
                m, pythons[LIBRARY[m][2]], src, calib, a.group_size, a.batch_size, cache, cache / f"{m}.log"
            )
        except WorkerError as e:  # the row is kept as not run, with the library's error
            print(f"[{m}] {e}", flush=True)
            label, dist, _ = LIBRARY[m]
            rows.append({"method": m, "library": label, "version": "", "ppl": None, "quant_s": None, "error": e.line})
            continue
        meta = json.loads((path / "quality-meta.json").read_text())
        ppl = evaluate(path, eval_ids, a.seqlen, bos, quantized=True)
        print(f"[{m}] perplexity {ppl:.3f}, quantization {meta['quant_s']:.1f} s", flush=True)
        keep = ("method", "library", "version", "quant_s", "settings", "env", "loadavg_1min")
        rows.append({**{k: meta.get(k) for k in keep}, "ppl": ppl})
    n_tok = int(eval_ids.shape[1])
    result = {
        "model": src.name,
        "date": dt.date.today().isoformat(),
        "device": f"cpu, {THREADS} threads",
        "torch": torch.__version__,
        "bits": 4,
        "symmetric": False,
        "group_size": a.group_size,
        "dtype": dtype,
        "k_widths": widths,
        "quantized": "all linears but lm_head",
        "eval": {
            "data": "wiki held-out split",
            "tokens": n_tok,
            "seqlen": a.seqlen,
            "windows": len(eval_windows(n_tok, a.seqlen, bos is not None)),
            "bos": bos is not None,
        },
        "calibration": {
            "data": "wiki calibration split",
            "n_samples": a.n_samples,
            "seqlen": a.calib_seqlen,
            "tokens": a.n_samples * a.calib_seqlen,
            "seed": 0,
            "batch_size": a.batch_size,
        },
        "rows": rows,
        "total_s": time.perf_counter() - start,
        "command": shlex.join(["python", "benchmarks/quality.py", *sys.argv[1:]]),
        "notes": a.notes,
    }
    write_results(a.out, a.name or f"quality-{result['date']}", result)


if __name__ == "__main__":
    main()
