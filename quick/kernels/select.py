"""Which kernel runs a packed layer's product (W4A16 and W4A8): the one place that decides (docs/selection.md).

Every kernel implements :class:`Kernel`: whether it can run a :class:`Problem` (and if not, why), the configurations
worth timing, the model's pick, and the launch. :func:`choose` decides for every caller (the layers' ops, the fused
decode-path entry points, the benchmarks), in one order:

1. ``QUICK_KERNEL`` (:mod:`quick.settings`): an explicit override;
2. the measured table for this GPU (:mod:`quick.kernels.tuning`, written by ``quick tune``);
3. the autotune cache: the few plausible candidates timed at the first eager call of a shape and batch bucket, kept
   on disk per GPU (:mod:`quick.kernels.autotune`);
4. the model: the decode kernel up to :data:`DEC_MODEL_MAX_M` rows, then the layout's GEMM with its tile per batch
   size and the split-k model. It generalizes to any shape; the steps above only make it faster.

Callers that must pick a kernel themselves (tests, ``quick tune``) call :func:`matmul` with ``choice=``.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass

import torch

from quick import settings
from quick.kernels import autotune, moe_sm90, tuning
from quick.kernels import decode as qd
from quick.kernels import mma as qm
from quick.kernels import moe as qmoe
from quick.kernels import w4a8_mma as w4
from quick.kernels import w4a8_wgmma as w8
from quick.kernels import wgmma as sm

# Up to this many rows the model picks the decode kernel: at M <= 8 it beat the GEMMs on every layer shape measured
# (H200, 8192^2: 18.5 / 20.5 / 22.7 us at M = 1 / 4 / 8 against 26.9 / 26.5 / 26.4 for the wgmma GEMM), at M = 16 on
# half of them.
DEC_MODEL_MAX_M = 8
MAX_CANDIDATES = 10  # timed at first use per shape and bucket: a few milliseconds once the kernels are built


@dataclass(frozen=True)
class Problem:
    """One product ``x [M, K] @ dequant(W [K, N])`` of a packed ``layout`` (``group_size`` resolved: K if
    per-channel)."""

    layout: str
    m: int
    n: int
    k: int
    group_size: int
    dtype: torch.dtype
    device: torch.device
    widen: bool = False  # W4A8 per-group weights whose group scales all fit the widened kernels (<= 16)

    @property
    def key_layout(self) -> str:
        """The layout as tables and the autotune cache name it (widened W4A8 weights run other kernels)."""
        return self.layout + ("+widen" if self.widen else "")


@dataclass(frozen=True)
class Choice:
    """A kernel with its config (None: the kernel's default for M), split count (None: its split model) and, for
    the wgmma GEMM, the persistent grid's round cap; ``source`` says which step of :func:`choose` made it."""

    kernel: str
    config: object | None = None
    splits: int | None = None
    rounds: int | None = None
    source: str = "model"

    def describe(self) -> str:
        cfg = "default" if self.config is None else _fields(self.config)
        split = "auto" if self.splits is None else str(self.splits)
        return f"{self.kernel}[{cfg}] splits={split} ({self.source})"


def _fields(config: object) -> str:
    if isinstance(config, str):
        return config
    if dataclasses.is_dataclass(config):
        return ",".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items())
    return repr(config)


class Kernel:
    """The interface every kernel implements."""

    name: str = ""
    layouts: tuple[str, ...] = ()

    def why_not(self, p: Problem) -> str | None:
        """None if the kernel can run ``p``, else the reason it cannot."""
        raise NotImplementedError

    def model(self, p: Problem) -> Choice | None:
        """The model's choice with this kernel, or None where the model would not use it."""
        raise NotImplementedError

    def default(self, p: Problem) -> Choice:
        """This kernel with its own default config for ``p`` (an override or a table entry without a config)."""
        return Choice(self.name)

    def candidates(self, p: Problem, num_sms: int) -> list[Choice]:
        """Configurations worth timing for ``p`` (the model's pick is timed first, separately)."""
        raise NotImplementedError

    def config_from(self, p: Problem, fields: dict) -> object | None:
        """A config from a table entry's fields, or None if they do not describe a config that fits ``p``."""
        raise NotImplementedError

    def run(self, p: Problem, c: Choice, x, weights: tuple, bias, out) -> torch.Tensor:
        """Launch on validated, dense, 16-byte aligned inputs (:func:`prepare`); ``weights``: the layout's packed
        tensors in order (``qweight, scales, zeros`` for W4A16, ``qweight, channel_scale, group_scale`` for W4A8)."""
        raise NotImplementedError

    def run_quantized(self, p: Problem, c: Choice, xq, sx, weights: tuple, bias, out) -> torch.Tensor:
        """The W4A8 kernels' launch on activations already quantized (``xq`` int8 [M, K], ``sx`` fp32 [M]), e.g. by
        the fused RMSNorm + quantization kernel; output in ``p.dtype``."""
        raise NotImplementedError(f"kernel {self.name} takes no quantized activations")


