"""``QuickLinearW4A8``: a drop-in ``nn.Linear`` with 4-bit weights and per-token 8-bit activations (QQQ format).

The weights follow :mod:`quick.formats.w4a8`. They are held packed in one of the W4A8 layouts of
:mod:`quick.formats.layouts` (``w4a8`` for the mma.sync kernel, ``w4a8_sm90`` for the Hopper wgmma one), so that
the kernel registered for that layout can run them on a GPU; if a layer's shape does not fit the layout they are
held unpacked (``q``, ``channel_scale``, ``group_scale``) and every forward runs the reference path. Either way
the buffers are the checkpoint tensors and ``storage`` (the layout name, or ``"unpacked"``) says which.

The reference path quantizes the activations exactly like the kernels and computes the integer sum exactly
(fp32 where every partial sum is an integer below 2**24, float64 otherwise), then applies the float scales
in float64 and casts to the input dtype.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from quick.formats.w4a8 import (
    SUPPORTED_W4A8_GROUPS,
    W4A8Weight,
    quantize_activations,
    validate_w4a8,
    widens_to_int8,
)
from quick.nn.linear import PackedModule

BACKENDS = ("auto", "reference", "kernel")
UNPACKED = "unpacked"
# Output widths the kernel of a layout takes (w4a8_mma.validate: N % 128; the sm90 launcher handles any N
# itself). Other layers run the reference path.
KERNEL_N_MULTIPLE = {"w4a8": 128}
_ALIASES = {"packed": "w4a8"}
UNPACKED_NAMES = ("q", "channel_scale", "group_scale")
LAYOUT = "w4a8"
_EXACT_FP32 = 2**24


def w4a8_layouts() -> dict:
    """The W4A8 packed layouts by name (``quick.formats.layouts.W4A8_LAYOUTS``; empty if there are none)."""
    from quick.formats import layouts

    return dict(getattr(layouts, "W4A8_LAYOUTS", {}))


def check_storage(storage: str) -> str:
    """Canonical storage name (``packed`` was the first name of ``w4a8``); a clear error for unknown ones."""
    storage = _ALIASES.get(storage, storage)
    if storage != UNPACKED and storage not in w4a8_layouts():
        raise ValueError(f"unknown W4A8 storage {storage!r}; expected '{UNPACKED}' or one of {sorted(w4a8_layouts())}")
    return storage


def preferred_w4a8_layout(device: torch.device | str | None = None) -> str:
    """``w4a8_sm90`` on a Hopper GPU whose wgmma kernel is built and verified there, else ``w4a8`` (the
    mma.sync kernel, sm_80+; any device can run the reference path on it). Repacking is exact."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and "w4a8_sm90" in w4a8_layouts():
        try:
            from quick.kernels import w4a8_wgmma as sm90

            if sm90.is_available(device):
                return "w4a8_sm90"
        except Exception:  # noqa: BLE001 - an unusable optional kernel means the portable layout
            pass
    return LAYOUT


