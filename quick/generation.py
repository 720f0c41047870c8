"""Text generation: transformers' ``generate`` for sanity checks (does the quantized model still say sensible
things?), or the static-cache generator (:mod:`quick.inference`) for speed."""

from __future__ import annotations

import torch
from torch import nn

from quick.eval.perplexity import model_device


def fast_step_unavailable(model: nn.Module, max_len: int) -> str | None:
    """Why the few-kernel decode step does not implement this model for ``max_len`` positions (None: it does)."""
    from quick.models.decoder import UnsupportedModel, check_supported
    from quick.models.families import FamilyError

    try:
        check_supported(model, max_len)
    except (UnsupportedModel, FamilyError) as err:
        return str(err)
    return None


def static_compile_mode(model: nn.Module, max_len: int, device: torch.device) -> str:
    """How :class:`~quick.inference.StaticGenerator` should decode this model: the few-kernel step on a GPU where
    the model is llama-like (``"fast"``), else transformers' layers with compiled regions; on the CPU, where
    graphs and inductor's C++ build cost more than they save, plain eager (``"none"``)."""
    if device.type != "cuda":
        return "none"
    return "regions" if fast_step_unavailable(model, max_len) else "fast"


def describe_decode(model: nn.Module, max_len: int, device: torch.device) -> str:
    """One line for the user: which decode path :func:`static_generate` takes here, and why not the fastest."""
    if device.type != "cuda":
        return "decode: transformers' layers, eager (CPU)"
    why = fast_step_unavailable(model, max_len)
    if why is None:
        return "decode: the few-kernel step in a CUDA graph"
    return f"decode: transformers' layers, compiled regions in a CUDA graph (no few-kernel step: {why})"


def eos_ids(model: nn.Module, tokenizer=None) -> set[int]:
    """Token ids that end a generation: the tokenizer's EOS and the model's generation config's (int or list)."""
    ids: set[int] = set()
    cfg = getattr(model, "generation_config", None)
    for v in (getattr(tokenizer, "eos_token_id", None), getattr(cfg, "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list | tuple):
            ids.update(int(i) for i in v)
    return ids


@torch.no_grad()
def static_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    stop: set[int] | None = None,
    warmup: bool = False,
) -> tuple[torch.Tensor, object]:
    """Greedy continuation of ``input_ids [B, T]`` (equal lengths, no padding) on the static cache: CUDA graph of
    the decode step on a GPU (see :func:`static_compile_mode`). Returns the new tokens of each sequence, cut
    after the first stop token when ``B == 1`` (the generator always runs ``max_new_tokens`` steps: fixed
    shapes), and the :class:`~quick.inference.GenerationStats`. ``warmup``: first generate two tokens, so that
    builds and the graph capture are not in the timed run (tokens/s worth printing)."""
    from quick.inference import StaticGenerator

    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, tokens] with at least one token, got {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be token ids (int64 or int32), got {input_ids.dtype}")
    if input_ids.device != model_device(model):
        raise ValueError(f"input_ids are on {input_ids.device}, the model on {model_device(model)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    total = input_ids.shape[1] + max_new_tokens
    mode = static_compile_mode(model, total, input_ids.device)
    gen = StaticGenerator(model, input_ids.shape[0], total, compile=mode)
    if warmup and max_new_tokens >= 2:
        gen.generate(input_ids, 2)
    tokens, stats = gen.generate(input_ids, max_new_tokens)
    if stop and tokens.shape[0] == 1:
        hits = [i for i, t in enumerate(tokens[0].tolist()) if t in stop]
        if hits:
            tokens = tokens[:, : hits[0] + 1]
    return tokens, stats


def encode_prompt(tokenizer, prompt: str, chat: bool, device: torch.device) -> dict[str, torch.Tensor]:
    """Tokenizer outputs for one prompt on ``device``: plain text with the tokenizer's default special tokens
    (BOS for models that want it), or one user turn of its chat template."""
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


@torch.no_grad()
def generate_text(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 32,
    greedy: bool = True,
    chat: bool = False,
    fast: bool = False,
) -> str:
    """The model's continuation of ``prompt`` (new text only, special tokens dropped).

    Plain-text continuation by default, so base and instruct models are compared on the same input;
    ``chat=True`` wraps the prompt in the tokenizer's chat template as one user turn. Greedy decoding
    makes the original-vs-quantized comparison deterministic. ``fast``: greedy decoding on the static cache
    (:func:`static_generate`: CUDA graph and the few-kernel decode step on a GPU) instead of ``model.generate``.
    """
    enc = encode_prompt(tokenizer, prompt, chat, model_device(model))
    if fast:
        if not greedy:
            raise ValueError("fast generation is greedy only")
        new_tokens, _ = static_generate(model, enc["input_ids"], max_new_tokens, eos_ids(model, tokenizer))
        return tokenizer.decode(new_tokens[0], skip_special_tokens=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # greedy: also clear sampling knobs a checkpoint's generation_config may carry (they would only warn)
    sampling = {"temperature": None, "top_p": None, "top_k": None}
    kwargs = {"do_sample": True} if not greedy else {"do_sample": False, **sampling}
    out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=pad_id, **kwargs)
    new_tokens = out[0, enc["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True)
