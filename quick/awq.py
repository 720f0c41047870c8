"""AutoAWQ's API on QUICK: ``from quick.awq import AutoAWQForCausalLM`` runs AutoAWQ quantization scripts unchanged.

::

    model = AutoAWQForCausalLM.from_pretrained(path)
    model.quantize(tokenizer, quant_config={"zero_point": True, "q_group_size": 128, "w_bit": 4, "version": "QUICK"})
    model.save_quantized(out)
    model = AutoAWQForCausalLM.from_quantized(out, fuse_layers=True)

A thin layer over :class:`quick.auto.AutoQuickForCausalLM`: AutoAWQ's keyword arguments are translated where they
have a QUICK meaning (``max_calib_samples`` -> samples, ``max_calib_seq_len`` -> window length, ``shard_size``,
``fuse_layers``, ``device_map`` naming one device, ...), accepted silently where they only tune AutoAWQ's own memory
use or kernels' caches, and refused or warned about where QUICK cannot do what they ask (see docs/integrations.md).
Differences a script may notice: without ``calib_data`` the calibration set is the bundled Wikipedia split (AutoAWQ
downloads pile-val; ``calib_data="pileval"`` still asks the hub for it), and a model runs on one device.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from quick.auto import AutoQuickForCausalLM, resolve_model_path
from quick.formats.weights import QuantizationError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})
_ONE_DEVICE_MAPS = (None, "auto", "balanced", "balanced_low_0", "sequential")
_OTHER_KERNELS = ("use_exllama", "use_exllama_v2", "use_ipex", "use_qbits", "use_marlin")
_QUIET = {
    # AutoAWQ knobs for its own memory use or its fused kernels' caches: nothing to do here
    "low_cpu_mem_usage",
    "use_cache",
    "max_chunk_memory",
    "max_seq_len",
    "batch_size",
    "max_new_tokens",
}


def _warn(message: str) -> None:
    warnings.warn(f"quick.awq: {message}", UserWarning, stacklevel=3)


def parse_shard_size(size: int | str | None) -> int | None:
    """AutoAWQ/transformers shard sizes (``"5GB"``, ``"500MiB"``, bytes as an int) -> bytes."""
    if size is None or (isinstance(size, int) and not isinstance(size, bool)):
        if size is not None and size <= 0:
            raise ValueError(f"shard_size must be positive, got {size}")
        return size
    m = _SIZE.match(str(size))
    if not m:
        raise ValueError(f"shard_size {size!r} is not a size like '5GB', '500MB' or a number of bytes")
    n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if n <= 0:
        raise ValueError(f"shard_size must be positive, got {size!r}")
    return n


def _device(device_map: Any) -> str | None:
    """A device for an AutoAWQ ``device_map``: the automatic maps mean "the default device"; a map naming
    several devices is refused (QUICK runs a model on one device)."""
    if device_map is None or (isinstance(device_map, str) and device_map in _ONE_DEVICE_MAPS):
        return None
    if isinstance(device_map, (str, int, torch.device)):
        return str(device_map) if not isinstance(device_map, int) else f"cuda:{device_map}"
    if isinstance(device_map, dict):
        devices = {str(v) if not isinstance(v, int) else f"cuda:{v}" for v in device_map.values()}
        if len(devices) == 1:
            return devices.pop()
        raise ValueError(
            f"device_map places the model on several devices {sorted(devices)}; QUICK runs a model on one device"
        )
    raise TypeError(f"device_map must be a string, a device or a dict, got {type(device_map).__name__}")


def _dtype(torch_dtype: Any) -> torch.dtype | None:
    if torch_dtype is None or torch_dtype == "auto":
        return None
    if isinstance(torch_dtype, str):
        from quick.models.loading import parse_dtype

        return parse_dtype(torch_dtype)
    return torch_dtype


def _check_remote_code(path: Path, trust_remote_code: bool) -> None:
    """QUICK quantizes the architectures transformers ships; a checkpoint with its own model code is refused."""
    try:
        auto_map = json.loads((path / "config.json").read_text()).get("auto_map")
    except (OSError, ValueError):
        return  # the loader reports a missing or broken config itself
    if auto_map and trust_remote_code:
        raise ValueError(
            f"{path} brings its own model code (auto_map in config.json); QUICK supports the architectures built "
            "into transformers only (see quick.models.families)"
        )


def _leftovers(kwargs: dict[str, Any], where: str) -> None:
    for key in _OTHER_KERNELS:
        if kwargs.pop(key, False):
            _warn(f"{where}: {key}=True ignored; QUICK runs its own kernels")
    for key in _QUIET:
        kwargs.pop(key, None)
    if kwargs.pop("download_kwargs", None):
        _warn(f"{where}: download_kwargs ignored; give a local directory")
    if kwargs:
        _warn(f"{where}: ignoring arguments QUICK does not use: {sorted(kwargs)}")


class AWQForCausalLM(AutoQuickForCausalLM):
    """An :class:`AutoQuickForCausalLM` whose ``quantize`` and ``save_quantized`` take AutoAWQ's arguments."""

    def quantize(  # type: ignore[override]
        self,
        tokenizer: Any = None,
        quant_config: dict[str, Any] | None = None,
        calib_data: str | list[str] | None = None,
        split: str = "train",
        text_column: str = "text",
        duo_scaling: bool = True,
        export_compatible: bool = False,
        apply_clip: bool = True,
        n_parallel_calib_samples: int | None = None,
        max_calib_samples: int = 128,
        max_calib_seq_len: int = 512,
        max_chunk_memory: int | None = None,
        quantizer_cls: Any = None,
        **kwargs: Any,
    ) -> None:
        """AutoAWQ's ``quantize``: AWQ with QUICK packing. ``calib_data``: ``None`` = the bundled Wikipedia
        calibration split, a list of texts, a text file, or a Hugging Face dataset name (``"pileval"``, hub
        needed). ``max_calib_samples`` windows of ``max_calib_seq_len`` tokens; ``n_parallel_calib_samples``: the
        calibration batch (default 8). ``duo_scaling`` defaults to True as in AutoAWQ."""
        if export_compatible:
            raise QuantizationError(
                "export_compatible=True (apply AWQ scales, keep fp16 weights) is not supported: QUICK packs the "
                "weights; for a scaled float model call quick.algorithms.awq.quantize_model_awq(..., "
                "quantize_weights=False)"
            )
        if quantizer_cls is not None:
            raise QuantizationError("quantizer_cls is AutoAWQ's extension point; QUICK's AWQ cannot be swapped")
        kwargs.pop("max_chunk_memory", None)
        method = kwargs.pop("method", None)
        progress = kwargs.pop("progress", True)
        seed = kwargs.pop("seed", 0)
        _leftovers(kwargs, "quantize")
        super().quantize(
            tokenizer,
            quant_config,
            calib_data=calib_data,
            method=method,
            n_samples=max_calib_samples,
            seqlen=max_calib_seq_len,
            seed=seed,
            duo_scaling=duo_scaling,
            batch_size=n_parallel_calib_samples or 8,
            progress=progress,
            apply_clip=apply_clip,
            split=split,
            text_column=text_column,
        )

    def save_quantized(  # type: ignore[override]
        self, save_dir: str | os.PathLike, safetensors: bool = True, shard_size: int | str = "5GB"
    ) -> Path:
        """AutoAWQ's ``save_quantized``: safetensors shards of at most ``shard_size`` (``"5GB"``, bytes)."""
        if not safetensors:
            _warn("save_quantized: safetensors=False ignored; QUICK checkpoints are safetensors only")
        return super().save_quantized(save_dir, max_shard_size=parse_shard_size(shard_size))


