"""Every compiled kernel variant as launchable cases on shapes at and around its tile edges.

Shared by ``scripts/sanitize.py`` (compute-sanitizer over every variant) and ``scripts/fuzz_gpu.py`` (the
differential fuzzer), and checked on CPU by ``tests/test_bad_input.py``: every entry of a launcher module's
``VARIANTS`` must map to at least one case here, so a variant added later without a case fails CI instead of
going unsanitized. Kernels offered through the dispatcher registry by other modules (not listed in
:data:`EXPLICIT_MODULES`) are covered through their registry entry on the same shapes (their default variant
only) and listed as such in the scripts' JSON.

Enumeration is pure arithmetic (no CUDA); :func:`run_case` needs a GPU.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

EXPLICIT_MODULES = (
    "quick.kernels.mma",
    "quick.kernels.wgmma",
    "quick.kernels.decode",
    "quick.kernels.attention",
)


@dataclass(frozen=True)
class Case:
    """One launch: ``kernel`` is ``mma_gemm``, ``mma_gemv``, ``sm90``, ``dec`` or ``registry:<layout>:<name>``;
    ``variant`` names the compiled variant (config, dtype, group path) it runs."""

    kernel: str
    variant: str
    dtype: torch.dtype
    m: int
    k: int
    n: int
    group_size: int
    splits: int | None = None
    config: object = None
    bias: bool = False
    layout: str = "quick"
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def label(self) -> str:
        dt = _dt_name(self.dtype)
        return (
            f"{self.kernel}[{self.variant}] {dt} M={self.m} K={self.k} N={self.n} g={self.group_size} "
            f"splits={self.splits} bias={int(self.bias)}"
        )


def _dt_name(dt: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dt, str(dt).removeprefix("torch."))


# ---------------------------------------------------------------------------------------- quick_mma


def mma_cases() -> list[Case]:
    """Per GEMM config: a one-row case, a case with partial M and N tiles and an uneven split-k, and a
    per-channel case with three splits; per GEMV variant: one and eight rows, empty warps, split-k."""
    from quick.kernels import mma as qm

    out: list[Case] = []
    for dt in (torch.float16, torch.bfloat16):
        for cfg in qm.GEMM_CONFIGS.values():
            var = f"{cfg.name}/{_dt_name(dt)}"
            k1 = math.lcm(cfg.bks, 128)
            # smallest shapes: one row, one n64 block, one k tile (K = lcm(stage, 128)), group 32
            out.append(Case("mma_gemm", var, dt, 1, k1, 64, 32, 1, cfg.name))
            # partial last M and N tiles, odd number of K tiles split unevenly in two, bias through the reduce
            out.append(Case("mma_gemm", var, dt, cfg.bm + 1, 3 * k1, cfg.bn + 64, 128, 2, cfg.name, True))
            # M one short of two tiles, per-channel group (one group over all K), three splits, group 64
            out.append(Case("mma_gemm", var, dt, 2 * cfg.bm - 1, 3 * k1, 192, -1, 3, cfg.name))
            out.append(Case("mma_gemm", var, dt, cfg.bm, 2 * k1, 64 if cfg.bn == 64 else cfg.bn, 64, None, cfg.name))
        for g in (32, 64, 128):
            cfg = qm.gemv_config_for(g)
            var = f"gemv-{cfg.name}-gs{cfg.gs(g)}/{_dt_name(dt)}"
            # K = 3 groups of 128: most warps of the CTA own no steps (empty k runs)
            out.append(Case("mma_gemv", var, dt, 1, 384, 64, g, 1))
            # 8 rows (the GEMV maximum), N with a partial CTA, K of 17 x 128 (uneven runs), split-k with bias
            out.append(Case("mma_gemv", var, dt, 8, 2176, 192, g, 2, None, True))
            out.append(Case("mma_gemv", var, dt, 5, 1024, 128, g, None))
        # per-channel GEMV (runtime group path, G = K)
        cfg = qm.gemv_config_for(-1)
        out.append(Case("mma_gemv", f"gemv-{cfg.name}-gs{cfg.gs(1024)}/{_dt_name(dt)}", dt, 3, 1024, 64, -1, 3))
    return out


def mma_variant_key(case: Case) -> tuple:
    """The ``mma.VARIANTS`` entry (source, sorted defines) that ``case`` launches."""
    from quick.kernels import mma as qm

    if case.kernel == "mma_gemm":
        cfg = case.config if not isinstance(case.config, str) else qm.GEMM_CONFIGS[case.config]
        if cfg is None:
            raise ValueError("GEMM cases name their config")
        return (qm.GEMM_SOURCE, tuple(sorted(cfg.defines(case.dtype).items())))
    g = case.k if case.group_size == -1 else case.group_size
    cfg = qm.gemv_config_for(case.group_size)
    return (qm.GEMV_SOURCE, tuple(sorted(cfg.defines(case.dtype, g).items())))


# ---------------------------------------------------------------------------------------- quick_sm90


def _instances(obj: object, cls: type, seen: set[int] | None = None) -> list:
    """Every instance of ``cls`` inside nested dicts, lists and tuples (a module's config tables)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, cls):
        return [obj]
    if isinstance(obj, dict):
        return [i for v in obj.values() for i in _instances(v, cls, seen)]
    if isinstance(obj, list | tuple):
        return [i for v in obj for i in _instances(v, cls, seen)]
    return []


def sm90_variant_configs(strict: bool = True) -> list[tuple[dict, object, int, torch.dtype]]:
    """``(defines, Sm90Config, group class 128|32, dtype)`` for every entry of ``wgmma.VARIANTS``. The
    config is looked up among every ``Sm90Config`` in the module's tables, so the mapping follows them; a
    variant that matches none raises (``strict``) or is left out (the scripts then report it uncovered)."""
    from quick.kernels import wgmma as qs

    configs = {c for v in vars(qs).values() if isinstance(v, dict | list) for c in _instances(v, qs.Sm90Config)}
    ordered = sorted(configs, key=repr)
    out = []
    for _src, _kern, defines in qs.VARIANTS:
        hit = next(
            (
                (defines, cfg, g, dt)
                for cfg in ordered
                for g in (128, 32)
                for dt in (torch.float16, torch.bfloat16)
                if cfg.defines(g, dt) == defines
            ),
            None,
        )
        if hit is None:
            if strict:
                raise LookupError(f"quick_sm90.VARIANTS entry {defines} matches no config of the module")
            continue
        out.append(hit)
    return out


def sm90_cases() -> list[Case]:
    """Per variant: M = one more than the token tile (two M tiles, the second with one row), N = 192 (the
    second 128-channel tile half full), K = 5 k64 steps split unevenly in two, bias; and a one-row case at
    M = nt - 1 with no split-k and the other group sizes of the variant's code path (64, per-channel)."""
    out: list[Case] = []
    for defines, cfg, gcls, dt in sm90_variant_configs(strict=False):
        var = (
            f"pipe{cfg.pipe}-nt{cfg.nt}-nwg{cfg.nwg}-wtma{cfg.wtma}-st{cfg.stages}-pref{defines['QS_PREF']}"
            f"-g{'32' if gcls == 32 else 'x'}"
            f"/{_dt_name(dt)}"
        )
        if gcls == 32:
            out.append(Case("sm90", var, dt, cfg.nt + 1, 320, 192, 32, 2, cfg, True, "quick_sm90"))
            out.append(Case("sm90", var, dt, max(1, cfg.nt - 1), 256, 64, 32, 1, cfg, False, "quick_sm90"))
        else:
            out.append(Case("sm90", var, dt, cfg.nt + 1, 640, 192, 128, 2, cfg, True, "quick_sm90"))
            out.append(Case("sm90", var, dt, max(1, cfg.nt - 1), 256, 64, 64, 1, cfg, False, "quick_sm90"))
            out.append(Case("sm90", var, dt, 3, 320, 128, -1, 3, cfg, False, "quick_sm90"))
    return out


# ---------------------------------------------------------------------------------------- quick_dec


def dec_variant_configs() -> list[tuple[dict, object, int, int, torch.dtype, int, int, int]]:
    """``(defines, DecConfig, M, group class 128|32, dtype, act, norm, pdl)`` for every entry of
    ``decode.VARIANTS`` (M: the largest batch of the variant's token-tile count; act: QD_ACT or 0; norm, pdl:
    QD_NORM, QD_PDL or 0); raises on a variant that no config of the module builds."""
    from quick.kernels import decode as qd

    tries = [
        (cfg, m, g, dt, act, norm, pdl)
        for _top, cfg in qd.all_configs()
        for m in (8, 16, 32, 64)
        for g in (128, 32)
        for dt in (torch.float16, torch.bfloat16)
        for act, norm in [(0, 0), *qd.FUSED_FLAGS]
        for pdl in (0, 1)
        if m <= qd.MAX_M_BY_LAYOUT[qd.LAYOUTS[cfg.wb]] and cfg.supports(g)
    ]
    out = []
    for _src, _kern, defines in qd.VARIANTS:
        hit = next(((defines, *t) for t in tries if t[0].defines(*t[1:]) == defines), None)
        if hit is None:
            raise LookupError(f"quick_dec.VARIANTS entry {defines} matches no config of the module")
        out.append(hit)
    return out


def dec_cases() -> list[Case]:
    """Per variant: its largest M with 5 k64 steps split unevenly in two and bias, N two CTAs wide; its smallest M
    of the same token-tile count with no split; and (128 class) a per-channel case with three splits."""
    from quick.kernels import decode as qd

    out: list[Case] = []
    for _defines, cfg, m, g, dt, act, norm, pdl in dec_variant_configs():
        layout = qd.LAYOUTS[cfg.wb]
        var = f"{layout}-rb{cfg.rb}-w{cfg.warps}-nw{cfg.nw}-st{cfg.stages}-m{m}-g{'32' if g == 32 else 'x'}"
        var += f"/{_dt_name(dt)}"
        n = 2 * cfg.channels
        if act or norm or pdl:  # QD_ACT / QD_NORM / QD_PDL (g128, M <= 8): 6 k64 steps split in two, then one
            var += f"/act{act}-norm{norm}-pdl{pdl}"
            ex = {"act": act, "norm": norm, "pdl": pdl}
            out.append(Case("dec_fused", var, dt, m, 384, n, 128, 2, cfg, True, layout, extra=ex))
            out.append(Case("dec_fused", var, dt, 1, 256, cfg.channels, 128, None, cfg, False, layout, dict(ex)))
            continue
        m_lo = 1 if m <= 8 else m // 2 + 1
        out.append(Case("dec", var, dt, m, 320, n, g, 2, cfg, True, layout))
        out.append(Case("dec", var, dt, m_lo, 256, cfg.channels, 64 if g == 128 else 32, None, cfg, False, layout))
        if g == 128:
            out.append(Case("dec", var, dt, m_lo, 192, n, -1, 3, cfg, False, layout))
    return out


# ---------------------------------------------------------------------------------------- decode attention


def attn_cases() -> list[Case]:
    """Per variant (head dim D, G query heads per kv head, dtype, plain or ``QA_ROPE``): batch 2 over 2 kv heads,
    output ``[B, H * D]`` (``m`` = batch, ``n`` = H * D, ``k`` = cache length, ``group_size`` = G); ``extra`` holds
    the position and the split count. Cases: the last cache position with 3 uneven splits and a padded mask;
    position 0 (one split with work, the others empty) with no mask; a position inside a loop step with the automatic
    split count (``QA_ROPE``: a position past the cache instead, which writes nothing)."""
    from quick.kernels import attention as at

    out: list[Case] = []
    for _src, _name, d in at.VARIANTS:
        dim, g, dt, rope = d["QA_D"], d["QA_G"], at.DTYPES[d["QA_DTYPE"]], d.get("QA_ROPE", 0)
        pdl = bool(d.get("QA_PDL", 0))
        var = f"d{dim}-g{g}/{_dt_name(dt)}" + ("/rope" if rope else "") + ("/pdl" if pdl else "")
        kern, n = ("attn_rope" if rope else "attn"), 2 * g * dim
        out.append(Case(kern, var, dt, 2, 77, n, g, 3, extra={"d": dim, "pos": 76, "mask": True, "pdl": pdl}))
        out.append(Case(kern, var, dt, 2, 40, n, g, 4, extra={"d": dim, "pos": 0, "mask": False, "pdl": pdl}))
        last = 300 if rope else 130
        out.append(Case(kern, var, dt, 2, 300, n, g, None, extra={"d": dim, "pos": last, "mask": True, "pdl": pdl}))
    return out


def attn_inputs(case: Case, gen: torch.Generator, device: str) -> dict:
    """q ``[B, H, D]``, the caches ``[B, KV, L, D]``, ``pos`` and an additive mask (finfo.min after ``pos`` and on
    the first position of the second sequence), drawn on the CPU and copied as exact-size allocations. ``attn_rope``:
    q, k and v are views of one ``[B, (H + 2 KV) D]`` product (strided rows) and ``cos`` / ``sin`` ``[B, D]`` come
    along in ``packed``."""
    d, g, b, length = case.extra["d"], case.group_size, case.m, case.k
    kv = case.n // (g * d)
    q = torch.randn(b, kv * g, d, generator=gen).to(case.dtype)
    keys = torch.randn(b, kv, length, d, generator=gen).to(case.dtype)
    values = torch.randn(b, kv, length, d, generator=gen).to(case.dtype)
    mask = None
    if case.extra["mask"]:
        mask = torch.zeros(b, 1, 1, length, dtype=case.dtype)
        mask[..., case.extra["pos"] + 1 :] = torch.finfo(case.dtype).min
        mask[1:, ..., 0] = torch.finfo(case.dtype).min
    t = {"keys": keys, "values": values, "pos": torch.tensor([case.extra["pos"]]), "mask": mask}
    if case.kernel == "attn_rope":
        qkv = torch.randn(b, (kv * g + 2 * kv) * d, generator=gen).to(case.dtype)
        ang = torch.rand(b, d // 2, generator=gen) * 6
        t.update(qkv=qkv, cos=torch.cat((ang, ang), -1).cos().to(case.dtype))
        t["sin"] = torch.cat((ang, ang), -1).sin().to(case.dtype)
    packed = {k: v.to(device) for k, v in t.items() if v is not None}
    if case.kernel == "attn_rope":
        q, packed["k"], packed["v"] = packed.pop("qkv").split((kv * g * d, kv * d, kv * d), dim=-1)
        return {"qw": None, "packed": packed, "x_cpu": q.cpu(), "x": q, "bias": None, "bias_cpu": None}
    return {"qw": None, "packed": packed, "x_cpu": q, "x": q.to(device), "bias": None, "bias_cpu": None}


# ---------------------------------------------------------------------------------------- norm + quantization


def normquant_cases() -> list[Case]:
    """The fused RMSNorm + W4A8 quantization (``m`` rows of ``k``; ``n = k``: the launcher returns the dequantized
    activations): the smallest row (K = 8) without a residual; a row one piece longer than the register cache
    (the re-reading tail) with residual and normed outputs; Gemma's ``1 + w`` form with a residual."""
    from quick.kernels import normquant as nq

    tail = 8 * nq.THREADS * 4 + 8
    out: list[Case] = []
    for dt in (torch.float16, torch.bfloat16):
        var = _dt_name(dt)
        for m, k, res, normed, offset in (
            (1, 8, False, False, 0.0),
            (3, tail, True, True, 0.0),
            (5, 640, True, False, 1.0),
        ):
            ex = {"residual": res, "normed": normed, "offset": offset}
            out.append(Case("normquant", var, dt, m, k, k, 0, layout="", extra=ex))
    return out


# ---------------------------------------------------------------------------------------- mixture of experts


def moe_cases() -> list[Case]:
    """The grouped GEMM: per compiled variant (config, dtype, gated) 16 experts, top-4 over 7 tokens routed to 6 of
    them (ten idle experts, ragged runs, dropped slots), K = two of the config's stages, N past a CTA tile, group 64
    (``m`` = slots, ``n`` = output columns; gated: half the weight columns). The decode kernel over experts
    (``moe_dec``): the same routing per variant (dtype, group path, staged activation). The plan kernel: int32 and
    int64 ids with dropped and out-of-range ids (``m`` = 1, ``n`` = the capacity: the launcher returns the sorted ids
    as one row). The route kernel: per variant (dtype, experts per lane) integer-valued logits (ties) over more experts
    than the previous variant takes (its sorted ids as one row)."""
    from quick.kernels import decode as qd
    from quick.kernels import moe as qmoe
    from quick.kernels import moe_sm90
    from quick.nn.moe import plan_capacity

    out: list[Case] = []
    tokens, top_k, experts = 7, 4, 16
    for dt in (torch.float16, torch.bfloat16):
        for cfg in qmoe.CONFIGS.values():
            for act in ("", "silu"):
                n = (cfg.bn + 128) // 2 if act else cfg.bn + 64
                var = f"{cfg.name}/{_dt_name(dt)}" + ("/gated" if act else "")
                ex = {"tokens": tokens, "top_k": top_k, "experts": experts, "config": cfg.name, "act": act}
                ex["block"] = cfg.bm
                out.append(Case("moe", var, dt, tokens * top_k, 2 * cfg.bks, n, 64, layout="quick", extra=ex))
    for _src, d, _archs in qmoe.DEC_VARIANTS:  # the decode kernel over experts: K = 3 k64 steps, N = 2 CTAs
        dt = (torch.float16, torch.bfloat16)[d["QD_DTYPE"]]
        act = {0: "", 1: "silu"}[d.get("QD_ACT", 0)]
        g = 32 if d["QD_G32"] else 64
        lay = qd.LAYOUTS[d["QD_WB"]]
        var = f"dec/{lay}/{_dt_name(dt)}/g{g}" + ("/act" if act else "")
        ex = {"tokens": tokens, "top_k": top_k, "experts": experts, "act": act, "block": 16}
        out.append(Case("moe_dec", var, dt, tokens * top_k, 192, 128, g, layout=lay, extra=ex))
    # the grouped wgmma GEMM: K = 3 k64 steps, N = 3 channel blocks (one half-empty 128-channel tile); rows gathered
    # per token into slot rows, or read in plan order and written in plan order (sorted_ids not read)
    for _src, _name, d in moe_sm90.VARIANTS:
        dt = torch.bfloat16 if d["QS_BF16"] else torch.float16
        g = 32 if d["QS_G32"] else 64
        for order in ("slots", "plan"):
            var = f"wgmma/nt{d['QS_NT']}/{_dt_name(dt)}/g{g}/{order}"
            ex = {"tokens": tokens, "top_k": top_k, "experts": experts, "act": "", "block": d["QS_NT"], "order": order}
            out.append(Case("moe_wgmma", var, dt, tokens * top_k, 192, 192, g, layout="quick_sm90", extra=ex))
    for _src, d, _archs in qmoe.PLAN_VARIANTS:
        idx64 = bool(d["QP_IDX64"])
        cap = plan_capacity(tokens, top_k, experts, 16)
        ex = {"tokens": tokens, "top_k": top_k, "experts": experts, "idx64": idx64, "block": 16}
        out.append(Case("moe_plan", "int64" if idx64 else "int32", torch.float32, 1, 0, cap, 0, layout="", extra=ex))
    for _src, d, _archs in qmoe.ROUTE_VARIANTS:  # the route kernel: E past the previous variant's reach, not 32 * EPL
        dt = (torch.float16, torch.bfloat16)[d["QR_BF16"]]
        e = 32 * d["QR_EPL"] - 24
        cap = plan_capacity(tokens, top_k, e, 16)
        ex = {"tokens": tokens, "top_k": top_k, "experts": e, "block": 16}
        var = f"{_dt_name(dt)}/epl{d['QR_EPL']}"
        out.append(Case("moe_route", var, dt, 1, e, cap, 0, layout="", extra=ex))
    return out


def moe_inputs(case: Case, gen: torch.Generator, device: str) -> dict:
    """Expert ids ``[tokens, top_k]``: distinct experts among the first six, a quarter of the slots dropped (id E);
    for the plan kernel also one id below zero and one past E (both count as dropped). Grouped GEMM: a packed expert
    stack, activations ``[tokens, K]`` (gate/up-like: rows gathered per token) and the routing's static plan, all
    drawn on the CPU and copied as exact-size allocations."""
    from quick.nn.moe import QuickExpertStack, build_plan
    from quick.testing import random_quantized

    t, k, e = case.extra["tokens"], case.extra["top_k"], case.extra["experts"]
    ids = torch.rand(t, 6, generator=gen).argsort(dim=1)[:, :k]
    ids[torch.rand(t, k, generator=gen) < 0.25] = e
    none = {"qw": None, "bias": None, "bias_cpu": None}
    if case.kernel == "moe_route":  # router logits [tokens, E] with a few exact ties
        logits = (torch.randn(t, e, generator=gen) * 2).round().to(case.dtype)
        return {**none, "packed": {}, "x_cpu": logits, "x": logits.to(device)}
    if case.kernel == "moe_plan":
        ids[0, 0], ids[-1, -1] = -3, e + 7
        ids = ids.to(torch.int64 if case.extra["idx64"] else torch.int32)
        return {**none, "packed": {}, "x_cpu": ids, "x": ids.to(device)}
    n = 2 * case.n if case.extra["act"] and case.kernel == "moe" else case.n
    qws = [random_quantized(case.k, n, case.group_size, case.dtype, "cpu", gen) for _ in range(e)]
    packed = QuickExpertStack.from_quantized(qws, case.layout).packed()
    plan = build_plan(ids, e, case.extra["block"], static=True, check=False)
    packed.update(sorted_ids=plan.sorted_ids, block_experts=plan.block_experts, num_padded=plan.num_padded)
    packed = {name: v.contiguous().to(device) for name, v in packed.items()}
    x = torch.randn(t, case.k, generator=gen).to(case.dtype)
    if case.kernel == "moe_dec" and case.extra["act"]:  # the down launch: a [slots, 2K] gate|up product
        x = torch.randn(case.m, 2 * case.k, generator=gen).to(case.dtype)
    if case.kernel == "moe_wgmma" and case.extra["order"] == "plan":  # one input row per plan row
        x = torch.randn(plan.sorted_ids.shape[0], case.k, generator=gen).to(case.dtype)
    return {**none, "qw": qws, "packed": packed, "x_cpu": x, "x": x.to(device)}


# ---------------------------------------------------------------------------------------- other kernels


def registry_entries() -> list:
    """Dispatcher entries from modules other than the explicitly enumerated ones (e.g. W4A8 kernels)."""
    from quick.kernels import dispatch

    kernel_modules_with_variants()  # imports every kernel module, so that each registers its entries
    known = {"quick_mma", "quick_sm90"}
    return [e for e in dispatch.registered() if e.name not in known]


REGISTRY_SHAPES = [(1, 128, 64), (17, 640, 192), (65, 1024, 320), (129, 256, 128)]  # (M, K, N) around tiles


def _takes_widen(fn) -> bool:
    import inspect

    try:
        return "widen" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def registry_cases() -> list[Case]:
    """Per registry entry the shapes above, both dtypes; for kernels that widen per-group weights (layers from the
    quantizers have scales <= 16) the per-group shapes once more as variant ``fold`` (the kernel's other path)."""
    out = []
    for e in registry_entries():
        for dt in (torch.float16, torch.bfloat16):
            for i, (m, k, n) in enumerate(REGISTRY_SHAPES):
                g = (128, -1)[i % 2]  # the group sizes every layout family takes
                kern = f"registry:{e.layout}:{e.name}"
                out.append(Case(kern, "default", dt, m, k, n, g, layout=e.layout))
                if g > 0 and _takes_widen(e.fn):
                    out.append(Case(kern, "fold", dt, m, k, n, g, layout=e.layout))
    return out


def kernel_modules_with_variants() -> dict[str, int]:
    """Every ``quick.kernels`` module that defines ``VARIANTS`` and how many (for coverage reports)."""
    import quick.kernels as pkg

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        name = f"quick.kernels.{info.name}"
        try:
            mod = importlib.import_module(name)
        except Exception:  # an optional module that does not import here (reported by the dispatcher)
            continue
        v = getattr(mod, "VARIANTS", None)
        if isinstance(v, list):
            found[name] = len(v)
    return found


def all_cases(sm90: bool = True) -> list[Case]:
    """Every case, ordered so that each variant's first case comes before any variant's second (a time
    budget that runs out still leaves every variant launched at least once)."""
    groups: dict[tuple, list[Case]] = {}
    cases = mma_cases() + (sm90_cases() if sm90 else []) + dec_cases() + attn_cases() + normquant_cases()
    cases += moe_cases()
    for c in cases + registry_cases():
        groups.setdefault((c.kernel, c.variant, c.dtype), []).append(c)
    ordered = []
    depth = max((len(v) for v in groups.values()), default=0)
    for i in range(depth):
        for v in groups.values():
            if i < len(v):
                ordered.append(v[i])
    return ordered


# ---------------------------------------------------------------------------------------- running (GPU)


def build_module(layout: str, k: int, n: int, group_size: int, dtype: torch.dtype, bias: bool, gen, device: str):
    """A layer of ``layout`` quantized (round-to-nearest) from a random ``nn.Linear``: ``QuickLinear`` for the
    W4A16 layouts, ``QuickLinearW4A8`` for ``w4a8*``. Raises ``ValueError`` for shapes the layer refuses."""
    from torch import nn

    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.02)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    if layout.startswith("w4a8"):
        from quick.nn.linear_w4a8 import QuickLinearW4A8

        mod = QuickLinearW4A8.from_linear(lin, group_size, dtype, pack=True, layout=layout)
    else:
        from quick.nn.linear import QuickLinear

        mod = QuickLinear.from_linear(lin, group_size, layout, dtype=dtype)
    return mod.to(device)


def module_tensors(mod) -> dict[str, torch.Tensor]:
    """The packed tensors a dispatcher entry takes, for either layer class."""
    return mod.packed() if hasattr(mod, "packed") else mod.stored()


def make_inputs(case: Case, gen: torch.Generator, device: str = "cuda") -> dict:
    """Random codes, scales and zero points (or, for registry cases, a random layer of the case's layout),
    activations and bias, drawn on the CPU (no CUDA kernels, so that a sanitizer sees only the kernel under
    test) and copied to ``device`` as exact-size allocations."""
    from quick.formats.layouts import get_layout
    from quick.testing import random_quantized

    if case.kernel in ("attn", "attn_rope"):
        return attn_inputs(case, gen, device)
    if case.kernel in ("moe", "moe_dec", "moe_wgmma", "moe_plan", "moe_route"):
        return moe_inputs(case, gen, device)
    if case.kernel == "normquant":
        x = torch.randn(case.m, case.k, generator=gen).to(case.dtype)
        t = {"weight": (torch.rand(case.k, generator=gen) + 0.5).to(case.dtype)}
        if case.extra["residual"]:
            t["residual"] = torch.randn(case.m, case.k, generator=gen).to(case.dtype)
        packed = {name: v.to(device) for name, v in t.items()}
        return {"qw": None, "packed": packed, "x_cpu": x, "x": x.to(device), "bias": None, "bias_cpu": None}
    act = case.kernel == "dec_fused" and case.extra["act"]
    x = torch.randn(case.m, 2 * case.k if act else case.k, generator=gen).to(case.dtype)
    if case.kernel.startswith("registry:"):
        mod = build_module(case.layout, case.k, case.n, case.group_size, case.dtype, case.bias, gen, device)
        packed = {name: t.contiguous() for name, t in module_tensors(mod).items()}
        b = mod.bias
        return {"qw": None, "module": mod, "packed": packed, "x_cpu": x, "x": x.to(device), "bias": b}
    qw = random_quantized(case.k, case.n, case.group_size, case.dtype, "cpu", gen)
    packed = {name: t.to(device) for name, t in get_layout(case.layout).pack(qw).items()}
    bias = (torch.randn(case.n, generator=gen) * 0.1).to(case.dtype) if case.bias else None
    return {
        "qw": qw,
        "packed": packed,
        "x_cpu": x,
        "x": x.to(device),
        "bias_cpu": bias,
        "bias": None if bias is None else bias.to(device),
    }


def launcher(case: Case) -> Callable[..., torch.Tensor]:
    """``fn(x, packed, bias, out=None) -> out`` for the case's kernel and variant."""
    if case.kernel in ("mma_gemm", "mma_gemv", "sm90"):
        from quick.kernels import mma as qm
        from quick.kernels import wgmma as qs

        run = {"mma_gemm": qm.gemm, "mma_gemv": qm.gemv, "sm90": qs.gemm_w4a16_sm90}[case.kernel]

        def fn(x, p, bias, out=None):
            return run(
                x, p["qweight"], p["scales"], p["zeros"], case.group_size, bias, config=case.config,
                splits=case.splits, out=out,
            )  # fmt: skip

        return fn
    if case.kernel == "dec":
        from quick.kernels import decode as qd

        def fn(x, p, bias, out=None):
            return qd.gemv(
                case.layout, x, p["qweight"], p["scales"], p["zeros"], case.group_size, bias, config=case.config,
                splits=case.splits, out=out,
            )  # fmt: skip

        return fn
    if case.kernel == "dec_fused":  # the inputs' validation is the ops'; this launches the variant itself
        from quick.kernels import decode as qd

        def fn(x, p, bias, out=None):
            act, n = case.extra["act"], p["scales"].shape[1]
            m, k = x.shape[0], x.shape[1] // 2 if act else x.shape[1]
            norm = None
            if case.extra["norm"]:  # r into out, RMSNorm(r) into a second [M, N] output
                resid = (torch.arange(m * n, device=x.device) % 7 - 3).to(x.dtype).view(m, n)
                weight = torch.linspace(0.5, 1.5, n, device=x.device).to(x.dtype)
                norm = (resid, weight, 1e-6, 0.0, torch.empty_like(resid))
            return qd.run_validated(
                case.layout, x, p["qweight"], p["scales"], p["zeros"], bias, m, n, k, case.group_size, case.config,
                case.splits, out, act, norm, bool(case.extra["pdl"]),
            )  # fmt: skip

        return fn
    if case.kernel in ("attn", "attn_rope"):
        from quick.kernels import attention as at

        def fn(x, p, bias, out=None):
            scale, mask = case.extra["d"] ** -0.5, p.get("mask")
            if case.kernel == "attn_rope":
                args = (x, p["k"], p["v"], p["keys"], p["values"], p["pos"], p["cos"], p["sin"], mask, scale)
                return at.decode_attention_rope(*args, splits=case.splits, out=out, pdl=case.extra["pdl"])
            o = at.decode_attention(x, p["keys"], p["values"], p["pos"], mask, scale, splits=case.splits, out=out)
            return o.reshape(x.shape[0], -1)

        return fn
    if case.kernel == "normquant":
        from quick.kernels import normquant as nq

        def fn(x, p, bias, out=None):
            ex = case.extra
            r = nq.rms_norm_quant_cuda(x, p["weight"], 1e-6, ex["offset"], p.get("residual"), ex["normed"])
            y = r.xq.float() * r.sx[:, None]  # [M, K]: what the GEMM reads, dequantized
            return out.copy_(y) if out is not None else y

        return fn
    if case.kernel == "moe":
        from quick.kernels import moe as qmoe

        def fn(x, p, bias, out=None):
            ex = case.extra
            y = qmoe.grouped_gemm(
                x, p["qweight"], p["scales"], p["zeros"], case.group_size, p["sorted_ids"], p["block_experts"],
                p["num_padded"], ex["top_k"], None, ex["act"], config=ex["config"],
            )  # fmt: skip
            return out.copy_(y) if out is not None else y

        return fn
    if case.kernel == "moe_dec":
        from quick.kernels import moe as qmoe

        def fn(x, p, bias, out=None):
            ex = case.extra
            gdiv = 1 if ex["act"] else ex["top_k"]
            args = (x, p["qweight"], p["scales"], p["zeros"], case.group_size, p["sorted_ids"], p["block_experts"])
            qmoe.validate_dec(*args, p["num_padded"], gdiv, ex["tokens"], None, ex["act"], layout=case.layout)
            y = qmoe.dec_grouped(*args, p["num_padded"], gdiv, ex["tokens"], None, ex["act"], layout=case.layout)
            return out.copy_(y) if out is not None else y

        return fn
    if case.kernel == "moe_wgmma":
        from quick.kernels import moe_sm90

        def fn(x, p, bias, out=None):
            ex = case.extra
            args = (x, p["qweight"], p["scales"], p["zeros"], case.group_size, p["sorted_ids"], p["block_experts"],
                    p["num_padded"])  # fmt: skip
            if ex["order"] == "plan":
                y = moe_sm90.grouped_gemm_sm90(*args, 1, None, ex["tokens"] * ex["top_k"], True, True)
            else:
                y = moe_sm90.grouped_gemm_sm90(*args, ex["top_k"])
            return out.copy_(y) if out is not None else y

        return fn
    if case.kernel == "moe_plan":
        from quick.kernels import moe as qmoe

        def fn(x, p, bias, out=None):
            y = qmoe.plan(x, case.extra["experts"], case.extra["block"], case.n)[0].float().view(1, -1)
            return out.copy_(y) if out is not None else y

        return fn
    if case.kernel == "moe_route":
        from quick.kernels import moe as qmoe

        def fn(x, p, bias, out=None):
            ex = case.extra
            y = qmoe.route(x, ex["top_k"], True, True, ex["block"], case.n)[2].float().view(1, -1)
            return out.copy_(y) if out is not None else y

        return fn
    if case.kernel.startswith("registry:"):
        _, layout, name = case.kernel.split(":", 2)
        from quick.kernels import dispatch

        entry = next(e for e in dispatch.registered(layout) if e.name == name)
        takes_widen = _takes_widen(entry.fn)

        def fn(x, p, bias, out=None):
            kw = {}
            if takes_widen:  # what the layer would pass (scales <= 16 widen); variant "fold" forces the fold
                from quick.formats.w4a8 import widens_to_int8

                kw["widen"] = case.variant != "fold" and widens_to_int8(p.get("group_scale"))
            y = entry.fn(x, p, case.group_size, **kw)
            y = y + bias.to(y.dtype) if bias is not None else y
            if out is not None:
                out.copy_(y)
                return out
            return y

        return fn
    raise ValueError(f"unknown kernel {case.kernel}")


def available(case: Case) -> bool:
    """Whether this GPU can run the case (sm90 cases need compute capability 9.0)."""
    if not torch.cuda.is_available():
        return False
    if case.kernel in ("sm90", "moe_wgmma"):
        from quick.kernels import wgmma as qs

        return qs.is_available()
    if case.kernel.startswith("registry:"):
        _, layout, name = case.kernel.split(":", 2)
        from quick.kernels import dispatch

        probe = torch.empty((case.m, case.k), dtype=case.dtype, device="cuda")
        return any(e.name == name and e.available(probe) for e in dispatch.registered(layout))
    return torch.cuda.get_device_capability()[0] >= 8


def moe_compile_jobs(arch: str) -> list[tuple[str, str, dict]]:
    """The MoE module's variants as its launchers build them (the decode kernel's grouped variant arch-specific)."""
    from quick.kernels import decode as qd
    from quick.kernels import moe as qmoe
    from quick.kernels import moe_sm90

    specific = "sm_90a" if arch.startswith("sm_90") else arch
    jobs = [(src, specific if src == qd.SOURCE else arch, d) for src, d, _ in qmoe.VARIANTS]
    if arch.startswith("sm_90"):
        jobs += [(src, "sm_90a", d) for src, _k, d in moe_sm90.VARIANTS]
    return jobs


def compile_jobs(arch: str) -> list[tuple[str, str, dict]]:
    """Every (source, arch, defines) the explicit cases launch on this device (for a parallel precompile)."""
    from quick.kernels import attention as at
    from quick.kernels import decode as qd
    from quick.kernels import mma as qm
    from quick.kernels import normquant as nq
    from quick.kernels import wgmma as qs

    jobs = [(src, arch, d) for src, d, _ in qm.VARIANTS]
    jobs += [(src, arch, d) for src, _k, d in at.VARIANTS]
    jobs += [(src, "sm_90a" if arch.startswith("sm_90") else arch, d) for src, _k, d in qd.VARIANTS]
    jobs += [(src, arch, d) for src, d, _ in nq.VARIANTS]
    jobs += moe_compile_jobs(arch)
    if arch.startswith("sm_90"):
        jobs += [(qs.SOURCE, "sm_90a", d) for _s, _k, d in qs.VARIANTS]
    return jobs