class DecodeKernel(Kernel):
    """``csrc/quick_dec.cu``: mma.sync over either layout, weights streamed through a cp.async ring, split over K."""

    name = "dec"
    layouts = qd.LAYOUTS

    def why_not(self, p: Problem) -> str | None:
        top = qd.MAX_M_BY_LAYOUT[p.layout]
        if not 1 <= p.m <= top:
            return f"takes 1 <= M <= {top} rows for {p.layout}, got {p.m}"
        cfg = qd.default_config(p.layout, p.m)
        if not cfg.supports(p.group_size):
            return f"no variant for group size {p.group_size}"
        if not qd.fits(cfg, p.m, p.n):
            return f"N={p.n} is not a multiple of its {cfg.channels} channels per CTA"
        return None

    def model(self, p: Problem) -> Choice | None:
        return Choice(self.name) if p.m <= DEC_MODEL_MAX_M else None

    def candidates(self, p: Problem, num_sms: int) -> list[Choice]:
        cands = qd.timing_candidates(p.layout, p.m, p.n, p.k, num_sms)
        return [Choice(self.name, c, s) for c, s in cands if c.supports(p.group_size)]

    def config_from(self, p: Problem, fields: dict) -> object | None:
        try:
            cfg = qd.DecConfig(**fields)
        except (TypeError, ValueError):
            return None
        ok = qd.fits(cfg, p.m, p.n) and cfg.supports(p.group_size) and cfg.wb == qd.LAYOUTS.index(p.layout)
        return cfg if ok else None

    def run(self, p, c, x, weights, bias, out):
        return qd.run_validated(p.layout, x, *weights, bias, p.m, p.n, p.k, p.group_size, c.config, c.splits, out)


