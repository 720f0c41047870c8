"""transformers integration: ``AutoModelForCausalLM.from_pretrained(dir)`` of a QUICK checkpoint gives a model whose
quantized layers are :class:`~quick.nn.linear.QuickLinear` on the project's kernels.

Registered through transformers' public API (``register_quantization_config`` / ``register_quantizer`` for the
``quant_method`` ``"quick"`` that :func:`quick.checkpoint.make_quant_config` writes). ``import quick`` arranges the
registration without importing transformers (see :mod:`quick._hooks`); :func:`register` does it at once.

Loading: before the weights are read, every ``nn.Linear`` whose ``qweight`` the files hold becomes a ``QuickLinear``
in the stored layout (shapes from the safetensors headers, ragged last groups included); transformers then fills
its buffers like any other tensor. Afterwards the packed tensors are checked as
:func:`quick.checkpoint.load_quantized` checks them, packed layers run in the requested dense dtype through their
cast hooks, and on a GPU the layers are repacked (exactly) into the fastest layout there. ``save_pretrained``
writes the layout the checkpoint had, so a reload gives the same tensors. W4A8 checkpoints are not covered here
(``AutoQuickForCausalLM.from_quantized`` loads them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from quick.integrations.load_guard import QUANT_METHOD, drop_load_guard

_CONFIG_KEYS = ("bits", "group_size", "zero_point", "version", "modules_to_not_convert", "module_group_sizes")


class QuickConfig(QuantizationConfigMixin):
    """``quantization_config`` of a QUICK W4A16 checkpoint (the dict of :func:`quick.checkpoint.make_quant_config`).

    Only a pre-quantized checkpoint can be loaded with it (quantize with ``quick quantize`` or
    ``AutoQuickForCausalLM.quantize``); keys this version does not know are dropped on save.
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        zero_point: bool = True,
        version: str = "quick",
        modules_to_not_convert: list[str] | None = None,
        module_group_sizes: dict[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.group_size = group_size
        self.zero_point = zero_point
        self.version = version
        self.modules_to_not_convert = list(modules_to_not_convert or ["lm_head"])
        self.module_group_sizes = dict(module_group_sizes or {})
        self._extra = {k: v for k, v in kwargs.items() if k != "quant_method"}
        self.post_init()

    def post_init(self) -> None:
        from quick.checkpoint import CheckpointError, is_w4a8_config, layout_for_config

        raw = {"quant_method": QUANT_METHOD, **self._extra, **self._known()}
        if is_w4a8_config(raw):
            raise CheckpointError(
                "W4A8 QUICK checkpoints do not load through transformers' from_pretrained; use "
                "quick.AutoQuickForCausalLM.from_quantized(path)"
            )
        layout_for_config(raw)  # bits == 4 and a known layout, or a clear error
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool):
            raise CheckpointError(f"quantization_config group_size must be an integer, got {self.group_size!r}")
        if not isinstance(self.module_group_sizes, dict):
            raise CheckpointError("quantization_config module_group_sizes must be a JSON object")

    def _known(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _CONFIG_KEYS}

    def to_dict(self) -> dict[str, Any]:
        out = {"quant_method": QUANT_METHOD, **self._known()}
        if not out["module_group_sizes"]:
            del out["module_group_sizes"]
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    @property
    def layout(self) -> str:
        return str(self.version).lower()


