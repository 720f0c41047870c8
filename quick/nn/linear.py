"""``QuickLinear``: a drop-in ``nn.Linear`` replacement holding packed 4-bit weights."""

from __future__ import annotations

import torch
from torch import nn

from quick.packing.layouts import Layout, LayoutError, get_layout
from quick.quant.primitives import SUPPORTED_DTYPES, QuantizedWeight, quantize

BACKENDS = ("auto", "reference", "kernel")


class QuickLinear(nn.Module):
    """Linear layer ``y = x @ dequant(W) + b`` with W stored in a packed layout.

    Buffers are the layout's tensors (``qweight``, ``scales``, ``zeros`` for the QUICK layouts), so
    ``state_dict`` is the checkpoint format. ``backend``: ``"auto"`` uses the fastest GPU kernel for the
    layout when one is available and falls back to the reference path (dequantize, then matmul), which
    runs on any device and is the ground truth for the kernel tests.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        group_size: int = 128,
        layout: str = "quick",
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"QuickLinear dtype must be float16 or bfloat16, got {dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size = group_size
        self.layout_name = layout
        self.dtype = dtype
        self.backend = "auto"
        lay = self.layout
        lay.check(in_features, out_features, group_size)
        for name, spec in lay.tensor_specs(in_features, out_features, group_size).items():
            self.register_buffer(name, torch.zeros(spec.shape, dtype=spec.dtype or dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @property
    def layout(self) -> Layout:
        return get_layout(self.layout_name)

    def packed(self) -> dict[str, torch.Tensor]:
        names = self.layout.tensor_specs(self.in_features, self.out_features, self.group_size)
        return {n: getattr(self, n) for n in names}

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, layout: str = "quick"
    ) -> QuickLinear:
        k, n = qw.shape
        mod = cls(k, n, bias is not None, qw.group_size, layout, qw.scales.dtype, qw.q.device)
        for name, t in mod.layout.pack(qw).items():
            getattr(mod, name).copy_(t)
        if bias is not None:
            mod.bias.copy_(bias.to(mod.dtype))
        return mod

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group_size: int = 128,
        layout: str = "quick",
        zero_point: bool = True,
        dtype: torch.dtype | None = None,
        scales: torch.Tensor | None = None,
    ) -> QuickLinear:
        """Quantize an ``nn.Linear`` (round-to-nearest on its current weights) and pack it."""
        dtype = dtype or (linear.weight.dtype if linear.weight.dtype in SUPPORTED_DTYPES else torch.float16)
        qw = quantize(linear.weight.data, group_size, zero_point=zero_point, dtype=dtype)
        return cls.from_quantized(qw, linear.bias.data if linear.bias is not None else None, layout)

    def unpack(self) -> QuantizedWeight:
        return self.layout.unpack(self.packed(), self.in_features, self.out_features, self.group_size)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense weight in ``nn.Linear`` orientation ``[N, K]``."""
        return self.unpack().dequantize(dtype or self.dtype).t()

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input last dim {x.shape[-1]} != in_features {self.in_features}")
        if x.dtype != self.dtype:
            raise TypeError(f"input dtype {x.dtype} != layer dtype {self.dtype} (cast the input or the layer)")
        if x.device != self.qweight.device:
            raise ValueError(f"input on {x.device} but weights on {self.qweight.device}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose from {BACKENDS}")
        if self.backend != "reference" and x.is_cuda:
            from quick.kernels import dispatch

            fn = dispatch.kernel_for(self.layout_name, x)
            if fn is not None:
                out = fn(x.reshape(-1, self.in_features), self.packed(), self.group_size)
                out = out.reshape(*x.shape[:-1], self.out_features)
                return out + self.bias if self.bias is not None else out
            if self.backend == "kernel":
                raise RuntimeError(f"no GPU kernel available for layout '{self.layout_name}' on {x.device}")
        return reference_forward(x, self)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
            f"layout={self.layout_name}, dtype={self.dtype}, bias={self.bias is not None}"
        )


def reference_forward(x: torch.Tensor, mod: QuickLinear) -> torch.Tensor:
    """Dequantize then matmul (fp32 math on CPU, the layer dtype on GPU)."""
    work = torch.float32 if x.device.type == "cpu" else x.dtype
    w = mod.dequantized_weight(work)
    out = torch.nn.functional.linear(x.to(work), w, None if mod.bias is None else mod.bias.to(work))
    return out.to(x.dtype)


def check_layout_name(name: str) -> None:
    try:
        get_layout(name)
    except LayoutError as e:
        raise ValueError(str(e)) from None