class WgmmaKernel(Kernel):
    """``csrc/quick_sm90.cu``: the Hopper GEMM, wgmma with the weight as the register operand, split-k / persistent."""

    name = "wgmma"
    layouts = ("quick_sm90",)

    def why_not(self, p: Problem) -> str | None:
        if p.device.type != "cuda" or qm.capability(p.device)[0] != 9:
            return "needs an sm_90 GPU (H100 / H200)"
        if not sm.is_available(p.device):
            return "nvcc is not available to build it"
        return None

    def model(self, p: Problem) -> Choice | None:
        cfg, rounds = sm.tuned_config(p.m, p.dtype, p.group_size)
        return Choice(self.name, cfg, None, rounds)

    def default(self, p: Problem) -> Choice:
        return self.model(p)

    def candidates(self, p: Problem, num_sms: int) -> list[Choice]:
        if p.group_size != 128:
            return []
        tuned, rounds = sm.tuned_config(p.m, p.dtype, p.group_size)
        base = sm.plan(p.m, p.n, p.k, num_sms, tuned, None, p.group_size, rounds).splits
        out = [Choice(self.name, tuned, s) for s in sorted({base, 1, 2, 4} - {base})]
        if p.m >= 64 and (p.n // 128) * -(-p.m // tuned.nt) < num_sms // 2:  # narrow: 64-channel tiles first
            out[1:1] = [Choice(self.name, c, None) for c in sm.NARROW_TILES if c.nt in sm.neighbour_tiles(p.m)][:2]
        if p.m >= 64:  # the neighbouring token tiles (instantiated ones), ring and weights-through-TMA pipelines
            for nt in sm.neighbour_tiles(p.m):
                for cfg in (sm.default_config(nt, 128, 0), sm.wtma_config(nt)):
                    if cfg != tuned:
                        out.append(Choice(self.name, cfg, None))
        return out

    def config_from(self, p: Problem, fields: dict) -> object | None:
        try:
            cfg = sm.Sm90Config(**fields)
        except (TypeError, ValueError):
            return None
        return cfg if cfg.smem_bytes() <= sm.SMEM_LIMIT else None

    def run(self, p, c, x, weights, bias, out):
        return sm.launch_validated(x, *weights, bias, p.m, p.n, p.k, p.group_size, c.config, c.splits, c.rounds, out)


def _launch_group(p) -> int:
    """The group size as the ``quick`` launchers take it: the problem holds the resolved size, -1 = per-channel."""
    return -1 if p.group_size == p.k else p.group_size


class MmaGemmKernel(Kernel):
    """``csrc/quick_mma.cu``: the paper's mma.sync GEMM over the ``quick`` layout, any sm_80+ GPU."""

    name = "gemm"
    layouts = ("quick",)

    def why_not(self, p: Problem) -> str | None:
        return None if qm.capability(p.device)[0] >= 8 else "needs an sm_80+ GPU"

    def model(self, p: Problem) -> Choice | None:
        return Choice(self.name)

    def candidates(self, p: Problem, num_sms: int) -> list[Choice]:
        names = [c.name for c in qm.GEMM_CONFIGS.values() if p.k % c.bks == 0 and (p.m <= 64 or c.bm >= 64)]
        return [Choice(self.name, n, s) for n in names for s in (None, 2)][: MAX_CANDIDATES - 1]

    def config_from(self, p: Problem, fields: dict) -> object | None:
        name = fields.get("name")
        return name if name in qm.GEMM_CONFIGS and p.k % qm.GEMM_CONFIGS[name].bks == 0 else None

    def run(self, p, c, x, weights, bias, out):
        return qm._run("gemm", x, *weights, _launch_group(p), bias, c.config, c.splits, out)


class MmaGemvKernel(Kernel):
    """``csrc/quick_gemv.cu``: the ``quick`` layout's small-batch GEMV (M <= 8)."""

    name = "gemv"
    layouts = ("quick",)

    def why_not(self, p: Problem) -> str | None:
        if not 1 <= p.m <= qm.GEMV_MAX_M:
            return f"takes 1 <= M <= {qm.GEMV_MAX_M} rows, got {p.m}"
        return None if qm.capability(p.device)[0] >= 8 else "needs an sm_80+ GPU"

    def model(self, p: Problem) -> Choice | None:
        return None  # the decode kernel and the GEMM were as fast or faster on every shape measured

    def candidates(self, p: Problem, num_sms: int) -> list[Choice]:
        return [Choice(self.name, qm.gemv_config_for(_launch_group(p)).name)]

    def config_from(self, p: Problem, fields: dict) -> object | None:
        name = fields.get("name")
        return name if name in qm.GEMV_CONFIGS else None

    def run(self, p, c, x, weights, bias, out):
        return qm._run("gemv", x, *weights, _launch_group(p), bias, c.config, c.splits, out)


class W4A8MmaKernel(Kernel):
    """``csrc/quick_w4a8.cu``: W4A8 (int8 activations) mma.sync GEMM over the ``w4a8`` layout, any sm_80+ GPU."""

    name = "w4a8_mma"
    layouts = ("w4a8",)

    def why_not(self, p: Problem) -> str | None:
        return None if qm.capability(p.device)[0] >= 8 else "needs an sm_80+ GPU"

    def model(self, p: Problem) -> Choice | None:
        return Choice(self.name)

    def candidates(self, p: Problem, num_sms: int) -> list[Choice]:
        return [Choice(self.name, c.name) for c in w4.CONFIGS.values() if p.k % c.bks == 0]

    def config_from(self, p: Problem, fields: dict) -> object | None:
        name = fields.get("name")
        return name if name in w4.CONFIGS and p.k % w4.CONFIGS[name].bks == 0 else None

    def run(self, p, c, x, weights, bias, out):
        return w4.gemm_w4a8_cuda(x, *weights, p.group_size, bias, config=c.config, splits=c.splits, out=out)

    def run_quantized(self, p, c, xq, sx, weights, bias, out):
        return w4.gemm_w4a8_q(xq, sx, *weights, p.group_size, bias, p.dtype, config=c.config, splits=c.splits,
                              out=out)  # fmt: skip


class W4A8WgmmaKernel(Kernel):
    """``csrc/quick_w4a8_sm90.cu``: W4A8 on Hopper, int8 wgmma with the weight as the register operand."""

    name = "w4a8_wgmma"
    layouts = ("w4a8_sm90",)

    def why_not(self, p: Problem) -> str | None:
        if p.device.type != "cuda" or qm.capability(p.device)[0] != 9:
            return "needs an sm_90 GPU (H100 / H200)"
        return None if w8.is_available(p.device) else "nvcc is not available to build it"

    def model(self, p: Problem) -> Choice | None:
        cfg, splits, rounds = w8.auto_config(p.m, p.n, p.k, qm.num_sms(p.device), p.group_size, p.widen)
        return Choice(self.name, cfg, splits, rounds)

    def default(self, p: Problem) -> Choice:
        return self.model(p)

    def candidates(self, p: Problem, num_sms: int) -> list[Choice]:
        return [Choice(self.name, c) for c in w8.candidates(p.m, p.group_size, p.widen)]

    def config_from(self, p: Problem, fields: dict) -> object | None:
        try:
            cfg = w8.W4A8Sm90Config(**fields)
        except (TypeError, ValueError):
            return None
        fits = cfg.nt in w8.token_tiles(p.group_size, bool(cfg.widen)) and cfg.smem_bytes(p.group_size) <= w8.SMEM_LIMIT
        return cfg if fits and (p.widen or not cfg.widen) else None

    def run(self, p, c, x, weights, bias, out):
        xq, sx = w8.quantize_activations_sm90(x)
        return self.run_quantized(p, c, xq, sx, weights, bias, out)

    def run_quantized(self, p, c, xq, sx, weights, bias, out):
        return w8.gemm_w4a8_sm90_q(xq, sx, *weights, p.group_size, bias, p.dtype, c.config, c.splits, out, c.rounds,
                                   widen=p.widen)  # fmt: skip


KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in (DecodeKernel(), WgmmaKernel(), MmaGemmKernel(), MmaGemvKernel(), W4A8MmaKernel(), W4A8WgmmaKernel())
}
# The model's order per layout: the first kernel that can run the problem and whose model wants it.
MODEL_ORDER: dict[str, tuple[str, ...]] = {
    "quick_sm90": ("dec", "wgmma"),
    "quick": ("dec", "gemv", "gemm"),
    "w4a8_sm90": ("w4a8_wgmma",),
    "w4a8": ("w4a8_mma",),
}