class QuickHfQuantizer(HfQuantizer):
    """Loads QUICK checkpoints into ``QuickLinear`` layers (see the module docstring)."""

    requires_calibration = True  # pre-quantized checkpoints only: quantizing needs calibration data (AWQ)
    quantization_config: QuickConfig

    def __init__(self, quantization_config: QuickConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.dtype: torch.dtype | None = None

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("QUICK checkpoints cannot be offloaded to disk (device_map names 'disk')")

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        self.dtype = dtype  # the dense parts' dtype; packed layers keep their stored scale dtype
        return dtype

    # the hooks that see the model config before transformers resolves the weight files differ between versions
    # (update_tp_plan / update_ep_plan up to 5.17, update_attn_implementation later): each one drops the guard
    def update_attn_implementation(self, config: Any) -> Any:
        return drop_load_guard(config)

    def update_tp_plan(self, config: Any) -> Any:
        return drop_load_guard(getattr(super(), "update_tp_plan", lambda c: c)(config))

    def update_ep_plan(self, config: Any) -> Any:
        return drop_load_guard(getattr(super(), "update_ep_plan", lambda c: c)(config))

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        from quick.checkpoint import verify_checksums

        files = kwargs.get("checkpoint_files") or _checkpoint_files(model)
        verify_checksums(Path(files[0]).parent)  # the SHA-256 per shard that quick's writer records, if any
        meta = _headers(files)
        replace_with_quick_linear(model, meta, self.quantization_config)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        from quick.checkpoint import preferred_layout

        check_packed(model)
        packed = [*_packed(model).values(), *_stacks(model).values()]
        device = next((m.qweight.device for m in packed), torch.device("cpu"))
        if device.type == "cuda":
            repack(model, preferred_layout(device), keep_unfit=True)
        dtype = self.dtype or model.dtype
        for mod in _packed(model).values():
            mod.set_compute_dtype(dtype)
        model.quick_quant_config = self.quantization_config.to_dict()

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The model's state dict with every packed layer in the checkpoint's layout (``version``)."""
        from quick.formats.layouts import convert

        layout = self.quantization_config.layout
        state = model.state_dict()
        for name, mod in _packed(model).items():
            if mod.layout_name == layout:
                continue
            for t_name in mod.packed():
                del state[f"{name}.{t_name}"]
            tensors = convert(mod.packed(), mod.layout_name, layout, mod.in_features, mod.out_features, mod.group_size)
            state.update({f"{name}.{t}": v for t, v in tensors.items()})
        for name, st in _stacks(model).items():
            if st.layout_name != layout:
                for t_name in st.packed():
                    del state[f"{name}.{t_name}"]
                state.update({f"{name}.{t}": v for t, v in st.tensors_in(layout).items()})
        return state, {}

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """``model.dequantize()``: every ``QuickLinear`` becomes an ``nn.Linear`` holding its dequantized weight, every
        ``QuickMoEExperts`` transformers' experts module it replaced, holding the dequantized stacks."""
        from quick.nn.moe import QuickMoEExperts

        for name, ex in [(n, m) for n, m in model.named_modules() if isinstance(m, QuickMoEExperts)]:
            cls, config = ex.dense_module
            gate_up, down = ex.dequantized_weights(dtype or model.dtype)
            with torch.device("meta"):
                fused = cls(config)
            fused.to_empty(device=gate_up.device)
            with torch.no_grad():
                fused.gate_up_proj.copy_(gate_up)
                fused.down_proj.copy_(down)
            _replace(model, name, fused.to(gate_up.dtype))
        for name, mod in _packed(model).items():
            dt = dtype or mod.compute_dtype or mod.dtype
            lin = nn.Linear(mod.logical_in_features, mod.out_features, mod.bias is not None, mod.qweight.device, dt)
            with torch.no_grad():
                lin.weight.copy_(mod.dequantized_weight(torch.float32))
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            _replace(model, name, lin)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # LoRA adapters train on top (backward to the input, quick.integrations.peft)


# ---------------------------------------------------------------------------------------------- helpers


def _packed(model: nn.Module) -> dict[str, Any]:
    from quick.nn.linear import QuickLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, QuickLinear)}


def _stacks(model: nn.Module) -> dict[str, Any]:
    from quick.nn.moe import QuickExpertStack

    return {n: m for n, m in model.named_modules() if isinstance(m, QuickExpertStack)}


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _checkpoint_files(model: nn.Module) -> list[Path]:
    from quick.checkpoint import _weight_files

    return sorted(set(_weight_files(Path(str(model.config.name_or_path))).values()))


def _headers(files: list[str | os.PathLike]) -> dict[str, dict[str, Any]]:
    """Tensor name -> safetensors header entry over all shards (files checked for truncation)."""
    from quick.checkpoint import CheckpointError, _read_header

    meta: dict[str, dict[str, Any]] = {}
    for f in files:
        p = Path(f)
        if p.suffix != ".safetensors":
            raise CheckpointError(f"{p}: QUICK checkpoints are safetensors files")
        meta.update(_read_header(p))
    return meta


