"""``AutoQuickForCausalLM``: load, quantize (AWQ or RTN), save and reload causal LMs in one object.

Mirrors AutoAWQ's API (``from_pretrained`` -> ``quantize`` -> ``save_quantized`` -> ``from_quantized``) so
existing scripts port over, with QUICK layouts as the default storage format.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quick.algorithms import rtn
from quick.checkpoint import (
    W4A8_VERSION,
    is_quantized_checkpoint,
    is_w4a8_config,
    load_quantized,
    make_quant_config,
    make_w4a8_quant_config,
    processor_files,
    save_quantized,
)
from quick.formats.layouts import LAYOUTS
from quick.formats.weights import SUPPORTED_DTYPES, SUPPORTED_GROUP_SIZES, QuantizationError
from quick.models.families import FamilyError, get_family
from quick.nn.dtypes import round_dense_, set_compute_dtype
from quick.nn.linear import padded_in_features

DEFAULT_QUANT_CONFIG: dict[str, Any] = {"w_bit": 4, "q_group_size": 128, "zero_point": True, "version": "quick"}
# AutoAWQ's AwqConfig key: substrings of module names that stay dense (added to the model family's own list)
SKIP_KEY = "modules_to_not_convert"
# AutoAWQ's name for its default calibration set (pile-val on the Hugging Face hub)
HUB_CALIBRATION_SETS = {"pileval": ("mit-han-lab/pile-val-backup", "validation")}
METHODS = ("awq", "rtn", "qqq")
W4A8_GROUP_SIZES = (-1, 128)
_VERSION_ALIASES = {"gemm": "awq_gemm", "awq": "awq_gemm", "sm90": "quick_sm90"}
_DEFAULT_MODEL_NAMES = ("default", "smollm2", "smollm2-135m")


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def validate_quant_config(quant_config: dict[str, Any] | None) -> dict[str, Any]:
    """Check an AutoAWQ-style config and fill defaults; ``version`` becomes a layout name.

    Raises :class:`QuantizationError` with the offending key and the accepted values. ``a_bit=8`` or
    ``version='w4a8'`` selects W4A8 (see :func:`validate_w4a8_config`); ``a_bit=16`` is the default W4A16.
    """
    raw = dict(quant_config or {})
    if raw.get("a_bit", 16) != 16 or str(raw.get("version", "")).lower() == W4A8_VERSION:
        return validate_w4a8_config(raw)
    raw.pop("a_bit", None)
    skip = raw.pop(SKIP_KEY, None)
    quant_config = raw
    qc = dict(DEFAULT_QUANT_CONFIG)
    unknown = set(quant_config or {}) - set(DEFAULT_QUANT_CONFIG)
    if unknown:
        raise QuantizationError(
            f"unknown quant_config keys {sorted(unknown)}; accepted: {sorted([*DEFAULT_QUANT_CONFIG, SKIP_KEY])}"
        )
    qc.update(quant_config or {})
    if qc["w_bit"] != 4:
        raise QuantizationError(f"w_bit={qc['w_bit']} is not supported; QUICK kernels are 4-bit only (w_bit=4)")
    if qc["q_group_size"] not in SUPPORTED_GROUP_SIZES:
        raise QuantizationError(
            f"q_group_size={qc['q_group_size']} is not supported; "
            f"choose one of {SUPPORTED_GROUP_SIZES} (-1 = per channel)"
        )
    if not isinstance(qc["zero_point"], bool):
        raise QuantizationError(f"zero_point must be true or false, got {qc['zero_point']!r}")
    version = str(qc["version"]).lower()
    version = _VERSION_ALIASES.get(version, version)
    if version not in LAYOUTS:
        raise QuantizationError(
            f"unknown version {qc['version']!r}; choose one of {sorted(LAYOUTS)} ('gemm' = AutoAWQ's format; "
            "AutoAWQ's GEMV, Marlin and ExLlama formats are not written)"
        )
    qc["version"] = version
    if skip is not None:
        if isinstance(skip, str) or not all(isinstance(x, str) for x in skip):
            raise QuantizationError(f"{SKIP_KEY} must be a list of module-name substrings, got {skip!r}")
        qc[SKIP_KEY] = list(skip)
    return qc


def validate_w4a8_config(quant_config: dict[str, Any]) -> dict[str, Any]:
    """Check a W4A8 config ``{"w_bit": 4, "a_bit": 8, "q_group_size": -1 | 128, "version": "w4a8"}``.

    W4A8 weights are symmetric int4 (per channel, or per group of 128 with an int8 group scale) and the
    activations per-token int8, so ``zero_point`` may only be false and no other group size or bit width exists.
    """
    allowed = {*DEFAULT_QUANT_CONFIG, "a_bit"}
    unknown = set(quant_config) - allowed
    if unknown:
        raise QuantizationError(f"unknown quant_config keys {sorted(unknown)}; accepted: {sorted(allowed)}")
    if quant_config.get("w_bit", 4) != 4:
        raise QuantizationError(f"w_bit={quant_config['w_bit']} is not supported; W4A8 has 4-bit weights (w_bit=4)")
    a_bit = quant_config.get("a_bit", 8)
    if a_bit != 8:
        raise QuantizationError(
            f"a_bit={a_bit} is not supported with version 'w4a8'; W4A8 quantizes activations to 8 bits (a_bit=8), "
            "16-bit activations are the default W4A16 versions (quick, quick_sm90, gemm)"
        )
    version = str(quant_config.get("version", W4A8_VERSION)).lower()
    if version != W4A8_VERSION:
        raise QuantizationError(f"a_bit=8 needs version 'w4a8', got {quant_config['version']!r}")
    group = quant_config.get("q_group_size", 128)
    if group not in W4A8_GROUP_SIZES:
        raise QuantizationError(
            f"q_group_size={group} is not supported for W4A8; choose one of {W4A8_GROUP_SIZES} (-1 = per channel)"
        )
    if quant_config.get("zero_point", False) is not False:
        raise QuantizationError("W4A8 weights are symmetric: zero_point must be false (or left out)")
    return {"w_bit": 4, "a_bit": 8, "q_group_size": group, "zero_point": False, "version": W4A8_VERSION}


def _config_dtype(path: Path) -> torch.dtype | None:
    """The dtype a dense checkpoint was saved in (``dtype``/``torch_dtype`` in config.json)."""
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = raw.get("dtype") or raw.get("torch_dtype") or (raw.get("text_config") or {}).get("dtype")
    return getattr(torch, str(name), None) if name else None


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A directory, or one of the names of the bundled default model (converted once, then cached)."""
    if str(path).lower() in _DEFAULT_MODEL_NAMES and not Path(path).exists():
        from quick.models.loading import default_model_dir

        return default_model_dir()
    return Path(path).expanduser()