def kernels_for(layout: str) -> list[Kernel]:
    if layout not in MODEL_ORDER:
        raise ValueError(f"no kernels for layout {layout!r}; layouts with kernels: {sorted(MODEL_ORDER)}")
    return [KERNELS[name] for name in MODEL_ORDER[layout]]


def reasons(p: Problem) -> list[tuple[str, str]]:
    """Per kernel of the layout: ``(name, "ok" or why it cannot run p)``."""
    return [(k.name, k.why_not(p) or "ok") for k in kernels_for(p.layout)]


def explain(p: Problem) -> list[tuple[str, str]]:
    """:func:`reasons`, then the choice made."""
    return [*reasons(p), ("chosen", choose(p).describe())]


def _model(p: Problem) -> Choice:
    for kern in kernels_for(p.layout):
        if kern.why_not(p) is None:
            c = kern.model(p)
            if c is not None:
                return c
    raise ValueError(f"no kernel can run {p}: " + "; ".join(f"{n}: {why}" for n, why in reasons(p)))


def _override(p: Problem) -> Choice | None:
    for name, max_m in settings.kernel_override():
        kern = KERNELS[name]
        if p.layout in kern.layouts and (not max_m or p.m <= max_m) and kern.why_not(p) is None:
            return dataclasses.replace(kern.default(p), source="override")
    return None


def _from_entry(p: Problem, kernel: str, fields: dict, splits: int | None, source: str, rounds: int | None = None
                ) -> Choice | None:  # fmt: skip
    kern = KERNELS.get(kernel)
    if kern is None or p.layout not in kern.layouts or kern.why_not(p) is not None:
        return None
    cfg = kern.config_from(p, fields) if fields else None
    if fields and cfg is None:
        return None
    base = kern.default(p) if cfg is None else Choice(kernel, cfg, rounds=rounds)
    return dataclasses.replace(base, splits=splits, source=source)


def _from_table(p: Problem) -> Choice | None:
    if not settings.tables_enabled():
        return None
    if p.layout not in tuning.KERNELS:
        return None
    entry = tuning.lookup(p.layout, p.device, p.m, p.n, p.k, p.group_size)
    if entry is None:
        return None
    return _from_entry(p, entry.kernel, entry.config, entry.splits, "table")


def _from_autotune(p: Problem) -> Choice | None:
    e = autotune.lookup(p.device, p.key_layout, p.k, p.n, p.m, p.group_size, p.dtype)
    if e is None:
        return None
    return _from_entry(p, e.get("kernel", ""), e.get("config") or {}, e.get("splits"), "autotune", e.get("rounds"))


def candidates(p: Problem) -> list[Choice]:
    """The model's pick first (the reference for agreement), then alternatives taken in turn from each kernel that
    can run ``p``, :data:`MAX_CANDIDATES` in all."""
    nsm = qm.num_sms(p.device)
    lists = [k.candidates(p, nsm) for k in kernels_for(p.layout) if k.why_not(p) is None]
    out = [_model(p)]
    for i in range(max(map(len, lists), default=0)):
        for lst in lists:
            if i < len(lst) and lst[i] not in out and len(out) < MAX_CANDIDATES:
                out.append(lst[i])
    return out


def config_fields(config: object) -> dict:
    """A choice's config as tables and the autotune cache store it: ``{}`` (default), ``{"name": ...}`` or the
    dataclass fields."""
    if config is None:
        return {}
    if isinstance(config, str):
        return {"name": config}
    return dataclasses.asdict(config)


_CHOSEN: dict[tuple, Choice] = {}
_TUNE_LOCK = threading.Lock()


def choose(p: Problem, tensors: tuple | None = None) -> Choice:
    """The kernel and config for ``p`` (module docstring: override, table, autotune cache, model). With ``tensors``
    (``x, qweight, scales, zeros`` prepared for ``p``) a problem that nothing covers yet is timed now, unless
    autotuning is off or a CUDA graph is being captured."""
    key = (p, settings.selection_key())
    hit = _CHOSEN.get(key)
    if hit is not None:
        return hit
    c = _override(p) or _from_table(p) or _from_autotune(p)
    cacheable = True
    if c is None:
        tunable = settings.autotune_enabled() and p.device.type == "cuda"
        if tunable and tensors is not None and not torch.cuda.is_current_stream_capturing():
            c = _tune(p, tensors)
        else:
            c = _model(p)
            cacheable = not tunable  # a model pick made without timing must not stop the next eager call from timing
    if cacheable:
        qm._remember(_CHOSEN, key, c)
    return c