def replace_with_quick_linear(model: nn.Module, meta: dict[str, dict[str, Any]], qc: QuickConfig) -> list[str]:
    """Swap every ``nn.Linear`` whose ``<name>.qweight`` is in the files (``meta``: header entries) for an empty
    ``QuickLinear`` on the meta device in the stored layout, and every fused experts module whose
    ``<name>.gate_up.qweight`` is there for a ``QuickMoEExperts`` of stacks in that layout; returns the names (the
    stacks' as ``<name>.gate_up`` / ``<name>.down``). Shapes come from the model and
    the headers: a layer whose ``scales`` have ``ceil(K / G)`` rows for ``K % G != 0`` is a ragged one, stored
    zero-padded to whole groups."""
    from quick.checkpoint import _ST_DTYPES, CheckpointError, layout_for_config
    from quick.formats.layouts import LayoutError, get_layout
    from quick.formats.weights import QuantizationError
    from quick.models.moe import experts_modules, skeleton_experts
    from quick.nn.linear import QuickLinear

    layout = layout_for_config(qc.to_dict())
    scale_dtypes = {_ST_DTYPES.get(v["dtype"]) for k, v in meta.items() if k.endswith(".scales")}
    if not scale_dtypes:
        raise CheckpointError("the checkpoint holds no '.scales' tensors; it is not a quantized QUICK checkpoint")
    if len(scale_dtypes) != 1 or not scale_dtypes <= {torch.float16, torch.bfloat16}:
        raise CheckpointError(f"scales have mixed or unsupported dtypes {scale_dtypes} (float16 or bfloat16)")
    scale_dtype = scale_dtypes.pop()
    names = []
    for name, m in list(model.named_modules()):
        if not (isinstance(m, nn.Linear) and f"{name}.qweight" in meta):
            continue
        k, n = m.in_features, m.out_features
        g = int(qc.module_group_sizes.get(name, qc.group_size))
        rows = meta.get(f"{name}.scales", {}).get("shape", [0])[0]
        ragged = g != -1 and k % g and rows == -(-k // g)
        try:
            q = QuickLinear(rows * g if ragged else k, n, m.bias is not None, g, layout, scale_dtype, "meta",
                            logical_in_features=k if ragged else None)  # fmt: skip
        except (LayoutError, QuantizationError, ValueError) as e:
            raise CheckpointError(f"cannot hold '{name}' (scales {rows} rows) in layout '{layout}': {e}") from None
        missing = [t for t in get_layout(layout).tensor_specs(q.in_features, n, g) if f"{name}.{t}" not in meta]
        if m.bias is not None and f"{name}.bias" not in meta:
            missing.append("bias")
        if f"{name}.perm" in meta:  # act-order layer: an input permutation, loaded by transformers like the rest
            q.perm = torch.empty(meta[f"{name}.perm"]["shape"], dtype=torch.int64, device="meta")
        if missing:
            raise CheckpointError(f"the checkpoint lacks tensor '{name}.{missing[0]}' of a quantized layer")
        _replace(model, name, q)
        names.append(name)
    dense = {n: (type(m), m.config) for n, m in experts_modules(model).items()}
    try:  # mixture-of-experts blocks: fused experts modules become QuickMoEExperts where the files hold stacks
        stacks = skeleton_experts(
            model, meta, lambda n: qc.module_group_sizes.get(f"{n}.gate_up", qc.group_size), layout, layout,
            scale_dtype,
        )  # fmt: skip
    except (ValueError, QuantizationError) as e:
        raise CheckpointError(str(e)) from None
    for n in {s.rpartition(".")[0] for s in stacks}:
        model.get_submodule(n).dense_module = dense[n]  # transformers' class and config, for dequantize()
    names += list(stacks)
    orphans = [k for k in meta if k.endswith(".qweight") and k.rpartition(".")[0] not in names]
    if orphans:
        raise CheckpointError(
            f"'{orphans[0]}' does not belong to any nn.Linear or experts module of the {model.config.model_type} model"
        )
    return names


def check_packed(model: nn.Module) -> None:
    """The loaded packed tensors against their layout (shapes, dtypes, finite scales, zero points in [0, 15]), expert
    stacks expert by expert."""
    from quick.checkpoint import CheckpointError, _check_values
    from quick.formats.layouts import LayoutError
    from quick.models.moe import check_stack

    for name, st in _stacks(model).items():
        tensors = st.packed()
        if any(t.is_meta for t in tensors.values()):
            raise CheckpointError(f"'{name}' was not loaded (its tensors are still on the meta device)")
        try:
            check_stack(tensors, st.layout_name, st, name)
        except LayoutError as err:
            raise CheckpointError(str(err)) from None
        _check_values(tensors, name)
    for name, mod in _packed(model).items():
        tensors = mod.packed()
        try:
            mod.layout.validate(tensors, mod.in_features, mod.out_features, mod.group_size, where=name)
        except LayoutError as e:
            raise CheckpointError(str(e)) from None
        _check_values(tensors, name)
        if any(t.is_meta for t in tensors.values()):
            raise CheckpointError(f"'{name}' was not loaded (its tensors are still on the meta device)")
        perm, n = getattr(mod, "perm", None), mod.logical_in_features
        if perm is not None and (
            perm.dtype != torch.int64
            or tuple(perm.shape) != (n,)
            or not torch.equal(perm.sort().values.cpu(), torch.arange(n))
        ):
            raise CheckpointError(f"tensor '{name}.perm' is not a permutation of the {n} inputs")


def repack(model: nn.Module, layout: str, keep_unfit: bool = False) -> None:
    """Repack every ``QuickLinear`` and every ``QuickMoEExperts`` into ``layout`` (exact); ``keep_unfit``: layers whose
    shape the layout cannot hold keep theirs (e.g. N % 64 for quick_sm90) instead of raising."""
    from quick.formats.layouts import LayoutError, convert, get_layout
    from quick.formats.weights import QuantizationError
    from quick.nn.linear import QuickLinear
    from quick.nn.moe import QuickMoEExperts

    for name, ex in model.named_modules():
        if isinstance(ex, QuickMoEExperts) and not ex.repack_(layout) and not keep_unfit:
            raise LayoutError(f"'{name}': layout '{layout}' cannot hold these experts")
    lay = get_layout(layout)
    for name, mod in _packed(model).items():
        if mod.layout_name == layout:
            continue
        try:
            lay.check(mod.in_features, mod.out_features, mod.group_size)
        except (LayoutError, QuantizationError):
            if keep_unfit:
                continue
            raise
        tensors = convert(mod.packed(), mod.layout_name, layout, mod.in_features, mod.out_features, mod.group_size)
        new = QuickLinear(mod.in_features, mod.out_features, mod.bias is not None, mod.group_size, layout, mod.dtype,
                          "meta", logical_in_features=mod.logical_in_features)  # fmt: skip
        for t_name, t in tensors.items():
            new.register_buffer(t_name, t.contiguous())
        if mod.bias is not None:
            new.register_buffer("bias", mod.bias)
        if getattr(mod, "perm", None) is not None:  # act-order input permutation travels with the weight
            new.register_buffer("perm", mod.perm)
        new.backend = mod.backend
        new.set_compute_dtype(getattr(mod, "compute_dtype", None))
        _replace(model, name, new)


def register() -> bool:
    """Register :class:`QuickConfig` and :class:`QuickHfQuantizer` for ``quant_method`` ``"quick"``; False when they
    already were (idempotent). Another library's entry under that name is an error, never replaced."""
    current = AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD)
    if current is QuickHfQuantizer:
        return False
    if current is not None or QUANT_METHOD in AUTO_QUANTIZATION_CONFIG_MAPPING:
        if getattr(current, "__module__", None) == __name__:  # this module, imported again (importlib.reload)
            return False
        raise RuntimeError(f"transformers already has a quantizer for quant_method '{QUANT_METHOD}': {current}")
    register_quantization_config(QUANT_METHOD)(QuickConfig)
    register_quantizer(QUANT_METHOD)(QuickHfQuantizer)
    return True


register()  # importing the integration activates it (quick._hooks imports this module for that)