def _windows(ids: torch.Tensor, n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    if ids.numel() < seqlen:
        raise QuantizationError(f"calibration text has {ids.numel()} tokens, fewer than seqlen={seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def calibration_tokens(
    tokenizer: Any,
    calib_data: str | os.PathLike | Sequence[str] | torch.Tensor | None = None,
    n_samples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    bos_token_id: int | None = None,
    split: str = "train",
    text_column: str = "text",
) -> torch.Tensor:
    """Calibration ids ``[n_samples, seqlen]``.

    ``calib_data``: ``None`` or ``"wiki"`` (the bundled Wikipedia calibration split), a text file path, a list of
    strings (joined like the corpus), ready token ids ``[n, seqlen]``, or the name of a Hugging Face dataset
    (AutoAWQ's convention: ``split`` and ``text_column`` pick the texts, ``"pileval"`` is its default set; needs
    the ``datasets`` package and hub access). Windows start at seeded random offsets of the concatenated text.
    With ``bos_token_id`` every window starts with BOS (Gemma needs it).
    """
    if isinstance(calib_data, torch.Tensor):
        ids = calib_data.long()
        if ids.dim() != 2:
            raise QuantizationError(f"calibration ids must be [n, seqlen], got shape {tuple(ids.shape)}")
        return ids
    if n_samples < 1 or seqlen < 2:
        raise QuantizationError(f"n_samples must be >= 1 and seqlen >= 2, got {n_samples}, {seqlen}")
    if isinstance(calib_data, str) and calib_data.lower() in ("wiki", "wikipedia") and not Path(calib_data).exists():
        calib_data = None
    if calib_data is None:
        from quick.data.corpus import calibration_samples

        samples = calibration_samples(tokenizer, n_samples, seqlen, seed)
    else:
        if isinstance(calib_data, (str, os.PathLike)):
            p = Path(calib_data).expanduser()
            if p.is_file():
                text = p.read_text(encoding="utf-8", errors="replace")
            elif isinstance(calib_data, str) and not p.suffix and os.sep not in calib_data.strip("/"):
                text = "\n\n".join(hub_calibration_texts(calib_data, split, text_column))
            else:
                raise QuantizationError(f"calibration file {p} not found")
        else:
            texts = [str(t) for t in calib_data]
            if not texts:
                raise QuantizationError("calibration data is an empty list")
            text = "\n\n".join(texts)
        raw = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        samples = _windows(torch.tensor(raw, dtype=torch.long), n_samples, seqlen, seed)
    if bos_token_id is not None:
        samples = torch.cat([torch.full_like(samples[:, :1], bos_token_id), samples[:, :-1]], dim=1)
    return samples


def hub_calibration_texts(name: str, split: str = "train", text_column: str = "text") -> list[str]:
    """The ``text_column`` of split ``split`` of the Hugging Face dataset ``name`` (``"pileval"``: AutoAWQ's
    default set); a clear error where the ``datasets`` package or the hub is not reachable."""
    hint = "offline, pass calib_data=None (the bundled Wikipedia calibration split), a text file, or a list of strings"
    repo, default_split = HUB_CALIBRATION_SETS.get(name.lower(), (name, None))
    try:
        import datasets
    except ImportError:
        raise QuantizationError(
            f"calib_data {name!r} is not a file, so it names a Hugging Face dataset; loading one needs the "
            f"`datasets` package and hub access ({hint})"
        ) from None
    try:
        data = datasets.load_dataset(repo, split=default_split or split)
        texts = [str(t) for t in data[text_column] if str(t).strip()]
    except Exception as e:  # hub errors come in many types; all of them mean "cannot calibrate on this"
        raise QuantizationError(
            f"cannot load calibration dataset {repo!r} (split {default_split or split!r}, column {text_column!r}): "
            f"{type(e).__name__}: {e} ({hint})"
        ) from None
    if not texts:
        raise QuantizationError(f"calibration dataset {repo!r} has no text in column {text_column!r}")
    return texts


def quantize_model_rtn(
    model: nn.Module,
    group_size: int = 128,
    layout: str = "quick",
    zero_point: bool = True,
    scale_dtype: torch.dtype = torch.float16,
    skip: Sequence[str] = ("lm_head",),
) -> nn.Module:
    """Round-to-nearest every linear except ``skip`` (ragged last groups allowed), like AWQ's packing; the
    dense parameters are rounded to ``scale_dtype`` as a checkpoint stores them."""
    model_dtype = next(model.parameters()).dtype
    with torch.no_grad():
        rtn.quantize_model_rtn(model, group_size, layout, zero_point, scale_dtype, skip, progress=False)
    round_dense_(model, scale_dtype)
    set_compute_dtype(model, model_dtype)
    return model


def _check_calibrated_skip(model: nn.Module, family: Any, extra: Sequence[str], method: str) -> None:
    """AWQ / QQQ scale each decoder layer's linears as groups; leaving one of them dense is only possible with RTN."""
    from quick.algorithms.awq import layer_linears
    from quick.models.families import decoder_layers

    for i, layer in enumerate(decoder_layers(model, family)):
        hit = [n for n in layer_linears(layer, family) if any(s in n for s in extra)]
        if hit:
            raise QuantizationError(
                f"modules_to_not_convert {list(extra)} names decoder-layer linears "
                f"({family.layers_path}.{i}.{hit[0]}); {method.upper()} calibrates them as groups, so keeping one "
                "dense needs method='rtn'"
            )


def check_layout_fits(model: nn.Module, qc: dict[str, Any], skip: Sequence[str]) -> None:
    """Raise before quantizing when the layout of ``qc`` cannot store a layer that will be quantized: AutoAWQ's
    GEMM format (``version 'gemm'``) has no ragged last group, so every K must be a multiple of the group size
    (SmolLM2's K = 576 is not one of 128)."""
    from quick.models.linears import quantizable_linears

    layout, g = qc["version"], qc["q_group_size"]
    if layout != "awq_gemm" or g == -1:
        return
    ragged = [(n, m.in_features) for n, m in quantizable_linears(model, skip)
              if padded_in_features(m.in_features, g, layout) != m.in_features]  # fmt: skip
    if ragged:
        name, k = ragged[0]
        fits = [c for c in SUPPORTED_GROUP_SIZES if c > 0 and all(kk % c == 0 for _, kk in ragged)]
        raise QuantizationError(
            f"AutoAWQ's GEMM format (version 'gemm') cannot store a ragged last group: {len(ragged)} layers have "
            f"in_features not divisible by q_group_size={g} (e.g. {name}, K={k}). Use version 'quick' (ragged "
            f"groups are zero-padded there)" + (f" or q_group_size in {fits}" if fits else "")
        )


class AutoQuickForCausalLM:
    """A transformers causal LM plus its tokenizer, quantization state and config.

    ``model`` is a plain transformers model (packed layers are ``QuickLinear``), so anything that takes a
    model -- ``generate``, perplexity, pipelines -- takes it too.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        quant_config: dict[str, Any] | None = None,
        weight_dtype: torch.dtype | None = None,
        path: Path | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.quant_config = quant_config
        self.weight_dtype = weight_dtype or torch.float16
        self.path = path
        self.quantization_time_s: float | None = None

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> AutoQuickForCausalLM:
        """Load a dense Hugging Face checkpoint (or a quantized one, via :meth:`from_quantized`).

        ``dtype``: compute dtype (default fp32 on CPU, where half-precision matmuls are very slow, else the
        checkpoint's dtype). The checkpoint's own fp16/bf16 dtype becomes the dtype of the packed scales.
        """
        p = resolve_model_path(path)
        if is_quantized_checkpoint(p):
            return cls.from_quantized(p, device=device, dtype=dtype)
        from quick.models.loading import load_model

        device = torch.device(device) if device is not None else default_device()
        stored = _config_dtype(p)
        weight_dtype = stored if stored in SUPPORTED_DTYPES else torch.float16
        if dtype is None:
            dtype = torch.float32 if device.type == "cpu" else weight_dtype
        model, tokenizer = load_model(p, dtype, device)
        return cls(model, tokenizer, None, weight_dtype, p)

    @classmethod
    def from_quantized(
        cls,
        path: str | os.PathLike,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        layout: str | None = None,
        verify: bool = True,
    ) -> AutoQuickForCausalLM:
        """Load a 4-bit checkpoint: QUICK, AutoAWQ GEMM, compressed-tensors W4A16 (llm-compressor) or GPTQ
        (GPTQModel / AutoGPTQ), told apart by ``quantization_config``; other formats' tensors are repacked into
        ``layout`` (default: the fastest for ``device``), never requantized. See docs/checkpoints.md.

        ``dtype``: compute dtype of the dense parts (default fp32 on CPU, else the stored dtype). ``verify``: check
        the shards of a QUICK checkpoint against the SHA-256 recorded at save (``False`` skips it for trusted files).
        """
        p = Path(path).expanduser()
        device = torch.device(device) if device is not None else default_device()
        if dtype is None and device.type == "cpu":
            dtype = torch.float32
        model = load_quantized(p, device=device, dtype=dtype, layout=layout, verify=verify)
        tokenizer = _load_tokenizer(p)
        qc = model.quick_quant_config
        if is_w4a8_config(qc):
            config = validate_w4a8_config({"q_group_size": qc["group_size"]})
            weight_dtype = next(m.dtype for m in model.modules() if hasattr(m, "channel_scale"))
            auto = cls(model, tokenizer, config, weight_dtype, p)
            auto._method = qc.get("method", "qqq")
            return auto
        weight_dtype = next(m.dtype for m in model.modules() if hasattr(m, "qweight"))
        config = {
            "w_bit": 4,
            "q_group_size": qc["group_size"],
            "zero_point": qc["zero_point"],
            "version": layout or (qc["version"] if qc["quant_method"] == "quick" else "awq_gemm"),
        }
        return cls(model, tokenizer, config, weight_dtype, p)

    # ------------------------------------------------------------------------------------- quantization

    @property
    def is_quantized(self) -> bool:
        return self.quant_config is not None

    @property
    def device(self) -> torch.device:
        for t in self.model.parameters():
            return t.device
        return torch.device("cpu")

    def quantize(
        self,
        tokenizer: Any = None,
        quant_config: dict[str, Any] | None = None,
        calib_data: str | os.PathLike | Sequence[str] | torch.Tensor | None = None,
        method: str | None = None,
        n_samples: int = 128,
        seqlen: int = 512,
        seed: int = 0,
        search_samples: int | None = None,
        duo_scaling: bool = False,
        batch_size: int = 8,
        progress: bool = True,
        qqq_options: dict[str, Any] | None = None,
        apply_clip: bool = True,
        split: str = "train",
        text_column: str = "text",
    ) -> AutoQuickForCausalLM:
        """Quantize in place. ``method``: 'awq' (calibrated scales + clipping) or 'rtn' (round to nearest);
        for W4A8 configs (``a_bit=8``) 'qqq' (smoothing + GPTQ, the default there) or 'rtn'.

        ``calib_data``: ``None`` = Wikipedia calibration split (``n_samples`` x ``seqlen`` tokens), a text
        file, a list of strings, token ids ``[n, seqlen]``, or a Hugging Face dataset name (``split``,
        ``text_column``; see :func:`calibration_tokens`). ``apply_clip``: AWQ's clipping search (on by default).
        ``quant_config["modules_to_not_convert"]``: substrings of module names that stay dense, on top of the
        family's own. Records the wall time in ``quantization_time_s``. ``qqq_options``: further keyword
        arguments of :func:`quick.algorithms.qqq.quantize_model_qqq` (``n_grid``, ``act_order``, ``damp``, ``smooth``,
        ``gptq``).
        """
        if self.is_quantized:
            raise QuantizationError("model is already quantized")
        qc = validate_quant_config(quant_config)
        w4a8 = qc["version"] == W4A8_VERSION
        method = method or ("qqq" if w4a8 else "awq")
        if method not in METHODS:
            raise QuantizationError(f"unknown method {method!r}; choose one of {METHODS}")
        if w4a8 and method == "awq":
            raise QuantizationError("W4A8 (a_bit=8) is quantized with method 'qqq' (smoothing + GPTQ) or 'rtn'")
        if not w4a8 and method == "qqq":
            raise QuantizationError("method 'qqq' makes W4A8 models; pass a_bit=8 and version 'w4a8' in quant_config")
        tokenizer = tokenizer or self.tokenizer
        try:
            family = get_family(self.model.config)
        except FamilyError:
            if method in ("awq", "qqq"):
                raise
            family = None
        skip = tuple(family.modules_to_not_convert if family else ("lm_head",))
        extra = tuple(s for s in qc.get(SKIP_KEY, ()) if s not in skip)
        if extra:
            if method != "rtn" and family is not None:
                _check_calibrated_skip(self.model, family, extra, method)
            skip += extra
            if family is not None:
                family = dataclasses.replace(family, modules_to_not_convert=skip)
        if not w4a8:
            check_layout_fits(self.model, qc, skip)  # fail now, not at save time after the whole calibration
        start = time.perf_counter()
        samples = None
        if method in ("awq", "qqq"):
            if tokenizer is None and not isinstance(calib_data, torch.Tensor):
                raise QuantizationError(
                    f"{method.upper()} needs a tokenizer (or calibration token ids) for its calibration data"
                )
            bos = tokenizer.bos_token_id if family.requires_bos and tokenizer is not None else None
            samples = calibration_tokens(tokenizer, calib_data, n_samples, seqlen, seed, bos, split, text_column)
        calib = {"search_samples": search_samples, "batch_size": batch_size, "family": family, "progress": progress}
        if w4a8:
            self._quantize_w4a8(qc, method, skip, samples, calib, qqq_options)
        elif method == "awq":
            from quick.algorithms.awq import quantize_model_awq

            quantize_model_awq(
                self.model, samples, group_size=qc["q_group_size"], zero_point=qc["zero_point"], layout=qc["version"],
                scale_dtype=self.weight_dtype, clip=apply_clip, duo_scaling=duo_scaling, **calib,
            )  # fmt: skip
        else:
            quantize_model_rtn(self.model, qc["q_group_size"], qc["version"], qc["zero_point"], self.weight_dtype, skip)
        self.quantization_time_s = time.perf_counter() - start
        self.quant_config = qc
        self._skip = tuple(skip)
        self._method = method
        return self

    def _quantize_w4a8(
        self, qc: dict[str, Any], method: str, skip: Sequence[str], samples: torch.Tensor | None,
        calib: dict[str, Any], qqq_options: dict[str, Any] | None,
    ) -> None:  # fmt: skip
        """QQQ (calibrated on ``samples``, with ``calib``'s keyword arguments) or RTN W4A8; dense parameters rounded
        to the checkpoint dtype either way."""
        if method == "rtn":
            with torch.no_grad():
                rtn.quantize_model_rtn_w4a8(self.model, qc["q_group_size"], self.weight_dtype, skip, progress=False)
            round_dense_(self.model, self.weight_dtype)
            return
        from quick.algorithms.qqq import quantize_model_qqq

        self.qqq_reports = []  # per layer: the smoothing strength chosen for each scale group and its losses
        quantize_model_qqq(
            self.model, samples, group_size=qc["q_group_size"], dtype=self.weight_dtype, reports=self.qqq_reports,
            **calib, **(qqq_options or {}),
        )  # fmt: skip

    def save_quantized(self, out_dir: str | os.PathLike, max_shard_size: int | None = None) -> Path:
        """Write the quantized model, its config, tokenizer and processor files to ``out_dir`` (atomically)."""
        if not self.is_quantized:
            raise QuantizationError("quantize the model (or load a quantized one) before save_quantized")
        qc = self.quant_config
        skip = getattr(self, "_skip", None) or ("lm_head",)
        kwargs: dict[str, Any] = {"tokenizer": self.tokenizer, "extra_files": processor_files(self.path)}
        if max_shard_size is not None:
            kwargs["max_shard_size"] = max_shard_size
        if qc["version"] == W4A8_VERSION:
            config = make_w4a8_quant_config(qc["q_group_size"], getattr(self, "_method", "qqq"), "w4a8", skip)
            return save_quantized(self.model, out_dir, config, **kwargs)
        config = make_quant_config(qc["version"], qc["q_group_size"], qc["zero_point"], skip)
        return save_quantized(self.model, out_dir, config, **kwargs)

    # ---------------------------------------------------------------------------------------- inference

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``model.generate`` (transformers' generation, all its arguments)."""
        return self.model.generate(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def to(self, device: torch.device | str) -> AutoQuickForCausalLM:
        self.model.to(device)
        return self


def _load_tokenizer(path: Path) -> Any:
    """The checkpoint's tokenizer, or ``None`` when it has none (AutoAWQ exports usually include one)."""
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