def _tune(p: Problem, tensors: tuple) -> Choice:
    x, *weights = tensors
    cands = candidates(p)
    if len(cands) == 1:
        return cands[0]
    with _TUNE_LOCK:

        def run(c: Choice, out: torch.Tensor) -> torch.Tensor:
            return KERNELS[c.kernel].run(p, c, x, tuple(weights), None, out)

        times = autotune.time_candidates(run, cands, (p.m, p.n), p.dtype, p.device)
    timed = [(t, i) for i, t in enumerate(times) if t is not None]
    if not timed:
        return cands[0]
    us, best = min(timed)
    c = cands[best]
    entry = {"kernel": c.kernel, "config": config_fields(c.config), "splits": c.splits, "us": round(us, 2),
             "candidates": len(timed)}  # fmt: skip
    if c.rounds is not None and c.config is not None:
        entry["rounds"] = c.rounds
    autotune.record(p.device, p.key_layout, p.k, p.n, p.m, p.group_size, p.dtype, entry)
    return dataclasses.replace(c, source="autotune")


def chosen(m: int, layouts: set[str] | None = None) -> dict[str, str]:
    """The choices this process made for problems of ``m`` rows (of ``layouts`` only, if given), by
    ``"<layout> <K>x<N> <dtype>"``: benchmarks record which kernel ran each layer shape."""
    out = {}
    for (p, _settings), c in list(_CHOSEN.items()):
        if p.m == m and (layouts is None or p.layout in layouts):
            out[f"{p.layout} {p.k}x{p.n} {str(p.dtype).removeprefix('torch.')}"] = c.describe()
    return dict(sorted(out.items()))


def clear() -> None:
    """Forget the choices made in this process (after a table or the autotune cache changed)."""
    _CHOSEN.clear()
    _MOE_PATH.clear()
    tuning.clear_cache()
    autotune.clear_memory()


# --------------------------------------------------------------------------------------------- entry points


def prepare(layout: str, x, w0, w1, w2, group_size, bias, widen: bool = False):
    """The layout's validation (its exception types and messages); returns the :class:`Problem` and the inputs made
    dense and aligned for the launch: ``(x, weights, bias)``."""
    if layout == "quick_sm90":
        x, w0, w1, w2, bias, m, n, k, g = sm.prepare(x, w0, w1, w2, group_size, bias)
    elif layout == "quick":
        x = qm._dense_rows(x) if isinstance(x, torch.Tensor) and x.dim() == 2 else x
        m, k, n, g = qm._prepare(x, w0, w1, w2, group_size, bias)
    elif layout == "w4a8":
        x = qm._dense_rows(x) if isinstance(x, torch.Tensor) and x.dim() == 2 else x
        m, k, n = w4.validate(x, w0, w1, w2, group_size, bias)
        g = group_size
    elif layout == "w4a8_sm90":
        m, n, k = w8.validate(x, w0, w1, w2, group_size, bias)
        if x.device.type != "cuda":
            raise w8.W4A8Sm90Error("the sm_90 W4A8 kernel runs on CUDA tensors only")
        x = qm._dense_rows(x)
        w0, w1 = w0.contiguous(), w1.contiguous()
        w2 = w2.contiguous() if w2 is not None else None
        bias = bias.contiguous() if bias is not None else None
        g = group_size
    else:
        raise ValueError(f"no kernels for layout {layout!r}; layouts with kernels: {sorted(MODEL_ORDER)}")
    widen = bool(widen) and layout == "w4a8_sm90" and group_size > 0
    return Problem(layout, m, n, k, g, x.dtype, x.device, widen), (x, (w0, w1, w2), bias)


def matmul(layout: str, x, w0, w1, w2, group_size, bias=None, *, out=None, choice: Choice | None = None,
           widen: bool = False):  # fmt: skip
    """``x [M, K] @ dequant(W) (+ bias)`` for weights packed in ``layout`` (W4A16: ``qweight, scales, zeros``; W4A8:
    ``qweight, channel_scale, group_scale`` and ``widen``, whether every group scale fits the widened kernels), on
    the kernel :func:`choose` picks (or ``choice``: tests and tuning pick one themselves)."""
    p, (x, weights, bias) = prepare(layout, x, w0, w1, w2, group_size, bias, widen)
    if p.m == 0:
        return x.new_empty((0, p.n)) if out is None else out
    c = choice or choose(p, (x, *weights))
    return KERNELS[c.kernel].run(p, c, x, weights, bias, out)


W4A8_LAYOUTS = ("w4a8", "w4a8_sm90")


