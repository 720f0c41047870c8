"""`quick demo`: the main job. Quantize a real model to 4 bits and show what it costs and saves.

On a fresh machine, with no arguments: install the offline model/corpus packages, convert SmolLM2-135M
once to a cached checkpoint, measure held-out perplexity and a greedy completion, quantize every decoder
linear (round-to-nearest, 4 bits, zero points) into the QUICK layout, measure again, and print a table.
"""

from __future__ import annotations

import argparse

NAME = "demo"
HELP = "quantize the embedded SmolLM2-135M (or --model) to 4 bits; compare perplexity, size and generations"

DEFAULT_PROMPT = "The capital of France is"


class DemoError(ValueError):
    """An option combination the demo cannot run (e.g. the kernel backend without a GPU)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH", help="Hugging Face causal-LM directory (default: SmolLM2-135M)")
    parser.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128, -1), help="default: 128")
    parser.add_argument("--seqlen", type=int, default=512, help="perplexity window length (default: 512)")
    parser.add_argument(
        "--max-tokens", type=int, default=10_000, help="evaluation tokens, 0 = the whole text (default: 10000)"
    )
    parser.add_argument(
        "--eval",
        default="wiki",
        metavar="TEXT",
        help="'wiki' (held-out split, default), a .txt file, or wikitext2/c4/ptb",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    parser.add_argument("--backend", default="auto", choices=("auto", "reference", "kernel"), help="QuickLinear path")
    parser.add_argument("--layout", default="quick", help="packed layout: quick (default), quick_sm90, awq_gemm")
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", "float16", "bfloat16"),
        help="scale/activation dtype of the 4-bit layers; auto: bfloat16 for Gemma, float16 otherwise",
    )  # fmt: skip
    parser.add_argument(
        "--bos", default="auto", choices=("auto", "yes", "no"),
        help="prepend BOS to every window; auto: when the tokenizer adds BOS itself (Gemma yes, SmolLM2 no)",
    )  # fmt: skip
    parser.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help=f"greedy completion prompt (default: {DEFAULT_PROMPT!r})"
    )
    parser.add_argument("--new-tokens", type=int, default=24, help="tokens to generate (default: 24)")
    parser.add_argument(
        "--no-install", action="store_true", help="fail instead of pip-installing missing data packages"
    )


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DemoError(f"--device {name}: no CUDA device is available here (use --device cpu)")
    return dev


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _fmt_time(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    import torch
    from rich.table import Table

    from quick.algorithms.rtn import quantize_model_rtn
    from quick.commands._console import make_console
    from quick.data.corpus import MODEL_MODULE, WIKI_MODULE, ensure_data_packages, load_eval_text
    from quick.eval.perplexity import eval_windows, perplexity, tokenize_eval_text
    from quick.formats.layouts import get_layout
    from quick.generation import generate_text
    from quick.kernels import dispatch
    from quick.models.linears import quantizable_linears
    from quick.models.loading import default_model_dir, load_model
    from quick.nn.dtypes import set_compute_dtype
    from quick.nn.linear import QuickLinear

    wall0 = time.perf_counter()
    console = make_console()
    get_layout(args.layout)  # LayoutError (a ValueError) for unknown names, before any heavy work
    if args.seqlen < 2 or args.new_tokens < 0:
        raise DemoError("--seqlen must be >= 2 and --new-tokens >= 0")
    device = _resolve_device(args.device)
    if args.backend == "kernel" and device.type != "cuda":
        raise DemoError("--backend kernel needs a CUDA device; on CPU use --backend auto or reference")

    needed = ([] if args.model else [MODEL_MODULE]) + ([WIKI_MODULE] if args.eval.lower() == "wiki" else [])
    ensure_data_packages(auto_install=not args.no_install, modules=needed)
    text = load_eval_text(args.eval)  # before the model: a bad --eval fails in a second, not after loading
    model_dir = args.model or default_model_dir()

    with console.status(f"loading {model_dir}"):
        load_dtype = torch.float32 if device.type == "cpu" else torch.float16
        model, tok = load_model(model_dir, load_dtype, device)
    model_type = getattr(model.config, "model_type", "")
    qdtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if model_type.startswith("gemma") else torch.float16
    )
    if device.type == "cuda" and model.dtype != qdtype:
        model = model.to(qdtype)  # on GPU the whole model runs in the kernels' dtype (Gemma overflows fp16)
    ids_probe = tok("a", add_special_tokens=True)["input_ids"]
    adds_bos = tok.bos_token_id is not None and len(ids_probe) > 0 and ids_probe[0] == tok.bos_token_id
    use_bos = {"yes": True, "no": False}.get(args.bos, adds_bos)
    if use_bos and tok.bos_token_id is None:
        raise DemoError("--bos yes: the tokenizer has no BOS token")
    bos_id = tok.bos_token_id if use_bos else None

    with console.status(f"tokenizing evaluation text {args.eval!r}"):
        ids = tokenize_eval_text(tok, text)
    max_tokens = args.max_tokens if args.max_tokens > 0 else None
    n_eval = min(ids.shape[1], max_tokens or ids.shape[1])
    n_windows = len(eval_windows(n_eval, args.seqlen, bos_id is not None))
    name = Path(model_dir).name or str(model_dir)
    qname = str(qdtype).removeprefix("torch.")
    compute = f"float32, 4-bit layers {qname}" if device.type == "cpu" else str(model.dtype).removeprefix("torch.")
    console.print(
        f"[bold]{type(model).__name__}[/] from {model_dir}  |  device {device} ({compute})  |  eval {args.eval!r}: "
        f"{n_eval:,} tokens, {n_windows} windows of {args.seqlen}, BOS {'yes' if bos_id is not None else 'no'}"
    )

    linears = quantizable_linears(model)
    elem = torch.finfo(qdtype).bits // 8
    dense_bytes = sum(
        lin.weight.numel() * elem + (lin.bias.numel() * elem if lin.bias is not None else 0) for _, lin in linears
    )

    def measure(label: str) -> tuple[float, float, str, float]:
        t0 = time.perf_counter()
        ppl = perplexity(model, ids, args.seqlen, max_tokens, bos_id, progress=True, desc=f"perplexity ({label})")
        t_ppl = time.perf_counter() - t0
        t0 = time.perf_counter()
        with console.status(f"generating {args.new_tokens} tokens ({label})"):
            text = generate_text(model, tok, args.prompt, args.new_tokens) if args.new_tokens else ""
        return ppl, t_ppl, text, time.perf_counter() - t0

    # The embedded SmolLM2 ships as a Q4_1 GGUF: its baseline is that file dequantized to float, not an original
    # 16-bit checkpoint. A model given with --model is measured as it is stored.
    base = "dense" if args.model else "Q4_1 GGUF, dequantized"
    ppl0, t_ppl0, text0, t_gen0 = measure("baseline")

    t0 = time.perf_counter()
    # scales rounded to qdtype before the codes are chosen, exactly as stored for the GPU kernels; layers whose
    # K is not a multiple of the group (SmolLM2: 576 = 4.5 x 128) are stored zero-padded to whole groups
    quantize_model_rtn(model, args.group_size, args.layout, dtype=qdtype, progress=True)
    t_quant = time.perf_counter() - t0
    qmods = [m for m in model.modules() if isinstance(m, QuickLinear)]
    for m in qmods:
        m.backend = args.backend
    if args.backend == "kernel":
        probe = torch.zeros(1, qmods[0].in_features, dtype=qdtype, device=device)
        if dispatch.kernel_for(args.layout, probe) is None:
            raise DemoError(f"--backend kernel: no GPU kernel for layout {args.layout!r} on {device}")
    if device.type == "cpu":
        # The fp32 model calls its fp16/bf16 4-bit layers through casts at their boundaries: each layer sees
        # what it sees in half-precision GPU inference, and the rest stays fp32 (CPU half matmuls are slow and
        # bf16 everywhere would move the perplexity by itself), so the difference is the quantization.
        set_compute_dtype(model, model.dtype)
    packed_bytes = sum(b.numel() * b.element_size() for m in qmods for b in m.buffers())
    ppl1, t_ppl1, text1, t_gen1 = measure("4-bit")

    n_padded = sum(m.logical_in_features != m.in_features for m in qmods)
    gdesc = f"{n_padded} K-padded" if n_padded else "whole groups"
    table = Table(title=f"quick demo: {name}, RTN w4 asym, layout {args.layout}", title_justify="left")
    for col, just in [("model", "left"), ("linears", "right"), ("linear weights", "right"), ("perplexity", "right"),
                      ("delta", "right"), ("ppl time", "right"), ("generate", "right")]:  # fmt: skip
        table.add_column(col, justify=just)
    table.add_row(
        base, f"{len(linears)} dense", f"{_fmt_bytes(dense_bytes)} ({qname})", f"{ppl0:.3f}", "",
        _fmt_time(t_ppl0), f"{args.new_tokens} tok, {_fmt_time(t_gen0)}",
    )  # fmt: skip
    table.add_row(
        f"w4 g{args.group_size if args.group_size != -1 else 'K'}", f"{len(qmods)} packed ({gdesc})",
        f"{_fmt_bytes(packed_bytes)} ({dense_bytes / packed_bytes:.2f}x smaller)", f"{ppl1:.3f}",
        f"{ppl1 - ppl0:+.3f} ({(ppl1 / ppl0 - 1) * 100:+.1f}%)", _fmt_time(t_ppl1),
        f"{args.new_tokens} tok, {_fmt_time(t_gen1)}",
    )  # fmt: skip
    console.print(table)
    if not args.model:
        console.print(
            "[yellow]note[/]: the baseline is the embedded SmolLM2-135M as shipped, a Q4_1 GGUF dequantized to float "
            "(there is no 16-bit original offline); w4 re-quantizes those weights to the QUICK format."
        )
    if n_padded:
        console.print(
            f"[yellow]note[/]: {n_padded} linears have an input size that is not a multiple of {args.group_size}; "
            "their last group is ragged (stored zero-padded: zero weights quantize to exactly zero)."
        )
    if args.new_tokens:
        gen = Table(title=f"greedy completions of {args.prompt!r}", title_justify="left", show_lines=True)
        gen.add_column("model")
        gen.add_column("completion")
        gen.add_row(base, text0.strip() or "(empty)")
        gen.add_row("w4", text1.strip() or "(empty)")
        console.print(gen)
    backend_used = args.backend
    if device.type == "cpu":
        backend_used = "reference (dequantized once per layer, cached)"
    console.print(
        f"quantization {_fmt_time(t_quant)}  |  4-bit backend: {backend_used}  |  "
        f"total wall time {_fmt_time(time.perf_counter() - wall0)}"
    )
    return 0
