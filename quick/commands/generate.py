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


def run(args: argparse.Namespace) -> int:
    from quick.auto import AutoQuickForCausalLM
    from quick.generation import generate_text

    model = AutoQuickForCausalLM.from_pretrained(args.model, device=args.device)
    if model.tokenizer is None:
        print(f"quick generate: error: {args.model} has no tokenizer files")
        return 2
    text = generate_text(model.model, model.tokenizer, args.prompt, args.max_new_tokens, chat=args.chat)
    print(args.prompt + text)
    return 0
