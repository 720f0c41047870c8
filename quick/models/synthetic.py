"""Large published model shapes with random weights, for speed work (throughput ignores weight values).

The configs in ``configs/`` are written from the published numbers (hidden size, layers, heads, KV heads,
FFN size, vocabulary) of Llama-2-7B/13B, Mistral-7B-v0.1 and Llama-3-8B.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from quick.models.linears import DEFAULT_SKIP, parent_of, quantizable_linears
from quick.nn.linear import QuickLinear

CONFIG_DIR = Path(__file__).with_name("configs")


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(name: str):
    """A transformers config object for a bundled shape name (e.g. ``llama-2-7b``)."""
    from transformers import AutoConfig

    path = CONFIG_DIR / f"{name}.json"
    if not path.exists():
        raise ValueError(f"unknown model shape '{name}'; bundled: {available_configs()}")
    data = json.loads(path.read_text())
    model_type = data.pop("model_type")
    return AutoConfig.for_model(model_type, **data)


def random_quick_linear(
    k: int, n: int, group_size: int, layout: str, dtype: torch.dtype, device, bias: bool = False
) -> QuickLinear:
    """A QuickLinear with random codes, zeros and small scales, packed on ``device`` without RTN."""
    mod = QuickLinear(k, n, bias, group_size, layout, dtype, device)
    fill_random_packed_(mod.packed(), dtype)
    return mod


def fill_random_packed_(buffers: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Random codes and zero points, small positive scales (weights of std ~0.02 keep activations O(1) through many
    layers), in place on the buffers' device."""
    for name, buf in buffers.items():
        if buf.dtype == torch.int32:
            buf.copy_(torch.randint(-(2**31), 2**31 - 1, buf.shape, dtype=torch.int32, device=buf.device))
        elif name == "zeros":
            buf.copy_(torch.randint(0, 16, buf.shape, device=buf.device).to(dtype))
        else:
            buf.copy_((torch.rand(buf.shape, device=buf.device) * 0.002 + 0.002).to(dtype))


def build_random_model(
    name: str,
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cuda",
    quantized: bool = False,
    group_size: int = 128,
    layout: str = "quick",
    num_layers: int | None = None,
    seed: int = 0,
    quantize_lm_head: bool = False,
) -> nn.Module:
    """Build a causal LM of a bundled shape with random weights; optionally with random packed 4-bit linears (the
    output projection too with ``quantize_lm_head``: it is a large share of the bytes a decode step reads)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = load_config(name)
    if num_layers is not None:
        cfg.num_hidden_layers = num_layers
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    if quantized:
        for lin_name, lin in quantizable_linears(model, () if quantize_lm_head else DEFAULT_SKIP):
            q = random_quick_linear(lin.in_features, lin.out_features, group_size, layout, dtype, device, False)
            parent, child = parent_of(model, lin_name)
            setattr(parent, child, q)
            del lin
    return model
