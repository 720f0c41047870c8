"""Short text generation for sanity checks: does the (quantized) model still say sensible things?"""

from __future__ import annotations

import torch
from torch import nn

from quick.eval.perplexity import model_device


@torch.no_grad()
def generate_text(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 32,
    greedy: bool = True,
    chat: bool = False,
) -> str:
    """The model's continuation of ``prompt`` (new text only, special tokens dropped).

    Plain-text continuation by default, so base and instruct models are compared on the same input;
    ``chat=True`` wraps the prompt in the tokenizer's chat template as one user turn. Greedy decoding
    makes the original-vs-quantized comparison deterministic.
    """
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tokenizer(prompt, return_tensors="pt")  # default special tokens: BOS for models that want it
    enc = {k: v.to(model_device(model)) for k, v in enc.items()}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # greedy: also clear sampling knobs a checkpoint's generation_config may carry (they would only warn)
    sampling = {"temperature": None, "top_p": None, "top_k": None}
    kwargs = {"do_sample": True} if not greedy else {"do_sample": False, **sampling}
    out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=pad_id, **kwargs)
    new_tokens = out[0, enc["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True)