def validate_quantized(layout: str, xq, sx, w0, w1, w2, group_size, bias, out_dtype) -> tuple[int, int, int]:
    """``(M, N, K)`` of a W4A8 product on quantized activations (``xq`` int8 [M, K], ``sx`` fp32 [M], the result in
    ``out_dtype``): the layout's validation on a stand-in of x (meta tensors: nothing allocated, any device), then
    the activations' own checks."""
    if layout not in W4A8_LAYOUTS:
        raise ValueError(f"quantized activations feed the W4A8 layouts {W4A8_LAYOUTS}, not {layout!r}")
    if not isinstance(xq, torch.Tensor) or xq.dtype != torch.int8 or xq.dim() != 2:
        raise TypeError(f"xq must be a 2-D int8 tensor, got {getattr(xq, 'dtype', type(xq).__name__)}")
    if not isinstance(sx, torch.Tensor) or sx.dtype != torch.float32 or tuple(sx.shape) != (xq.shape[0],):
        raise TypeError(f"sx must be a float32 [{xq.shape[0]}] tensor, got {getattr(sx, 'dtype', None)}")
    if out_dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"out_dtype must be float16 or bfloat16, got {out_dtype}")
    meta = [t.to("meta") if isinstance(t, torch.Tensor) else t for t in (w0, w1, w2, bias)]
    probe = torch.empty(xq.shape, dtype=out_dtype, device="meta")
    if layout == "w4a8":
        m, k, n = w4.validate(probe, meta[0], meta[1], meta[2], group_size, meta[3], need_cuda=False)
    else:
        m, n, k = w8.validate(probe, meta[0], meta[1], meta[2], group_size, meta[3])
    return m, n, k


def prepare_quantized(layout: str, xq, sx, w0, w1, w2, group_size, bias, out_dtype, widen: bool = False):
    """:func:`prepare` for :func:`matmul_quantized`: :func:`validate_quantized`, every tensor on one CUDA device;
    returns the :class:`Problem` and ``(xq, sx, weights, bias)`` made dense."""
    m, n, k = validate_quantized(layout, xq, sx, w0, w1, w2, group_size, bias, out_dtype)
    tensors = [t for t in (xq, sx, w0, w1, w2, bias) if t is not None]
    if xq.device.type != "cuda" or len({t.device for t in tensors}) != 1:
        err = w4.W4A8Error if layout == "w4a8" else w8.W4A8Sm90Error
        raise err(f"the W4A8 kernels need xq, sx and the weights on one CUDA device, got {xq.device}")
    xq, sx = qm._dense_rows(xq), sx.contiguous()
    w0, w1 = w0.contiguous(), w1.contiguous()
    w2 = w2.contiguous() if w2 is not None else None
    bias = bias.contiguous() if bias is not None else None
    widen = bool(widen) and layout == "w4a8_sm90" and group_size > 0
    return Problem(layout, m, n, k, group_size, out_dtype, xq.device, widen), (xq, sx, (w0, w1, w2), bias)


def matmul_quantized(layout: str, xq, sx, w0, w1, w2, group_size, bias=None, out_dtype=torch.float16, *, out=None,
                     choice: Choice | None = None, widen: bool = False):  # fmt: skip
    """:func:`matmul` of a W4A8 layout on activations already quantized (``xq`` int8 [M, K], ``sx`` fp32 [M]),
    output in ``out_dtype``. The choice is the one the same product on float activations gets (same
    :class:`Problem`), without timing candidates here (they time on float inputs)."""
    p, (xq, sx, weights, bias) = prepare_quantized(layout, xq, sx, w0, w1, w2, group_size, bias, out_dtype, widen)
    if p.m == 0:
        return xq.new_empty((0, p.n), dtype=out_dtype) if out is None else out
    c = choice or choose(p)
    return KERNELS[c.kernel].run_quantized(p, c, xq, sx, weights, bias, out)


def describe(layer, m: int) -> str:
    """The choice for ``m`` rows through a ``QuickLinear`` (benchmarks, ``quick explain``-style reports)."""
    g = layer.in_features if layer.group_size == -1 else layer.group_size
    p = Problem(layer.layout_name, m, layer.out_features, layer.in_features, g, layer.dtype, layer.qweight.device)
    return choose(p).describe()


def fused_choice(p: Problem, act: bool, norm: bool) -> Choice | None:
    """The decode-kernel choice for ``p`` if it has the ``act`` / ``norm`` variants (the fused decode-path entry points
    are then one launch), else None."""
    if p.layout != "quick_sm90" or p.device.type != "cuda":
        return None
    if (act and not settings.fusion_enabled("act")) or (norm and not settings.fusion_enabled("norm")):
        return None
    c = choose(p)
    if c.kernel != "dec":
        return None
    cfg = qd.launch_config(p.layout, p.m, c.config)
    ok = (not act or qd.takes_act(cfg, p.m, p.group_size)) and (not norm or qd.takes_norm(cfg, p.m, p.group_size))
    return c if ok else None


