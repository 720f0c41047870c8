"""LoRA (PEFT) on ``QuickLinear``: train adapters on a 4-bit model, keep them separate or merge them.

PEFT has no registry for quantized layer types of other libraries; a ``LoraConfig`` takes extra layer types through
``LoraConfig._register_custom_module``. :func:`register_quick_lora` does that for ``QuickLinear``, and
:func:`get_peft_model` / :func:`load_adapter` are PEFT's functions with that step done first::

    from quick.integrations.peft import get_peft_model
    model = get_peft_model(quantized_model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))

The frozen 4-bit layer gives gradients to its input (:mod:`quick.nn.autograd`), so the adapters of every layer train.

Merging: a LoRA update is far below one step of the 4-bit grid, so adding it to the dequantized weight and
rounding back to 4 bits would leave the codes as they were and drop the adapter. ``merge`` therefore turns the
layer into a dense ``nn.Linear`` holding ``dequant(W) + B @ A * scale`` (exact; 4x the memory of the packed layer
in fp16) and ``unmerge`` brings the packed layer back unchanged; ``merge_and_unload`` gives a model with dense
layers where adapters were. To deploy in 4 bits, keep the adapter separate (a rank-r product per layer), or merge
it into the original dense model and quantize that again.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft import LoraConfig, PeftConfig, PeftModel
from peft import get_peft_model as _peft_get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from quick.nn.linear import QuickLinear

MERGE_NOTE = (
    "merging a LoRA adapter into a 4-bit QuickLinear makes it a dense nn.Linear (dequantized weight + adapter): "
    "rounding the adapter into the 4-bit grid would discard it. To deploy in 4 bits, keep the adapter separate or "
    "merge it into the original dense model and quantize that again"
)


class QuickLoraLinear(nn.Module, LoraLayer):
    """A LoRA adapter around a frozen ``QuickLinear``: ``base(x) + lora_B(lora_A(dropout(x))) * scaling``."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0, lora_alpha: int = 1, **kwargs
    ) -> None:
        for flag in ("use_dora", "use_bdlora"):
            if getattr(config, flag, False):
                raise ValueError(f"QuickLoraLinear supports plain LoRA only; set {flag}=False")
        if getattr(config, "fan_in_fan_out", False):
            raise ValueError("QuickLinear is nn.Linear-shaped; set fan_in_fan_out=False")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._packed_base: list[QuickLinear] = []  # the QuickLinear while merged into a dense layer (not a submodule)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        # the real K: a ragged layer stores its weight zero-padded to whole groups
        return module.logical_in_features, module.out_features

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``B @ A * scaling`` of ``adapter``, ``[out_features, in_features]`` in float32."""
        a = self.lora_A[adapter].weight.float()
        b = self.lora_B[adapter].weight.float()
        return (b @ a) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        if isinstance(base, QuickLinear):
            warnings.warn(MERGE_NOTE, UserWarning, stacklevel=2)
            dtype = getattr(base, "compute_dtype", None) or base.dtype
            dense = nn.Linear(base.logical_in_features, base.out_features, base.bias is not None, base.qweight.device)
            with torch.no_grad():
                dense.weight.copy_(base.dequantized_weight(torch.float32))
                if base.bias is not None:
                    dense.bias.copy_(base.bias.float())
            dense.to(dtype).requires_grad_(False)
            self._packed_base.append(base)
            self.base_layer = dense
            base = dense
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            w = base.weight.data.float() + self.get_delta_weight(name).to(base.weight.device)
            if safe_merge and not torch.isfinite(w).all():
                raise ValueError(f"NaNs or infs in the merged weights of adapter {name!r}; it is broken")
            base.weight.data = w.to(base.weight.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lora_A and not self._packed_base:
                base.weight.data = (base.weight.data.float() - self.get_delta_weight(name)).to(base.weight.dtype)
        if self._packed_base:  # the packed layer was never changed: restore it, exactly
            self.base_layer = self._packed_base.pop()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("QuickLoraLinear does not support mixed-adapter batches (adapter_names)")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        x = x[..., : self.in_features]  # inputs may come at the packed (padded) width
        for active in self.active_adapters:
            if active not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[active], self.lora_B[active]
            h = self._cast_input_dtype(self.lora_dropout[active](x), lora_a.weight.dtype)
            result = result + (lora_b(lora_a(h)) * self.scaling[active]).to(out_dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register_quick_lora(config: PeftConfig) -> PeftConfig:
    """Make ``config`` (a ``LoraConfig``) target ``QuickLinear`` layers with :class:`QuickLoraLinear`."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"QUICK layers take LoRA adapters (LoraConfig), got {type(config).__name__}")
    if not hasattr(config, "_register_custom_module"):
        raise RuntimeError("this PEFT version cannot register custom LoRA layers; install peft>=0.13")
    config._register_custom_module({QuickLinear: QuickLoraLinear})
    return config


def get_peft_model(model: nn.Module, config: PeftConfig, **kwargs: Any) -> PeftModel:
    """``peft.get_peft_model`` with :func:`register_quick_lora` applied to ``config`` first."""
    return _peft_get_peft_model(model, register_quick_lora(config), **kwargs)


def load_adapter(model: nn.Module, adapter_dir: str, **kwargs: Any) -> PeftModel:
    """``PeftModel.from_pretrained(model, adapter_dir)`` for a model with ``QuickLinear`` layers (a saved
    ``adapter_config.json`` does not record custom layer types, so they are registered again here)."""
    config = register_quick_lora(LoraConfig.from_pretrained(adapter_dir))
    return PeftModel.from_pretrained(model, adapter_dir, config=config, **kwargs)
