"""``QuickLinear``: a drop-in ``nn.Linear`` replacement holding packed 4-bit weights."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from quick.formats.layouts import Layout, LayoutError, get_layout
from quick.formats.weights import SUPPORTED_DTYPES, QuantizedWeight, quantize
from quick.nn.autograd import kernel_product

BACKENDS = ("auto", "reference", "kernel")


def padded_in_features(k: int, group_size: int, layout: str) -> int:
    """Smallest K' >= K that whole groups and the layout's blocks tile (SmolLM2's 576 -> 640 at g128)."""
    step = math.lcm(get_layout(layout).k_multiple, group_size if group_size > 0 else 1)
    return -(-k // step) * step


def positive_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def check_dims(
    owner: str, dtype: torch.dtype, dims: dict[str, object], logical_in_features: int | None, prefix: str = ""
) -> int:
    """The constructor checks of the packed layers: an fp16/bf16 ``dtype`` (``owner`` names the class), positive int
    ``dims`` (``prefix`` starts their errors) and the real K ``logical_in_features`` (default: ``dims``'
    ``in_features``) in ``(0, in_features]``; returns the real K."""
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{owner} dtype must be float16 or bfloat16, got {dtype}")
    for name, v in dims.items():
        positive_int(prefix + name, v)
    in_features = dims["in_features"]
    logical = logical_in_features or in_features
    if not 0 < logical <= in_features:
        raise ValueError(f"logical in_features {logical} must be in (0, {in_features}]")
    return logical


def float_cast_of(fn) -> torch.dtype | None:  # noqa: ANN001 - the function nn.Module._apply passes
    """The floating dtype ``fn`` casts tensors to (``.half()``, ``.to(torch.bfloat16)``), None for a device move."""
    for dt in (torch.float16, torch.bfloat16):
        out = fn(torch.empty(0, dtype=dt))
        if out.dtype != dt:
            return out.dtype
    return None


class PackedModule(nn.Module):
    """A module of packed tensors whose dtypes are its own (codes, and the scale dtype its kernels are built for):
    ``model.half()`` / ``.bfloat16()`` / ``.float()`` / ``.to(dtype)`` only move them to the device asked for; the
    module casts activations itself."""

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - torch.nn.Module's signature
        def move(t: torch.Tensor) -> torch.Tensor:
            probe = fn(t.new_empty(0))
            return fn(t) if probe.dtype == t.dtype else t.to(probe.device)

        return super()._apply(move, recurse)


class QuickLinear(PackedModule):
    """Linear layer ``y = x @ dequant(W) + b`` with W stored in a packed layout.

    When K is not a multiple of the group size (or of the layout's block), the weight is stored zero-padded
    to ``in_features`` and ``logical_in_features`` is the real K; inputs of the real width are zero-padded.
    Zero weights quantize to exactly zero, so this equals a ragged last group.

    Buffers are the layout's tensors (``qweight``, ``scales``, ``zeros`` for the QUICK layouts), so
    ``state_dict`` is the checkpoint format. ``backend``: ``"auto"`` uses the fastest GPU kernel for the
    layout when one is available and falls back to the reference path (dequantize, then matmul), which
    runs on any device and is the ground truth for the kernel tests.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, group_size: int = 128, layout: str = "quick",
        dtype: torch.dtype = torch.float16, device: torch.device | str | None = None,
        logical_in_features: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        dims = {"in_features": in_features, "out_features": out_features}
        self.logical_in_features = check_dims("QuickLinear", dtype, dims, logical_in_features, "QuickLinear ")
        self.in_features, self.out_features = in_features, out_features
        self._ref_cache: tuple | None = None
        self.group_size = group_size
        self.layout_name = layout
        self.dtype = dtype
        self.backend = "auto"
        lay = self.layout
        lay.check(in_features, out_features, group_size)
        for name, spec in lay.tensor_specs(in_features, out_features, group_size).items():
            self.register_buffer(name, torch.zeros(spec.shape, dtype=spec.dtype or dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        # input permutation (act-order checkpoints: rows sorted by group), applied first in forward; None = identity
        self.register_buffer("perm", None)

    @property
    def layout(self) -> Layout:
        return get_layout(self.layout_name)

    def packed(self) -> dict[str, torch.Tensor]:
        names = self.layout.tensor_specs(self.in_features, self.out_features, self.group_size)
        return {n: getattr(self, n) for n in names}

    @classmethod
    def from_quantized(
        cls,
        qw: QuantizedWeight,
        bias: torch.Tensor | None = None,
        layout: str = "quick",
        logical_in_features: int | None = None,
    ) -> QuickLinear:
        k, n = qw.shape
        mod = cls(k, n, bias is not None, qw.group_size, layout, qw.scales.dtype, qw.q.device, logical_in_features)
        for name, t in mod.layout.pack(qw).items():
            getattr(mod, name).copy_(t)
        if bias is not None:
            mod.bias.copy_(bias.to(mod.dtype))
        return mod

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group_size: int = 128, layout: str = "quick", zero_point: bool = True,
        dtype: torch.dtype | None = None, scales: torch.Tensor | None = None,
    ) -> QuickLinear:  # fmt: skip
        """Quantize an ``nn.Linear`` (round-to-nearest on its current weights) and pack it."""
        dtype = dtype or (linear.weight.dtype if linear.weight.dtype in SUPPORTED_DTYPES else torch.float16)
        k = linear.in_features
        w = linear.weight.data
        kp = padded_in_features(k, group_size, layout)
        if kp != k:
            w = F.pad(w, (0, kp - k))
        qw = quantize(w, group_size, zero_point=zero_point, dtype=dtype)
        return cls.from_quantized(qw, linear.bias.data if linear.bias is not None else None, layout, k)

    def unpack(self) -> QuantizedWeight:
        return self.layout.unpack(self.packed(), self.in_features, self.out_features, self.group_size)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense weight in ``nn.Linear`` orientation ``[N, logical K]``."""
        return self.unpack().dequantize(dtype or self.dtype).t()[:, : self.logical_in_features]

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - torch.nn.Module's signature
        """The packed tensors only change device (:class:`PackedModule`); the cast hooks take the model's new
        activation dtype."""
        super()._apply(fn, recurse)
        new = float_cast_of(fn)
        if new is not None:
            self.set_compute_dtype(new)
        return self

    def set_compute_dtype(self, dtype: torch.dtype | None) -> None:
        """Accept inputs of ``dtype`` and return outputs in it (cast hooks) while the packed scales keep
        ``self.dtype``; ``None`` or ``self.dtype`` removes the hooks. Kept on the layer (``compute_dtype``) so that
        a layer made from it (a fused projection) gets the same."""
        for h in getattr(self, "_quick_cast_hooks", ()):
            h.remove()
        self._quick_cast_hooks = ()
        self.compute_dtype = dtype
        if dtype is not None and dtype != self.dtype:
            self._quick_cast_hooks = (
                self.register_forward_pre_hook(lambda m, args: (args[0].to(m.dtype), *args[1:])),
                self.register_forward_hook(lambda _m, _a, out, dt=dtype: out.to(dt)),
            )

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0:
            raise ValueError(f"input must have a last dimension of size {self.logical_in_features}, got a scalar")
        if x.shape[-1] not in (self.in_features, self.logical_in_features):
            raise ValueError(f"input last dim {x.shape[-1]} != in_features {self.logical_in_features}")
        if x.dtype != self.dtype:
            raise TypeError(f"input dtype {x.dtype} != layer dtype {self.dtype} (cast the input or the layer)")
        if x.device != self.qweight.device:
            raise ValueError(f"input on {x.device} but weights on {self.qweight.device}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.perm is not None:
            x = x[..., : self.logical_in_features].index_select(-1, self.perm)
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose from {BACKENDS}")
        if self.backend != "reference" and x.is_cuda:
            if x.shape[-1] != self.in_features:
                x = F.pad(x, (0, self.in_features - x.shape[-1]))
            from quick.kernels import dispatch

            fn = dispatch.kernel_for(self.layout_name, x)
            if fn is not None:
                out = kernel_product(fn, x.reshape(-1, self.in_features), self)  # differentiable in x (LoRA)
                out = out.reshape(*x.shape[:-1], self.out_features)
                return out + self.bias if self.bias is not None else out
        if self.backend == "kernel":  # asked for a kernel explicitly: never fall back silently (CPU included)
            raise RuntimeError(f"no GPU kernel available for layout '{self.layout_name}' on {x.device}")
        return reference_forward(x, self)

    def fuses(self, m: int, device: torch.device, dtype: torch.dtype, act: str = "", norm: bool = False) -> bool:
        """Whether :meth:`forward_gated` (``act``) / :meth:`forward_add_norm` (``norm``) on ``m`` rows would be one
        kernel (:func:`quick.kernels.select.fused_choice`): CUDA, no padding or cast hooks, and the chosen kernel a
        decode config with that variant. Callers that would otherwise run the steps compiled (the fast decode step)
        ask first."""
        if not (act or norm) or torch.device(device).type != "cuda" or self.backend == "reference":
            return False
        if self.perm is not None:  # the fused kernels read the input unpermuted
            return False
        if self.logical_in_features != self.in_features or dtype != self.dtype:
            return False
        if getattr(self, "_quick_cast_hooks", ()):
            return False
        from quick.kernels import select

        g = self.in_features if self.group_size == -1 else self.group_size
        p = select.Problem(self.layout_name, m, self.out_features, self.in_features, g, dtype, torch.device(device))
        return select.fused_choice(p, bool(act), norm) is not None

    def forward_gated(self, gu: torch.Tensor, act: str = "silu") -> torch.Tensor:
        """``self(act(gate) * up)`` for a gated MLP's gate/up product ``gu = [gate | up]`` (``[..., 2K]``): one kernel
        that stages ``act(gate) * up`` itself where :meth:`fuses` says so (the decode kernel: up to 8 rows, group
        size 128), else the two steps."""
        from quick.kernels import decode

        k = gu.shape[-1] // 2
        rows = gu.numel() // max(gu.shape[-1], 1)
        if k != self.in_features or not self.fuses(rows, gu.device, gu.dtype, act=act):
            return self(decode.gated(gu[..., :k], gu[..., k:], act))
        p = self.packed()
        out = torch.ops.quick.gated_gemm_w4a16_sm90(
            gu.reshape(-1, 2 * k), p["qweight"], p["scales"], p["zeros"], self.bias, self.group_size, act
        )
        return out.reshape(*gu.shape[:-1], self.out_features)

    def forward_add_norm(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        offset: float = 0.0,
        act: str = "",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(RMSNorm(r), r)`` with ``r = residual + h``, ``h = self(x)`` (``act``: ``h = self.forward_gated(x, act)``):
        a decoder layer's o / down projection with the residual add and the norm after it. One kernel where
        :meth:`fuses` says so, else the steps one by one. ``residual [..., N]``, ``weight [N]``; ``offset``: Gemma's
        ``1 + weight``."""
        from quick.kernels import decode

        k = x.shape[-1] // 2 if act else x.shape[-1]
        rows = x.numel() // max(x.shape[-1], 1)
        fused = (
            k == self.in_features
            and residual.shape == (*x.shape[:-1], self.out_features)
            and self.fuses(rows, x.device, x.dtype, act=act, norm=True)
        )
        if not fused:
            h = self.forward_gated(x, act) if act else self(x)
            r = residual + h
            return decode.rms_norm(r, weight, eps, offset), r
        p = self.packed()
        normed, r = torch.ops.quick.gemm_add_norm_sm90(
            x.reshape(-1, x.shape[-1]), p["qweight"], p["scales"], p["zeros"], self.bias, self.group_size,
            residual.reshape(-1, self.out_features), weight, float(eps), float(offset), act,
        )  # fmt: skip
        return normed.view(residual.shape), r.view(residual.shape)

    def extra_repr(self) -> str:
        pad = f" (padded from {self.logical_in_features})" if self.logical_in_features != self.in_features else ""
        return (
            f"in_features={self.in_features}{pad}, out_features={self.out_features}, group_size={self.group_size}, "
            f"layout={self.layout_name}, dtype={self.dtype}, bias={self.bias is not None}"
        )


def reference_forward(x: torch.Tensor, mod: QuickLinear) -> torch.Tensor:
    """Dequantize then matmul (fp32 math on CPU, the layer dtype on GPU).

    On CPU the dense weight is cached on the module until a packed buffer changes (tracked by the tensors'
    version counters and storage), because unpacking every call would dominate CPU inference. On GPU it is
    not cached: the fallback must not hold a dense copy of every layer in device memory."""
    work = torch.float32 if x.device.type == "cpu" else x.dtype
    if x.device.type == "cpu":
        key = (work, *[(b.data_ptr(), b._version) for b in mod.packed().values()])
        if mod._ref_cache is None or mod._ref_cache[0] != key:
            mod._ref_cache = (key, mod.dequantized_weight(work))
        w = mod._ref_cache[1]
    else:
        w = mod.dequantized_weight(work)
    if x.shape[-1] != w.shape[1]:
        x = x[..., : w.shape[1]]
    out = torch.nn.functional.linear(x.to(work), w, None if mod.bias is None else mod.bias.to(work))
    return out.to(x.dtype)


def check_layout_name(name: str) -> None:
    try:
        get_layout(name)
    except LayoutError as e:
        raise ValueError(str(e)) from None