# ------------------------------------------------------------------------------------- mixture of experts


@dataclass(frozen=True)
class MoEProblem:
    """One grouped product of a mixture-of-experts block: ``tokens`` input rows each routed to ``top_k`` of
    ``experts`` weights ``[K, N]`` packed in ``layout`` (``top_k = 1``: one input row per slot, the down projection),
    the plan's ``block_size`` rows per block, ``act`` the gated epilogue's activation ("" for none)."""

    layout: str
    tokens: int
    top_k: int
    experts: int
    n: int
    k: int
    group_size: int
    block_size: int
    dtype: torch.dtype
    device: torch.device
    act: str = ""

    @property
    def m(self) -> int:
        """Output rows: one per slot."""
        return self.tokens * self.top_k


class GroupedMmaKernel(Kernel):
    """``csrc/quick_moe.cu``: the grouped W4A16 GEMM over a sorted-token plan, mma.sync, any sm_80+ GPU. Its methods
    take a :class:`MoEProblem`."""

    name = "moe_mma"
    layouts = ("quick",)

    def why_not(self, p: MoEProblem) -> str | None:
        if p.device.type != "cuda" or qm.capability(p.device)[0] < 8:
            return "needs an sm_80+ GPU"
        if p.k % 64 or p.n % (128 if p.act else 64):
            return f"needs K and N multiples of 64 (N of 128 with a gated epilogue), got K={p.k}, N={p.n}"
        if p.act not in qmoe.ACTS:
            return f"no gated epilogue for activation {p.act!r}"
        if not qmoe.configs_for(p.block_size, p.k):
            return f"no variant for block size {p.block_size} with K={p.k}"
        return None if qmoe.is_available(p.device) else "nvcc is not available to build it"

    def model(self, p: MoEProblem) -> Choice | None:
        return Choice(self.name, qmoe.default_config(p.block_size, p.k).name)

    def default(self, p: MoEProblem) -> Choice:
        return self.model(p)

    def candidates(self, p: MoEProblem, num_sms: int) -> list[Choice]:
        return [Choice(self.name, c.name) for c in qmoe.configs_for(p.block_size, p.k)]

    def config_from(self, p: MoEProblem, fields: dict) -> object | None:
        name = fields.get("name")
        ok = name in qmoe.CONFIGS and qmoe.CONFIGS[name] in qmoe.configs_for(p.block_size, p.k)
        return name if ok else None

    def run(self, p: MoEProblem, c: Choice, x, weights: tuple, plan: tuple, topk_weights=None) -> torch.Tensor:
        """``plan``: ``(sorted_ids, block_experts, num_padded)``."""
        g = _launch_group(p)
        return qmoe.grouped_gemm(x, *weights, g, *plan, p.top_k, topk_weights, p.act, config=c.config)


class GroupedWgmmaKernel(Kernel):
    """``csrc/quick_sm90.cu`` (``QS_GROUPED``): the grouped W4A16 GEMM over a sorted-token plan on wgmma, the weight
    as the register operand, stacks in the ``quick_sm90`` layout, sm_90. A gated product runs as the plain product
    and ``act(gate) * up`` after it (the expert MLP keeps the rows in plan order in between:
    :meth:`quick.nn.moe.QuickMoEExperts.kernel_forward_planned`)."""

    name = "moe_wgmma"
    layouts = ("quick_sm90",)

    def why_not(self, p: MoEProblem) -> str | None:
        if p.act and p.act not in qmoe.ACTIVATIONS:
            return f"no activation {p.act!r}"
        return moe_sm90.unavailable(p.k, p.n, p.group_size, p.block_size, p.dtype, p.device)

    def model(self, p: MoEProblem) -> Choice | None:
        return Choice(self.name, f"nt{p.block_size}")

    def default(self, p: MoEProblem) -> Choice:
        return self.model(p)

    def candidates(self, p: MoEProblem, num_sms: int) -> list[Choice]:
        return [self.model(p)]

    def config_from(self, p: MoEProblem, fields: dict) -> object | None:
        return None

    def run(self, p: MoEProblem, c: Choice, x, weights: tuple, plan: tuple, topk_weights=None) -> torch.Tensor:
        g = _launch_group(p)
        h = moe_sm90.grouped_gemm_sm90(x, *weights, g, *plan, p.top_k, None if p.act else topk_weights)
        return qmoe.gated(h, p.act, topk_weights) if p.act else h  # rows no slot names stay zero: act(0) * 0


MOE_KERNELS: dict[str, Kernel] = {k.name: k for k in (GroupedMmaKernel(), GroupedWgmmaKernel())}
MOE_MODEL_ORDER: dict[str, tuple[str, ...]] = {"quick": ("moe_mma",), "quick_sm90": ("moe_wgmma",)}


