"""`quick generate MODEL "prompt"`: greedy continuation from a dense or quantized model."""

from __future__ import annotations

import argparse

NAME = "generate"
HELP = "greedy text continuation from a dense or quantized model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="dense or quantized checkpoint directory, or 'smollm2'")
    parser.add_argument("prompt", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="default: 32")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--fast",
        action="store_true",
        help="greedy decoding on a static KV cache (on a GPU: CUDA graph of the few-kernel decode step for "
        "llama-like models) instead of transformers' generate; prints tokens/s",
    )


def run(args: argparse.Namespace) -> int:
    import sys

    from quick.auto import AutoQuickForCausalLM
    from quick.eval.perplexity import model_device
    from quick.generation import describe_decode, encode_prompt, eos_ids, generate_text, static_generate

    if args.max_new_tokens < 1:
        print(f"quick generate: error: --max-new-tokens must be >= 1, got {args.max_new_tokens}")
        return 2
    model = AutoQuickForCausalLM.from_pretrained(args.model, device=args.device)
    tok = model.tokenizer
    if tok is None:
        print(f"quick generate: error: {args.model} has no tokenizer files")
        return 2
    if not args.fast:
        print(args.prompt + generate_text(model.model, tok, args.prompt, args.max_new_tokens, chat=args.chat))
        return 0
    enc = encode_prompt(tok, args.prompt, args.chat, model_device(model.model))
    stop = eos_ids(model.model, tok)
    new, stats = static_generate(model.model, enc["input_ids"], args.max_new_tokens, stop, warmup=True)
    print(args.prompt + tok.decode(new[0], skip_special_tokens=True))
    print(
        f"prefill {stats.prompt_len} tokens: {stats.prefill_tok_s:.0f} tok/s; decode {stats.new_tokens} tokens: "
        f"{stats.decode_tok_s:.1f} tok/s (greedy, batch 1, after a 2-token warm-up)",
        file=sys.stderr,
    )
    total = enc["input_ids"].shape[1] + args.max_new_tokens
    print(describe_decode(model.model, total, model_device(model.model)), file=sys.stderr)
    return 0
