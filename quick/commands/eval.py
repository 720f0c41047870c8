"""`quick eval MODEL --ppl`: perplexity of a dense or quantized model on held-out text."""

from __future__ import annotations

import argparse

NAME = "eval"
HELP = "perplexity of a dense or quantized model (held-out Wikipedia split or a text file), or lm-eval tasks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="dense or quantized checkpoint directory, or 'smollm2'")
    parser.add_argument("--ppl", action="store_true", help="measure perplexity")
    parser.add_argument(
        "--tasks", default=None, help="comma-separated lm-eval-harness tasks (needs `pip install lm-eval` and a hub)"
    )
    parser.add_argument("--limit", type=float, default=None, help="lm-eval: examples per task (or fraction)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples")
    parser.add_argument(
        "--data", default="wiki", help="'wiki' (held-out split, default), a .txt file, wikitext2/c4/ptb"
    )
    # the demo's settings: a few minutes on CPU for a small model, and the two commands' figures compare directly
    parser.add_argument("--seqlen", type=int, default=512, help="window length (default: 512, as `quick demo`)")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=10_000,
        help="evaluate the first N tokens, 0 = the whole text (default: 10000, as `quick demo`)",
    )
    parser.add_argument(
        "--bos", default="auto", choices=("auto", "yes", "no"),
        help="prepend BOS to every window; auto: when the tokenizer itself adds BOS (Gemma yes, SmolLM2 no)",
    )  # fmt: skip
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "kernel", "reference"),
        help="4-bit layers: the GPU kernels where they run (auto), only the kernels (kernel), or dequantize-then-"
        "matmul (reference: the kernels' numerics check on the same device and dtype)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def bos_for(tokenizer, mode: str = "auto") -> int | None:
    """BOS id to prepend per window: always/never, or when the tokenizer adds one to plain text itself."""
    bos = tokenizer.bos_token_id
    if mode == "no" or bos is None:
        return None
    if mode == "yes":
        return bos
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def set_backend(model, backend: str) -> int:
    """Set ``backend`` on every 4-bit module of ``model`` (linears, fused projections, expert stacks); returns how
    many."""
    n = 0
    for m in model.modules():
        if isinstance(getattr(m, "backend", None), str):
            m.backend = backend
            n += 1
    return n


def run(args: argparse.Namespace) -> int:
    import time

    from quick.auto import AutoQuickForCausalLM
    from quick.data.corpus import load_eval_text
    from quick.eval.perplexity import perplexity, tokenize_eval_text

    if args.max_tokens < 0:
        raise ValueError(f"--max-tokens must be >= 0 (0 = the whole text), got {args.max_tokens}")
    if not args.ppl and not args.tasks:
        print("quick eval: error: choose a metric (--ppl and/or --tasks TASK[,TASK])")
        return 2
    if args.tasks:
        from quick.eval.lm_eval_adapter import _harness

        try:
            _harness()  # fail before loading the model
        except ImportError as exc:
            print(f"quick eval: error: {exc}")
            return 2
    model = AutoQuickForCausalLM.from_pretrained(args.model, device=args.device)
    layers = set_backend(model.model, args.backend)
    if model.tokenizer is None:
        print(f"quick eval: error: {args.model} has no tokenizer files")
        return 2
    if args.tasks:
        from quick.eval.lm_eval_adapter import run_tasks

        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        for task, metrics in run_tasks(model.model, model.tokenizer, tasks, args.num_fewshot, limit).items():
            print(task + ": " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
        if not args.ppl:
            return 0
    ids = tokenize_eval_text(model.tokenizer, load_eval_text(args.data))
    bos = bos_for(model.tokenizer, args.bos)
    start = time.perf_counter()
    max_tokens = args.max_tokens or None  # 0: the whole text
    ppl = perplexity(model.model, ids, args.seqlen, max_tokens, bos, progress=not args.quiet)
    n = min(ids.shape[-1], max_tokens or ids.shape[-1])
    kind = (
        f"quantized ({model.quant_config['version']}, g{model.quant_config['q_group_size']}, "
        f"backend {args.backend} on {layers} layers)"
        if model.is_quantized
        else "dense"
    )
    print(
        f"perplexity {ppl:.4f} on {n} tokens of {args.data!r} "
        f"(seqlen {args.seqlen}, BOS {'yes' if bos is not None else 'no'}); "
        f"{kind} model {model.path}; {time.perf_counter() - start:.1f} s"
    )
    return 0