@functools.lru_cache(maxsize=64)
def _kernel_signature(fn) -> tuple[bool, bool]:
    """(takes a 4th positional ``bias``, takes a ``widen`` keyword) of a dispatcher entry, read once per entry
    (not on every forward)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False, False
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 4, "widen" in params


def _kernel_for(layout: str, x: torch.Tensor):
    """The registered GPU kernel entry for ``layout`` and ``x``."""
    from quick.kernels import dispatch

    return dispatch.kernel_for(layout, x)


def integer_matmul(xq: torch.Tensor, w: W4A8Weight, cache: dict | None = None) -> torch.Tensor:
    """Exact ``sum_k xq[m, k] * q[n, k] * s_g[k // G, n]`` as float64 ``[M, N]`` (no float scales applied).

    Per-channel: one fp32 matmul when ``K * 127 * 8 < 2**24`` (every partial sum is then an exactly
    representable integer), else float64. Per-group: one fp32 matmul per group (``G * 127 * 8`` is far below
    2**24), each multiplied by its integer group scale in fp32 (exact while ``G * 127 * 8 * 127 < 2**24``, i.e.
    ``G <= 130``) and summed in float64. On CUDA (where fp32 GEMMs may use TF32): one float64 GEMM with the
    integer weights ``q * s_g``. ``cache``: where to keep the float copies of the weights between calls.
    """
    m, k = xq.shape
    n = w.out_features
    cache = {} if cache is None else cache
    if xq.is_cuda:  # fp32 GEMMs may run in TF32 there; float64 is exact whatever the settings
        if "wi" not in cache:
            wi = w.q.double()
            if w.group_scale is not None:
                wi = wi * w.group_scale.double().t().repeat_interleave(w.group_size, dim=1)
            cache["wi"] = wi.t().contiguous()
        return xq.double() @ cache["wi"]
    if w.group_scale is None:
        if k * 127 * 8 < _EXACT_FP32:
            if "qf" not in cache:
                cache["qf"] = w.q.float().t().contiguous()
            return (xq.float() @ cache["qf"]).double()
        if "qd" not in cache:
            cache["qd"] = w.q.double().t().contiguous()
        return xq.double() @ cache["qd"]
    g = w.group_size
    ng = k // g
    if g * 127 * 8 * 127 >= _EXACT_FP32:
        if "wd" not in cache:
            cache["wd"] = w.dequantize(torch.float64).div(w.channel_scale.double()[:, None]).t().contiguous()
        return xq.double() @ cache["wd"]
    if "qg" not in cache:
        cache["qg"] = w.q.float().reshape(n, ng, g).permute(1, 2, 0).contiguous()  # [ng, G, N]
        cache["sg"] = w.group_scale.float()[:, None, :]  # [ng, 1, N]
    out = torch.zeros(m, n, dtype=torch.float64, device=xq.device)
    rows = max(1, (1 << 24) // max(ng * n, 1))  # bound the [ng, rows, N] partials to ~64 MB
    for r in range(0, m, rows):
        xg = xq[r : r + rows].float().reshape(-1, ng, g).transpose(0, 1)  # [ng, rows, G]
        part = torch.bmm(xg, cache["qg"]).mul_(cache["sg"])
        out[r : r + rows] = part.sum(0, dtype=torch.float64)
    return out


def reference_w4a8(
    x: torch.Tensor, w: W4A8Weight, bias: torch.Tensor | None = None, cache: dict | None = None
) -> torch.Tensor:
    """W4A8 arithmetic of the format (activation quantization included), output in float64 ``[..., N]``."""
    xq, sx = quantize_activations(x)
    y = integer_matmul(xq.reshape(-1, xq.shape[-1]), w, cache)  # a fresh float64 tensor: scaled in place
    y.mul_(sx.reshape(-1, 1).double()).mul_(w.channel_scale.double()[None, :].to(y.device))
    if bias is not None:
        y.add_(bias.double())
    return y.reshape(*x.shape[:-1], w.out_features)


class QuickLinearW4A8(PackedModule):
    """Linear layer ``y = dequant(quant_int8(x)) @ W^T + b`` with W4A8 weights (packed when possible).

    ``in_features`` is the stored K (whole groups); ``logical_in_features`` the real K, inputs of that width are
    zero-padded (zero columns quantize to zero and do not change a token's absmax). ``dtype``: the activation
    and output dtype of the GPU kernel and the bias dtype; the reference path returns the input's dtype.
    ``backend``: ``"auto"`` (kernel when one is registered and available for the input, else reference),
    ``"reference"``, or ``"kernel"`` (raise when there is none); new layers take ``default_backend``.
    """

    default_backend = "auto"

    def __init__(
        self,
        weight: W4A8Weight,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float16,
        logical_in_features: int | None = None,
        pack: bool | None = None,
        layout: str = LAYOUT,
    ) -> None:
        super().__init__()
        validate_w4a8(weight)
        tensors, storage = self._to_storage(weight, pack, layout)
        self._adopt(tensors, storage, weight.group_size, weight.q.shape, bias, dtype, logical_in_features)

    def _adopt(
        self,
        tensors: dict[str, torch.Tensor],
        storage: str,
        group_size: int,
        shape: tuple[int, int],
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        logical_in_features: int | None,
    ) -> None:
        """Take ``tensors`` (of ``storage``, weights ``shape = [N, K]``) as the layer's buffers."""
        if group_size not in SUPPORTED_W4A8_GROUPS:
            raise ValueError(f"W4A8 group size must be one of {SUPPORTED_W4A8_GROUPS}, got {group_size}")
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"QuickLinearW4A8 dtype must be float16 or bfloat16, got {dtype}")
        self.out_features, self.in_features = shape
        self.logical_in_features = logical_in_features or self.in_features
        if not 0 < self.logical_in_features <= self.in_features:
            raise ValueError(f"logical in_features {self.logical_in_features} must be in (0, {self.in_features}]")
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
        self.group_size = group_size
        self.dtype = dtype
        self.backend = self.default_backend
        self.last_path: str | None = None  # "kernel" or "reference": what the last forward ran
        self._offered: tuple | None = None  # (x, x_q, s_x) from the norm that made x (offer_quantized)
        self._kernel_error: str | None = None
        self._cache: tuple | None = None
        # Every q * s_g fits int8 (group scales <= 16, what the quantizers write): kernels may widen the weights
        # in registers and skip the per-group fold. Known here, so no forward has to read the scales (a column
        # permutation of packed scales keeps their largest value).
        gs = tensors.get("group_scale")
        self.widen = gs is not None and widens_to_int8(gs)
        self.storage = storage
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())
        self.register_load_state_dict_post_hook(QuickLinearW4A8._refresh_widen)

    @staticmethod
    def _refresh_widen(module: QuickLinearW4A8, _incompatible) -> None:
        """``load_state_dict`` may bring other group scales: recompute the widening flag from them (the stored
        buffer, packed or not: a column permutation keeps the largest scale)."""
        gs = getattr(module, "group_scale", None)
        module.widen = gs is not None and widens_to_int8(gs)

    @staticmethod
    def _to_storage(weight: W4A8Weight, pack: bool | None, layout: str) -> tuple[dict[str, torch.Tensor], str]:
        """``pack``: False = unpacked, True = packed in ``layout`` or raise, None = packed if the shape fits."""
        lay = w4a8_layouts().get(_ALIASES.get(layout, layout)) if pack is not False else None
        if lay is None and pack:
            raise RuntimeError(f"W4A8 layout {layout!r} is not available; known: {sorted(w4a8_layouts())}")
        if lay is not None:
            try:
                return dict(lay.pack(weight)), lay.name
            except Exception as e:
                if pack:
                    raise
                warnings.warn(f"W4A8 packing failed ({e}); keeping the weights unpacked", RuntimeWarning, stacklevel=3)
        tensors = {"q": weight.q.contiguous(), "channel_scale": weight.channel_scale.float().contiguous()}
        if weight.group_scale is not None:
            tensors["group_scale"] = weight.group_scale.contiguous()
        return tensors, UNPACKED

    # ------------------------------------------------------------------------------------ constructors

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, group_size: int = -1, bias: torch.Tensor | None = None,
        dtype: torch.dtype | None = None, pack: bool | None = None, layout: str = LAYOUT,
    ) -> QuickLinearW4A8:  # fmt: skip
        """Round-to-nearest W4A8 of a float weight ``[N, K]`` (K padded to whole groups)."""
        from quick.formats.w4a8 import quantize_w4a8_rtn

        dtype = dtype or (weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float16)
        qw = quantize_w4a8_rtn(weight, group_size)
        return cls(qw, bias, dtype, weight.shape[1], pack, layout)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group_size: int = -1, dtype: torch.dtype | None = None, pack: bool | None = None,
        layout: str = LAYOUT,
    ) -> QuickLinearW4A8:  # fmt: skip
        return cls.from_weight(linear.weight.data, group_size, linear.bias, dtype, pack, layout)

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], storage: str, group_size: int, bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float16, logical_in_features: int | None = None, pack: bool | None = None,
        layout: str | None = None,
    ) -> QuickLinearW4A8:  # fmt: skip
        """Rebuild from checkpoint tensors of any storage, validated against the format, and (re)pack them into
        ``layout`` (default: the stored layout; unpacked tensors stay unpacked unless ``layout`` is given)."""
        storage = check_storage(storage)
        if storage != UNPACKED:
            w = w4a8_layouts()[storage].unpack(tensors, group_size)
        else:
            missing = [n for n in UNPACKED_NAMES[: 2 if group_size == -1 else 3] if n not in tensors]
            if missing:
                raise ValueError(f"unpacked W4A8 weights lack {missing}")
            w = W4A8Weight(tensors["q"], tensors["channel_scale"], tensors.get("group_scale"), group_size)
        if not torch.isfinite(w.channel_scale).all():
            raise ValueError("channel_scale holds NaN or inf; no quantizer writes that (corrupt weights)")
        target = layout or (storage if storage != UNPACKED else LAYOUT)
        if layout is None and storage == UNPACKED:
            pack = False
        return cls(w, bias, dtype, logical_in_features, pack, target)

    @classmethod
    def from_stored(
        cls, tensors: dict[str, torch.Tensor], storage: str, group_size: int, bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float16, logical_in_features: int | None = None,
    ) -> QuickLinearW4A8:  # fmt: skip
        """A layer holding ``tensors`` as they are (no unpacking or repacking): stored tensors of layers that were
        validated already, e.g. their concatenation along N (:mod:`quick.models.fuse`). Shapes and dtypes are
        checked against ``storage``; values are not (use :meth:`from_tensors` for tensors from elsewhere)."""
        storage = check_storage(storage)
        if storage == UNPACKED:
            q = tensors.get("q")
            if not isinstance(q, torch.Tensor) or q.dim() != 2 or q.dtype != torch.int8:
                raise ValueError(f"unpacked W4A8 weights need q int8 [N, K], got {getattr(q, 'dtype', None)}")
            n, k = q.shape
            names = UNPACKED_NAMES[: 2 if group_size == -1 else 3]
            if set(tensors) != set(names):
                raise ValueError(
                    f"unpacked W4A8 weights of group size {group_size} are {list(names)}, got {sorted(tensors)}"
                )
            cs, gs = tensors["channel_scale"], tensors.get("group_scale")
            if tuple(cs.shape) != (n,) or cs.dtype != torch.float32:
                raise ValueError(f"channel_scale must be float32 [{n}], got {cs.dtype} {tuple(cs.shape)}")
            if gs is not None and (gs.is_floating_point() or k % group_size or tuple(gs.shape) != (k // group_size, n)):
                raise ValueError(f"group_scale must be an integer [K/G, N] tensor, got {gs.dtype} {tuple(gs.shape)}")
        else:
            lay = w4a8_layouts()[storage]
            qweight = tensors.get("qweight")
            if not isinstance(qweight, torch.Tensor) or qweight.dim() != 2:
                raise ValueError(f"layout {storage!r} needs a 2-D qweight tensor")
            k, n = qweight.shape[0] * lay.k_multiple, qweight.shape[1] * 8 // lay.k_multiple
            lay.validate(tensors, k, n, group_size)
            extra = set(tensors) - set(lay.tensor_specs(k, n, group_size))
            if extra:
                raise ValueError(f"layout {storage!r} holds no tensors {sorted(extra)}")
        devices = {t.device for t in tensors.values()}
        if len(devices) != 1:
            raise ValueError(f"W4A8 tensors on several devices: {sorted(map(str, devices))}")
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod._adopt(dict(tensors), storage, group_size, (n, k), bias, dtype, logical_in_features)
        return mod

    # ----------------------------------------------------------------------------------------- weights

    def stored(self) -> dict[str, torch.Tensor]:
        """The weight buffers (no bias), as the checkpoint stores them."""
        return {n: b for n, b in self._buffers.items() if n != "bias" and b is not None}

    def weight(self) -> W4A8Weight:
        """The unpacked W4A8 weights (cached until a buffer changes)."""
        key = tuple((b.data_ptr(), b._version, b.device) for b in self.stored().values())
        if self._cache is None or self._cache[0] != key:
            if self.storage != UNPACKED:
                w = w4a8_layouts()[self.storage].unpack(self.stored(), self.group_size)
            else:
                w = W4A8Weight(self.q, self.channel_scale, getattr(self, "group_scale", None), self.group_size)
            self._cache = (key, w, {})
        return self._cache[1]

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``[N, logical K]`` weights the integers represent (activation quantization not included)."""
        return self.weight().dequantize(dtype)[:, : self.logical_in_features]

    # ----------------------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offered, self._offered = self._offered, None
        if offered is not None and offered[0] is x:  # quantized already by the norm that made x
            return self.forward_quantized(offered[1], offered[2], x.dtype).reshape(*x.shape[:-1], self.out_features)
        if x.shape[-1] not in (self.in_features, self.logical_in_features):
            raise ValueError(f"input last dim {x.shape[-1]} != in_features {self.logical_in_features}")
        if not x.is_floating_point():
            raise TypeError(f"input must be floating point, got {x.dtype}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose from {BACKENDS}")
        ref_device = next(iter(self.stored().values())).device
        if x.device != ref_device:
            raise ValueError(f"input on {x.device} but weights on {ref_device}")
        if x.shape[-1] != self.in_features:
            x = F.pad(x, (0, self.in_features - x.shape[-1]))
        if self.backend != "reference" and x.is_cuda and self.kernel_eligible():
            xk = x.to(self.dtype)
            fn = _kernel_for(self.storage, xk)
            if fn is not None:
                try:
                    out = self._run_kernel(fn, xk.reshape(-1, self.in_features))
                except ValueError as e:  # the launcher's shape/argument checks (before any launch)
                    if self.backend == "kernel":
                        raise
                    self._kernel_error = str(e)
                    msg = f"W4A8 kernel refused this layer ({e}); it runs the reference path"
                    warnings.warn(msg, RuntimeWarning, stacklevel=2)
                else:
                    self.last_path = "kernel"
                    return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        if self.backend == "kernel":
            raise RuntimeError(
                f"no W4A8 GPU kernel available for this layer ({self.storage}, N={self.out_features}) on {x.device}"
            )
        self.last_path = "reference"
        w = self.weight()
        return reference_w4a8(x, w, self.bias, self._cache[2]).to(x.dtype)

    def fuses(self, m: int, device: torch.device, dtype: torch.dtype, act: str = "", norm: bool = False) -> bool:
        """Whether a gated (``act``) / residual add + RMSNorm (``norm``) epilogue would run inside this layer's
        kernel (:meth:`quick.nn.linear.QuickLinear.fuses`, asked by the fast decode step): never, those epilogues
        exist only in the W4A16 kernels, so callers run the steps around ``layer(x)``."""
        return False

    def takes_quantized(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward_quantized` runs this layer's kernel for inputs like ``x`` (CUDA, the layer's dtype,
        its stored K, a kernel registered and available): then a norm before it may quantize the activations itself
        (``quick::rms_norm_quant``) instead of this layer doing it."""
        if self.backend == "reference" or not x.is_cuda or x.dtype != self.dtype or not self.kernel_eligible():
            return False
        if x.shape[-1] != self.in_features or (self.storage == "w4a8_sm90" and self.out_features % 64):
            return False  # padded K, or an sm90 layer narrower than its kernel's N multiple (dispatcher fallback)
        return _kernel_for(self.storage, x) is not None

    def offer_quantized(self, x: torch.Tensor, xq: torch.Tensor, sx: torch.Tensor) -> None:
        """``x``'s activations quantized already (``xq`` int8 [..., K], ``sx`` fp32 [...]): the next ``forward(x)``
        of this very tensor uses them (:meth:`forward_quantized`); any other input drops them."""
        self._offered = (x, xq, sx)

    def forward_quantized(
        self, xq: torch.Tensor, sx: torch.Tensor, out_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """``y [..., N]`` from activations quantized already (``xq`` int8 [..., K], ``sx`` fp32 [...], the format of
        :func:`quick.formats.w4a8.quantize_activations`), in ``out_dtype`` (default: the layer's dtype): the kernel
        (op ``quick::gemm_w4a8_quantized``) where :meth:`takes_quantized` holds, else the reference arithmetic."""
        out_dtype = out_dtype or self.dtype
        if xq.dtype != torch.int8 or xq.shape[-1] != self.in_features or tuple(sx.shape) != tuple(xq.shape[:-1]):
            raise ValueError(
                f"quantized activations must be int8 [..., {self.in_features}] with scales [...], got "
                f"{xq.dtype} {tuple(xq.shape)} and {tuple(sx.shape)}"
            )
        lead = xq.shape[:-1]
        xq2, sx2 = xq.reshape(-1, self.in_features), sx.reshape(-1).float()
        probe = torch.empty((0, self.in_features), dtype=out_dtype, device=xq.device)
        if out_dtype == self.dtype and self.takes_quantized(probe):
            t = self.stored()
            # the bias where forward's kernel entry adds it (epilogue, or after the product): the same roundings
            inner = _kernel_signature(_kernel_for(self.storage, probe))[0]
            out = torch.ops.quick.gemm_w4a8_quantized(
                xq2, sx2, t["qweight"], t["channel_scale"], t.get("group_scale"), self.bias if inner else None,
                self.group_size, self.storage, out_dtype, self.widen,
            )  # fmt: skip
            if self.bias is not None and not inner:
                out = out + self.bias
            self.last_path = "kernel"
        else:
            if self.backend == "kernel":
                raise RuntimeError(f"no W4A8 GPU kernel for this layer ({self.storage}) on {xq.device} in {out_dtype}")
            w = self.weight()
            y = integer_matmul(xq2, w, self._cache[2])
            y.mul_(sx2.double()[:, None]).mul_(w.channel_scale.double()[None, :].to(y.device))
            if self.bias is not None:
                y.add_(self.bias.double())
            out = y.to(out_dtype)
            self.last_path = "reference"
        return out.reshape(*lead, self.out_features)

    def kernel_eligible(self) -> bool:
        """Packed, in a shape the layout's kernel takes, and not refused by it before."""
        if self.storage == UNPACKED or self._kernel_error is not None:
            return False
        return self.out_features % KERNEL_N_MULTIPLE.get(self.storage, 1) == 0

    def _run_kernel(self, fn, x2d: torch.Tensor) -> torch.Tensor:
        """Call ``fn(x2d, packed, group_size[, bias])``; the bias is added here if the kernel takes none."""
        takes_bias, takes_widen = _kernel_signature(fn)
        kw = {"widen": self.widen} if takes_widen else {}
        if takes_bias:
            return fn(x2d, self.stored(), self.group_size, self.bias, **kw)
        out = fn(x2d, self.stored(), self.group_size, **kw)
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        pad = f" (padded from {self.logical_in_features})" if self.logical_in_features != self.in_features else ""
        return (
            f"in_features={self.in_features}{pad}, out_features={self.out_features}, group_size={self.group_size}, "
            f"storage={self.storage}, dtype={self.dtype}, bias={self.bias is not None}"
        )