def moe_reasons(p: MoEProblem) -> list[tuple[str, str]]:
    """Per grouped kernel of the layout: ``(name, "ok" or why it cannot run p)``."""
    names = MOE_MODEL_ORDER.get(p.layout, ())
    return [(n, MOE_KERNELS[n].why_not(p) or "ok") for n in names]


def moe_available(p: MoEProblem) -> bool:
    """Whether some grouped kernel can run ``p`` (callers fall back to the reference path otherwise)."""
    return any(why == "ok" for _, why in moe_reasons(p))


def choose_moe(p: MoEProblem) -> Choice:
    """The grouped kernel and config for ``p``: the first kernel of the layout that can run it, its model's config
    (one variant per block size and K: nothing to time yet)."""
    key = (p, settings.selection_key())
    hit = _CHOSEN.get(key)
    if hit is not None:
        return hit
    for name in MOE_MODEL_ORDER.get(p.layout, ()):
        kern = MOE_KERNELS[name]
        if kern.why_not(p) is None:
            c = kern.model(p)
            if c is not None:
                _CHOSEN[key] = c
                return c
    raise ValueError(f"no grouped kernel can run {p}: " + "; ".join(f"{n}: {why}" for n, why in moe_reasons(p)))


def moe_mlp_kernel(p_gu: MoEProblem, p_dn: MoEProblem) -> str:
    """Which kernel runs an expert MLP's two grouped products (``p_gu`` with the gated activation, ``p_dn`` with the
    slot weights): ``"dec"``, the decode kernel over a 16-row plan (gate|up plain into ``[slots, 2I]``, then down
    staging ``act(gate) * up``: :func:`quick.kernels.moe.dec_grouped`), where it runs both; else the layout's grouped
    GEMM (:func:`choose_moe`): ``"mma"`` for ``quick`` (its gated epilogue), ``"wgmma"`` for ``quick_sm90`` (gate|up
    and down in plan order, ``act(gate) * up`` between them). ``QUICK_KERNEL`` entries ``dec`` / ``gemm`` (``@M``: up
    to M tokens) force one where it can run. Kept per problem pair and settings (asked by every experts forward)."""
    key = (p_gu, p_dn, settings.selection_key())
    hit = _MOE_PATH.get(key)
    if hit is not None:
        return hit
    dec_ok = moe_dec_unavailable(p_gu, p_dn) is None
    gemm = "wgmma" if p_gu.layout == "quick_sm90" else "mma"
    path = "dec" if dec_ok else gemm
    for name, max_m in settings.kernel_override():
        if max_m and p_gu.tokens > max_m:
            continue
        if name == "dec" and dec_ok:
            break
        if name == "gemm":
            path = gemm
            break
    qm._remember(_MOE_PATH, key, path)
    return path


_MOE_PATH: dict[tuple, str] = {}


def moe_dec_unavailable(p_gu: MoEProblem, p_dn: MoEProblem) -> str | None:
    """Why the decode kernel cannot run this expert MLP (None: it can)."""
    if p_gu.layout not in qmoe.DEC_CONFIGS:
        return f"layout {p_gu.layout!r}"
    if 2 * p_dn.k != p_gu.n:
        return f"down's K ({p_dn.k}) is not half of gate|up's N ({p_gu.n})"
    for k, n, g, act in ((p_gu.k, p_gu.n, p_gu.group_size, ""), (p_dn.k, p_dn.n, p_dn.group_size, p_gu.act)):
        why = qmoe.dec_unavailable(p_gu.tokens, k, n, g, p_gu.block_size, act, p_gu.dtype, p_gu.device,
                                   layout=p_gu.layout)  # fmt: skip
        if why is not None:
            return why
    return None


def moe_matmul(layout: str, x, qweight, scales, zeros, group_size: int, sorted_ids, block_experts, num_padded,
               top_k: int, topk_weights=None, act: str = "", *, choice: Choice | None = None,
               validate_ids: bool = False):  # fmt: skip
    """The grouped product of :mod:`quick.kernels.moe` (``out[s] = x[s // top_k] @ dequant(W[expert of s])``) on the
    kernel :func:`choose_moe` picks (or ``choice``)."""
    if layout not in MOE_MODEL_ORDER:
        raise ValueError(f"no grouped kernels for layout {layout!r}; layouts with one: {sorted(MOE_MODEL_ORDER)}")
    d = qmoe.validate(x, qweight, scales, zeros, group_size, sorted_ids, block_experts, num_padded, top_k,
                      topk_weights, act, layout=layout)  # fmt: skip
    if validate_ids:
        qmoe.check_ids(sorted_ids, block_experts, d.slots, d.e)
    p = MoEProblem(layout, d.m, top_k, d.e, d.n, d.k, d.g, d.block_size, x.dtype, x.device, act)
    c = choice or choose_moe(p)
    return MOE_KERNELS[c.kernel].run(p, c, x, (qweight, scales, zeros), (sorted_ids, block_experts, num_padded),
                                     topk_weights)  # fmt: skip
