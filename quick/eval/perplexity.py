"""Perplexity over non-overlapping windows, the way quantization papers (GPTQ, AWQ, QUICK) report it.

The token stream is cut into consecutive windows; each window is an independent forward pass (no
context carried over), and every token except a window's first is scored. With ``bos_token_id`` each
window starts with BOS followed by ``seqlen - 1`` text tokens, all of which are scored: models trained
to always see BOS (Gemma) are badly off without it, models that never had one (SmolLM2) are hurt by it.
The last, shorter window is scored too, so ``max_tokens`` is the number of text tokens used.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (a fully packed model may have few parameters)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def tokenize_eval_text(tokenizer, text: str) -> torch.Tensor:
    """``[1, T]`` token ids of ``text`` without special tokens (:func:`perplexity` adds BOS per window)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    if not ids:
        raise ValueError("evaluation text is empty after tokenization")
    return torch.tensor(ids, dtype=torch.long).unsqueeze(0)


def eval_windows(n_tokens: int, seqlen: int, bos: bool) -> list[tuple[int, int]]:
    """``(start, end)`` slices of the text for each window; windows that would score nothing are dropped."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    step = seqlen - 1 if bos else seqlen
    out = []
    for start in range(0, n_tokens, step):
        end = min(start + step, n_tokens)
        if end - start >= (1 if bos else 2):
            out.append((start, end))
    return out


@torch.no_grad()
def window_nll(model: nn.Module, window: torch.Tensor, bos_token_id: int | None = None) -> tuple[float, int]:
    """Summed negative log-likelihood (float64) and number of scored tokens of one ``[T]`` window."""
    if bos_token_id is not None:
        inp = torch.cat([window.new_tensor([bos_token_id]), window])
        targets = window
    else:
        inp, targets = window, window[1:]
    logits = model(inp.unsqueeze(0), use_cache=False).logits[0, :-1]
    # log-softmax in fp32 (fp16 logits would lose the tail), the sum over tokens in fp64
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return float(nll.double().sum()), int(targets.numel())


@torch.no_grad()
def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    seqlen: int = 2048,
    max_tokens: int | None = None,
    bos_token_id: int | None = None,
    progress: bool = True,
    desc: str = "perplexity",
) -> float:
    """``exp(total NLL / scored tokens)`` over non-overlapping ``seqlen`` windows of ``input_ids``."""
    ids = input_ids
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"input_ids must be [T] or [1, T], got shape {tuple(input_ids.shape)}")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    windows = eval_windows(ids.numel(), seqlen, bos_token_id is not None)
    if not windows:
        raise ValueError(f"{ids.numel()} tokens are too few to score anything with seqlen={seqlen}")
    ids = ids.to(model_device(model))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    bar = tqdm(windows, desc=desc, unit="win", disable=not progress, leave=False)
    try:
        for start, end in bar:
            nll, n = window_nll(model, ids[start:end], bos_token_id)
            total += nll
            count += n
            bar.set_postfix(ppl=f"{math.exp(total / count):.3f}")
    finally:
        model.train(was_training)
    return math.exp(total / count)