class AutoAWQForCausalLM:
    """AutoAWQ's entry point: :meth:`from_pretrained` (a dense model to quantize) and :meth:`from_quantized`."""

    def __init__(self) -> None:
        raise TypeError("create AutoAWQForCausalLM with AutoAWQForCausalLM.from_pretrained or .from_quantized")

    @classmethod
    def from_pretrained(
        cls,
        model_path: str | os.PathLike,
        trust_remote_code: bool = True,
        safetensors: bool = True,
        device_map: Any = None,
        download_kwargs: dict[str, Any] | None = None,
        **model_init_kwargs: Any,
    ) -> AWQForCausalLM:
        """A dense Hugging Face model to quantize (``"smollm2"``: the bundled SmolLM2-135M). ``torch_dtype``
        (in ``model_init_kwargs``): the compute dtype (default fp32 on CPU, else the checkpoint's)."""
        path = resolve_model_path(model_path)
        _check_remote_code(path, trust_remote_code)
        device = _device(device_map)
        dtype = _dtype(model_init_kwargs.pop("torch_dtype", model_init_kwargs.pop("dtype", None)))
        model_init_kwargs.pop("model_type", None)
        model_init_kwargs["download_kwargs"] = download_kwargs
        _leftovers(model_init_kwargs, "from_pretrained")
        auto = AutoQuickForCausalLM.from_pretrained(path, dtype=dtype, device=device)
        return _as_awq(auto)

    @classmethod
    def from_quantized(
        cls,
        quant_path: str | os.PathLike,
        quant_filename: str = "",
        max_seq_len: int = 2048,
        trust_remote_code: bool = True,
        fuse_layers: bool = True,
        use_exllama: bool = False,
        use_exllama_v2: bool = False,
        use_ipex: bool = False,
        batch_size: int = 1,
        safetensors: bool = True,
        device_map: Any = "balanced",
        max_memory: Any = None,
        offload_folder: str | None = None,
        download_kwargs: dict[str, Any] | None = None,
        **config_kwargs: Any,
    ) -> AWQForCausalLM:
        """A QUICK or AutoAWQ-GEMM checkpoint on QUICK kernels. ``fuse_layers``: one product for q/k/v and one for
        gate/up per layer (:func:`quick.models.fuse.fuse_model`); the model is then for inference, not saving."""
        path = Path(quant_path).expanduser()
        _check_remote_code(path, trust_remote_code)
        if quant_filename:
            _warn(f"from_quantized: quant_filename={quant_filename!r} ignored; the checkpoint's index names its files")
        if max_memory or offload_folder:
            raise ValueError("max_memory / offload_folder: QUICK runs a model on one device, without offloading")
        device = _device(device_map)
        dtype = _dtype(config_kwargs.pop("torch_dtype", config_kwargs.pop("dtype", None)))
        config_kwargs.update(use_exllama=use_exllama, use_exllama_v2=use_exllama_v2, use_ipex=use_ipex)
        config_kwargs["download_kwargs"] = download_kwargs
        _leftovers(config_kwargs, "from_quantized")
        auto = _as_awq(AutoQuickForCausalLM.from_quantized(path, device=device, dtype=dtype))
        if fuse_layers:
            from quick.models.families import FamilyError
            from quick.models.fuse import fuse_model

            try:
                fuse_model(auto.model)
            except FamilyError as e:
                _warn(f"from_quantized: fuse_layers skipped ({e})")
        return auto


def _as_awq(auto: AutoQuickForCausalLM) -> AWQForCausalLM:
    """The same state under the AutoAWQ-flavoured class."""
    out = AWQForCausalLM.__new__(AWQForCausalLM)
    out.__dict__.update(auto.__dict__)
    return out
