"""Seeded, bounded differential fuzzer of every GPU kernel against a float64 reference, plus determinism.

Each case draws a kernel path (mma.sync GEMM with a random compiled config and forced split-k, the GEMV, the
automatic choice, the torch.library op on 3-D input, ``QuickLinear`` for each packed layout with contiguous,
strided or misaligned activations, the sm_90 kernel with a random compiled config / pipeline / split-k, and
every other dispatcher entry, the grouped expert GEMM or the decode kernel over experts with the one-launch plan),
then (M, K, N, group size, dtype, bias) and a value regime:

* ``normal``      x ~ N(0, 1), typical scales;
* ``wide``        scales log-uniform over five decades, zero points at the code extremes;
* ``tiny``        scales near the bottom of fp16 (dequantized weights subnormal in fp16);
* ``big``         activations up to the dtype's extremes (fp16: 65504) so that fp16 outputs overflow;
* ``const``       every code equal to its zero point (the weight is exactly zero: output = bias, exactly);
* ``nonfinite``   NaN and inf planted in x rows and in one scale.

What is correct: the reference is ``x @ W`` in float64 with W dequantized and rounded to x's dtype (the
kernels' documented semantics: weights are dequantized in the activation type), plus bias. Where the
reference is finite and at most 0.99 x the dtype's max, the relative Frobenius error over those elements must
be within ``quick.testing.REL_BOUND`` (plus an absolute floor of the dtype's subnormal spacing); where the
finite reference exceeds 1.01 x max the output must be inf of the same sign; where the reference is NaN the
output must be NaN and where it is +-inf the same inf. Every output element is poisoned (NaN) first.
Every case runs twice into fresh buffers and the two outputs must be bitwise equal (determinism). The automatic
paths take the measured table's or the model's choice: ``QUICK_AUTOTUNE`` defaults to ``0`` here (timing candidates
for every random shape would spend the budget and fill the user's autotune cache with them; ``QUICK_AUTOTUNE=1``
fuzzes the timed choices instead).

    python scripts/fuzz_gpu.py --budget 120 --out $OUT        # writes $OUT/fuzz_gpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from quick.formats.layouts import get_layout  # noqa: E402
from quick.formats.weights import QuantizedWeight  # noqa: E402
from quick.kernels import select  # noqa: E402
from quick.testing import REL_BOUND  # noqa: E402

REGIMES = ("normal", "normal", "wide", "tiny", "big", "const", "nonfinite")
OTHER_KERNEL_BOUND = 2e-2  # other layer families vs their own reference backend (rounded to x's dtype)
DEV = "cuda"  # --cpu-selftest runs the checker on the CPU reference path (no GPU needed)
BUILTIN = ("mma_gemm", "mma_gemv", "mma_auto", "op", "sm90", "linear:quick", "linear:quick_sm90")
M_CHOICES = [0, 1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 300, 513]


def _finfo(dt: torch.dtype):
    return torch.finfo(dt)


# ------------------------------------------------------------------------------------------ case drawing


def draw_case(rng: random.Random, paths: list[str], sm90_cfgs: list) -> dict:
    from quick.kernels import mma as qm

    path = rng.choice(paths)
    dt = rng.choice([torch.float16, torch.bfloat16])
    g = rng.choice([32, 64, 128, 128, -1])
    m = rng.choice(M_CHOICES) if rng.random() < 0.8 else rng.randint(1, 700)
    if path == "mma_gemv":
        m = rng.randint(1, qm.GEMV_MAX_M)
    n = 64 * rng.choice([1, 2, 3, 4, 5, 7, 8, 12, 16, 24])
    step = math.lcm(64, g if g > 0 else 64)
    k = step * rng.randint(1, max(1, 3072 // step))
    case = {"path": path, "dtype": dt, "m": m, "k": k, "n": n, "g": g, "bias": rng.random() < 0.4}
    case["regime"] = rng.choice(REGIMES)
    case["splits"] = None
    if path not in BUILTIN:  # other layer families (e.g. W4A8): their group sizes, K % 128, plain values
        case["g"] = rng.choice([128, -1])
        case["k"] = 128 * rng.randint(1, 24)
        case["regime"] = rng.choice(["normal", "big"])
    if path == "mma_gemm":
        cfgs = [c for c in qm.GEMM_CONFIGS.values() if k % c.bks == 0]
        case["config"] = rng.choice(cfgs).name
        case["splits"] = rng.choice([None, 1, 2, 3, 4, 7, 16])
    elif path == "mma_gemv":
        case["splits"] = rng.choice([None, 1, 2, 3, 8])
    elif path == "sm90":
        gcls = 32 if g == 32 else 128
        cands = [c for c in sm90_cfgs if c[2] == gcls and c[3] == dt]
        case["config"] = rng.choice(cands)[1]
        case["splits"] = rng.choice([None, 1, 2, 3, 5, 32])
    elif path.startswith("linear:"):
        case["x_form"] = rng.choice(["contiguous", "strided", "misaligned", "3d"])
    elif path == "op":
        case["x_form"] = "3d"
    return case


def case_repr(c: dict) -> dict:
    out = {k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v) for k, v in c.items()}
    if "config" in c and not isinstance(c["config"], str | None):
        out["config"] = repr(c["config"])
    return out


# ------------------------------------------------------------------------------------------ inputs


def make_weights(c: dict, gen: torch.Generator) -> QuantizedWeight:
    k, n, dt = c["k"], c["n"], c["dtype"]
    gs = k if c["g"] == -1 else c["g"]
    ng = k // gs
    dev = DEV
    q = torch.randint(0, 16, (k, n), generator=gen, device=dev, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (ng, n), generator=gen, device=dev, dtype=torch.uint8)
    u = torch.rand(ng, n, generator=gen, device=dev)
    regime = c["regime"]
    if regime == "wide":
        scales = 10 ** (u * 5 - 4)  # 1e-4 .. 10
        zeros = torch.where(torch.rand(ng, n, generator=gen, device=dev) < 0.5, 0, 15).to(torch.uint8)
    elif regime == "tiny":
        # fp16: dequantized weights down in the subnormal range; bf16: near its smallest normals
        scales = 10 ** (u * 3 - 8) if dt == torch.float16 else 10 ** (u * 3 - 35)
    elif regime == "big":
        scales = (u * 0.75 + 0.25) * (0.2 / 8)  # with x near the dtype's max: some fp16 outputs overflow
    else:
        scales = (u * 0.75 + 0.25) * (0.02 / 8)
    if regime == "const":
        q = zeros.repeat_interleave(gs, dim=0).clone()
    scales = scales.to(dt)
    if dt == torch.float16 and regime == "tiny":
        scales = torch.where(scales == 0, torch.tensor(2.0**-24, dtype=dt, device=dev), scales)
    if regime == "nonfinite":
        scales[rng_index(gen, ng), rng_index(gen, n)] = float("nan")
    return QuantizedWeight(q, scales, zeros, c["g"])


def rng_index(gen: torch.Generator, n: int) -> int:
    return int(torch.randint(0, n, (1,), generator=gen, device=DEV).item())


def make_x(c: dict, gen: torch.Generator) -> torch.Tensor:
    m, k, dt = c["m"], c["k"], c["dtype"]
    x = torch.randn(m, k, generator=gen, device=DEV)
    if c["regime"] == "big" and m:
        top = 65504.0 if dt == torch.float16 else 1e30
        x = x * (top / 8)
        sel = torch.rand(m, k, generator=gen, device=DEV) < 0.05
        x = torch.where(sel, torch.sign(x) * top, x).clamp(-top, top)
    x = x.to(dt)
    if c["regime"] == "nonfinite" and m:
        x[rng_index(gen, m), rng_index(gen, k)] = float("nan")
        if m > 1:
            x[rng_index(gen, m), rng_index(gen, k)] = float("inf") if rng_index(gen, 2) else float("-inf")
    return x


def reference(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """float64 x @ W with W dequantized in float64 then rounded to x's dtype (the kernels' semantics)."""
    w = qw.dequantize(torch.float64).to(x.dtype).to(torch.float64)
    ref = x.to(torch.float64) @ w
    if bias is not None:
        ref = ref + bias.to(torch.float64)
    return ref


# ------------------------------------------------------------------------------------------ running


def run_path(c: dict, x: torch.Tensor, qw: QuantizedWeight, bias, packed_cache: dict) -> torch.Tensor:
    """Run the case's kernel path once into a fresh NaN-poisoned output where the path takes one."""
    from quick.kernels import mma as qm

    path, g, dt = c["path"], c["g"], c["dtype"]
    m, n = x.shape[0], qw.shape[1]

    def packed(layout: str) -> dict:
        if layout not in packed_cache:
            packed_cache[layout] = get_layout(layout).pack(qw)
        return packed_cache[layout]

    if path in ("mma_gemm", "mma_gemv", "mma_auto"):
        p = packed("quick")
        out = torch.full((m, n), float("nan"), dtype=dt, device=DEV)
        args = (x, p["qweight"], p["scales"], p["zeros"], g, bias)
        if path == "mma_gemm":
            return qm.gemm(*args, config=c["config"], splits=c["splits"], out=out)
        if path == "mma_gemv":
            return qm.gemv(*args, splits=c["splits"], out=out)
        return select.matmul("quick", *args, out=out)
    if path == "sm90":
        from quick.kernels import wgmma as qs

        p = packed("quick_sm90")
        out = torch.full((m, n), float("nan"), dtype=dt, device=DEV)
        return qs.gemm_w4a16_sm90(
            x, p["qweight"], p["scales"], p["zeros"], g, bias, config=c["config"], splits=c["splits"], out=out
        )
    if path == "op":
        from quick.kernels import ops  # noqa: F401  (registers the op)

        p = packed("quick")
        x3 = x.unsqueeze(0)
        y = torch.ops.quick.gemm_w4a16(x3, p["qweight"], p["scales"], p["zeros"], g, bias)
        return y.reshape(m, n)
    if path.startswith("linear:") or path.startswith("registry:"):
        if path.startswith("linear:"):
            layout = path.split(":", 1)[1]
            from quick.nn.linear import QuickLinear

            mod = packed_cache.get(("mod", layout))
            if mod is None:
                mod = QuickLinear.from_quantized(qw, bias, layout)
                packed_cache[("mod", layout)] = mod
            form = c.get("x_form", "contiguous")
            xin = x
            if form == "strided" and m:
                buf = torch.full((m, x.shape[1] + 8), float("nan"), dtype=dt, device=DEV)
                buf[:, 8:] = x
                xin = buf[:, 8:]
            elif form == "misaligned" and m:
                buf = torch.empty(m * x.shape[1] + 1, dtype=dt, device=DEV)
                xin = buf[1:].view(m, -1)
                xin.copy_(x)
            elif form == "3d":
                xin = x.unsqueeze(0)
            return mod(xin).reshape(m, n)
        _, layout, name = path.split(":", 2)
        from quick.kernels import dispatch

        entry = next(e for e in dispatch.registered(layout) if e.name == name)
        y = entry.fn(x, packed(layout), g)
        return y + bias if bias is not None else y
    raise ValueError(path)


def check(c: dict, out: torch.Tensor, ref: torch.Tensor, bound: float) -> tuple[bool, str, float]:
    """The correctness definition of the module docstring; returns (ok, reason, error)."""
    dt = c["dtype"]
    if tuple(out.shape) != tuple(ref.shape):
        return False, f"shape {tuple(out.shape)} != {tuple(ref.shape)}", math.inf
    if out.numel() == 0:
        return True, "", 0.0
    o = out.to(torch.float64)
    top = _finfo(dt).max
    ref_nan, ref_inf = torch.isnan(ref), torch.isinf(ref)
    if (ref_nan & ~torch.isnan(o)).any():
        return False, f"{int((ref_nan & ~torch.isnan(o)).sum())} elements should be NaN", math.inf
    if (ref_inf & (o != ref)).any():
        return False, f"{int((ref_inf & (o != ref)).sum())} elements should be inf like the reference", math.inf
    finite = torch.isfinite(ref)
    over = finite & (ref.abs() > 1.01 * top)
    if over.any():
        want = torch.sign(ref[over]) * math.inf
        if not torch.equal(o[over], want):
            return False, f"{int(over.sum())} overflowing elements: not all inf with the reference's sign", math.inf
    inr = finite & (ref.abs() <= 0.99 * top)
    if not inr.any():
        return True, "", 0.0
    oi, ri = o[inr], ref[inr]
    if not torch.isfinite(oi).all():
        return False, f"{int((~torch.isfinite(oi)).sum())} non-finite outputs where the reference is in range", math.inf
    diff = (oi - ri).norm().item()
    floor = _finfo(dt).smallest_normal * 2.0 ** -(_finfo(dt).bits - 6) * math.sqrt(oi.numel())
    denom = ri.norm().item()
    err = diff / max(denom, 1e-300)
    if c["regime"] == "const" and not torch.equal(oi, ri):
        return False, "zero weight: output must equal the bias exactly", err
    if diff > bound * denom + floor:
        return False, f"relative error {err:.3e} > bound {bound:.1e}", err
    return True, "", err


def run_other(c: dict, gen, case_seed: int, st: dict, failures: list, skipped: dict, max_err: dict) -> int:
    """A dispatcher entry of another layer family (or its layer): kernel vs the layer's reference backend.
    Returns 1 when the case ran, 0 when the layer refused the shape (counted under ``skipped_unsupported``)."""
    from quick.kernels import dispatch
    from quick.testing import kernel_cases as vc

    key, dt = c["path"], c["dtype"]
    layout = key.split(":")[1]
    cpu_gen = torch.Generator().manual_seed(case_seed)
    try:
        mod = vc.build_module(layout, c["k"], c["n"], c["g"], dt, c["bias"], cpu_gen, DEV)
    except (ValueError, TypeError, NotImplementedError) as e:
        skipped[key] = skipped.get(key, 0) + 1
        skipped.setdefault("_examples", {}).setdefault(key, f"{type(e).__name__}: {e}"[:200])
        return 0
    x = make_x(c, gen)
    st["cases"] += 1
    try:
        if key.startswith("registry:"):
            entry = next(e for e in dispatch.registered(layout) if e.name == key.split(":", 2)[2])
            tensors = vc.module_tensors(mod)

            def run():
                y = entry.fn(x, tensors, c["g"])
                return y + mod.bias.to(y.dtype) if mod.bias is not None else y

        else:
            mod.backend = "auto"

            def run():
                return mod(x)

        out1, out2 = run(), run()
        mod.backend = "reference"
        ref = mod(x).to(torch.float64)
        if DEV == "cuda":
            torch.cuda.synchronize()
    except Exception as e:
        st["failures"] += 1
        failures.append({"case": case_repr(c), "seed": case_seed, "error": f"{type(e).__name__}: {e}"[:600]})
        return 1
    ok, why, err = check(c, out1, ref, OTHER_KERNEL_BOUND)
    dkey = f"{key}/{dt}".replace("torch.", "")
    if math.isfinite(err):
        max_err[dkey] = max(max_err.get(dkey, 0.0), err)
    det = bitwise_equal(out1, out2)
    if not det:
        st["nondeterministic"] += 1
    if not ok or not det:
        st["failures"] += 1
        failures.append({"case": case_repr(c), "seed": case_seed, "error": why or "outputs of two runs differ"})
    return 1


def run_moe(rng: random.Random, case_seed: int, st: dict, failures: list, max_err: dict) -> int:
    """The grouped expert GEMM on a random routing (experts, top-k, tokens, K, N, group, dtype, row tile, compiled
    config, gated or not, routing weights or not, idle experts, dropped slots) against float64 per slot, rows no
    slot names must stay zero; the one-launch plan against the PyTorch plan, element for element; and the route
    kernel on random logits (ties included) against the float64 softmax top-k, its plan against the PyTorch plan."""
    import torch.nn.functional as F

    from quick.kernels import moe as qmoe
    from quick.kernels import moe_sm90, wgmma
    from quick.nn.moe import QuickExpertStack, build_plan, plan_capacity, routing_facts, static_plan
    from quick.testing import random_quantized, rel_error, route_errors

    dt = rng.choice((torch.float16, torch.bfloat16))
    e = rng.choice((1, 2, 4, 8, 16, 33, 64, 128))
    top_k = rng.randint(1, min(8, e))
    t = rng.choice((1, 2, 3, 5, 8, 16, 17, 40, 64))
    act = rng.choice(("", "silu"))
    k = 64 * rng.choice((1, 2, 3, 4, 6, 8, 16))
    n = (128 if act else 64) * rng.randint(1, 6)
    g = rng.choice([x for x in (32, 64, 128, -1) if x < 0 or k % x == 0])
    # stacks in the quick_sm90 layout half the time where its Hopper kernels run (their own plan block sizes)
    layout = "quick_sm90" if wgmma.is_available(torch.device(DEV)) and rng.random() < 0.5 else "quick"
    if layout == "quick":  # the grouped mma GEMM: one of its compiled configs for this row tile
        block = rng.choice(qmoe.BLOCK_SIZES)
        cfgs = qmoe.configs_for(block, k)
        if not cfgs:
            return 0
        config = rng.choice(cfgs).name
    else:  # the grouped wgmma GEMM: one variant per row tile
        block = rng.choice([b for b in qmoe.SM90_BLOCK_SIZES if g != 32 or b <= qmoe.SM90_G32_MAX_BLOCK])
        config = f"wgmma nt{block}"
    c = {"path": "moe", "dtype": str(dt), "e": e, "top_k": top_k, "t": t, "k": k, "n": n, "g": g, "block": block,
         "act": act, "layout": layout, "config": config}  # fmt: skip
    gen = torch.Generator().manual_seed(case_seed)
    used = rng.randint(1, e)
    ids = torch.stack([torch.randperm(used, generator=gen)[:top_k] if top_k <= used
                       else torch.randint(0, used, (top_k,), generator=gen) for _ in range(t)])  # fmt: skip
    ids[torch.rand(t, top_k, generator=gen) < rng.choice((0.0, 0.0, 0.2))] = e
    st["cases"] += 1
    try:
        qws = [random_quantized(k, n, g, dt, "cpu", gen) for _ in range(e)]
        stack = QuickExpertStack.from_quantized(qws, layout).to(DEV)
        x = torch.randn(t, k, generator=gen).to(dt)
        xd, idsd = x.to(DEV), ids.to(DEV)
        tw = torch.rand(t * top_k, generator=gen) if rng.random() < 0.5 else None
        twd = None if tw is None else tw.to(DEV)
        plan = static_plan(idsd, e, block)
        want = build_plan(idsd, e, block, static=True, check=False)
        for name in ("sorted_ids", "block_experts", "offsets", "counts", "num_padded"):
            if not torch.equal(getattr(plan, name), getattr(want, name)):
                raise AssertionError(f"plan kernel differs from the PyTorch plan in {name}")
        # the route kernel on random logits of this shape (integer-valued half the time: many ties)
        logits = torch.randn(t, e, generator=gen) * rng.choice((0.5, 3.0))
        logits = (logits.round() if rng.random() < 0.5 else logits).to(dt).to(DEV)
        cap = plan_capacity(t, top_k, e, block)
        if qmoe.route_unavailable(logits, top_k, block, cap) is None:
            renorm, rnd = rng.random() < 0.5, rng.random() < 0.5
            r_ids, r_w, *r_plan = qmoe.route(logits, top_k, renorm, rnd, block, cap)
            why = route_errors(logits, top_k, renorm, rnd, r_ids, r_w)
            if why:
                raise AssertionError(f"route kernel: {why}")
            r_want = build_plan(r_ids, e, block, static=True, check=False)
            names = ("sorted_ids", "block_experts", "offsets", "counts", "num_padded")
            for name, got in zip(names, r_plan, strict=True):
                if not torch.equal(got, getattr(r_want, name)):
                    raise AssertionError(f"route kernel's plan differs from the PyTorch plan in {name}")
            st["route"] = st.get("route", 0) + 1
        p = stack.packed()
        args = (xd, p["qweight"], p["scales"], p["zeros"], g, plan.sorted_ids, plan.block_experts, plan.num_padded)
        # plain products at 16-row plans run on the decode kernel's grouped variant half of the time
        use_dec = not act and rng.random() < 0.5
        # rows per expert: the tokens, unless a token names an expert twice (then up to every slot)
        rows = t if routing_facts(ids, e)[2] else t * top_k
        gg = k if g < 0 else g
        use_dec = use_dec and qmoe.dec_unavailable(rows, k, n, gg, block, "", dt, xd.device, layout=layout) is None
        c["kernel"] = "dec" if use_dec else ("wgmma" if layout == "quick_sm90" else "mma")
        if use_dec:
            qmoe.validate_dec(*args, top_k, rows, twd, layout=layout)
            out1, out2 = (qmoe.dec_grouped(*args, top_k, rows, twd, layout=layout) for _ in range(2))
        elif layout == "quick_sm90":
            if act:  # the plain product, then act(gate) * up (times the slot weights) as the expert MLP does
                out1, out2 = (qmoe.gated(moe_sm90.grouped_gemm_sm90(*args, top_k), act, twd) for _ in range(2))
            elif rng.random() < 0.5:  # the same rows read in plan order (as the down product reads them)
                c["plan_rows_in"] = True
                xp = moe_sm90.gather_rows(xd, plan.sorted_ids, top_k)
                pargs = (xp, *args[1:])
                out1, out2 = (moe_sm90.grouped_gemm_sm90(*pargs, 1, twd, t * top_k, True) for _ in range(2))
            else:
                out1, out2 = (moe_sm90.grouped_gemm_sm90(*args, top_k, twd) for _ in range(2))
        else:
            out1 = qmoe.grouped_gemm(*args, top_k, twd, act, config=config)
            out2 = qmoe.grouped_gemm(*args, top_k, twd, act, config=config)
        torch.cuda.synchronize()
    except Exception as err:
        st["failures"] += 1
        failures.append({"case": c, "seed": case_seed, "error": f"{type(err).__name__}: {err}"[:600]})
        return 1
    flat = ids.reshape(-1)
    w = [qw.dequantize(torch.float64) for qw in qws]
    no = n // 2 if act else n
    ref = torch.zeros(flat.numel(), no, dtype=torch.float64)
    for s_, ex in enumerate(flat.tolist()):
        if ex < e:
            y = x[s_ // top_k].double() @ w[ex]
            y = F.silu(y[:no]) * y[no:] if act else y
            ref[s_] = y * (float(tw[s_]) if tw is not None else 1.0)
    out = out1.cpu()
    routed = flat < e
    why = ""
    if not torch.isfinite(out).all():
        why = "NaN/inf in the output"
    elif (out[~routed] != 0).any():
        why = "a row no slot names was written"
    elif routed.any():
        err = rel_error(out[routed], ref[routed])
        key = f"moe_{c['kernel']}/{dt}".replace("torch.", "")
        max_err[key] = max(max_err.get(key, 0.0), err)
        if err > REL_BOUND[dt]:
            why = f"relative error {err:.3e} over {REL_BOUND[dt]}"
    if not why and not bitwise_equal(out1, out2):
        st["nondeterministic"] += 1
        why = "outputs of two runs differ"
    if why:
        st["failures"] += 1
        failures.append({"case": c, "seed": case_seed, "error": why})
    return 1


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.int16), b.contiguous().view(torch.int16))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=120.0, help="seconds of fuzzing (compile excluded)")
    ap.add_argument("--max-cases", type=int, default=100000)
    ap.add_argument("--seed", type=int, default=20261123)
    ap.add_argument("--out", default=os.environ.get("OUT", "fuzz_out"))
    ap.add_argument("--paths", default="", help="only these paths, comma-separated prefixes (e.g. moe,sm90)")
    ap.add_argument(
        "--cpu-selftest", action="store_true", help="check the checker: QuickLinear's CPU reference path, no GPU"
    )
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    global DEV
    if args.cpu_selftest:
        DEV = "cpu"
    elif not torch.cuda.is_available():
        print("no CUDA device")
        (out_dir / "fuzz_gpu.json").write_text(json.dumps({"error": "no CUDA device"}))
        return 2

    from quick.kernels import dispatch, jit
    from quick.kernels import wgmma as qs
    from quick.testing import kernel_cases as vc

    t0 = time.time()
    if DEV == "cuda" and not args.paths:  # a run restricted to some paths builds what it launches, at first use
        jit.compile_many(vc.compile_jobs(jit.arch_for_device()), workers=os.cpu_count())
    compile_s = time.time() - t0

    paths = ["mma_gemm", "mma_gemm", "mma_gemv", "mma_auto", "op", "linear:quick", "linear:quick_sm90"]
    if DEV == "cpu":
        paths = ["linear:quick", "linear:quick_sm90", "linear:w4a8"]  # w4a8: plumbing only (reference both ways)
    sm90_cfgs = []
    if DEV == "cuda" and qs.is_available():
        paths += ["sm90", "sm90"]
        sm90_cfgs = [(d, cfg, g, dt) for d, cfg, g, dt in vc.sm90_variant_configs()]
    if DEV == "cuda":
        from quick.kernels import moe as qmoe

        if qmoe.is_available(torch.device(DEV)):
            paths.append("moe")
    others = vc.registry_entries() if DEV == "cuda" else []
    paths += [f"registry:{e.layout}:{e.name}" for e in others]
    for lay in sorted({e.layout for e in others}):
        if f"linear:{lay}" not in paths:
            paths.append(f"linear:{lay}")

    if args.paths:
        keep = tuple(p for p in args.paths.split(",") if p)
        paths = [p for p in paths if p.startswith(keep)]
        if not paths:
            print(f"no fuzzing path starts with {args.paths!r} on this device")
            return 2
    rng = random.Random(args.seed)
    stats: dict = {}
    failures: list = []
    skipped: dict = {}
    n_cases = n_det = n_nonfinite = 0
    max_err: dict = {}
    t_start = time.time()
    while n_cases < args.max_cases and time.time() - t_start < args.budget:
        c = draw_case(rng, paths, sm90_cfgs)
        case_seed = rng.randrange(1 << 62)
        gen = torch.Generator(device=DEV).manual_seed(case_seed)
        key = c["path"]
        st = stats.setdefault(key, {"cases": 0, "failures": 0, "nondeterministic": 0})
        if key == "moe":
            n_cases += run_moe(rng, case_seed, st, failures, max_err)
            continue
        if key not in BUILTIN:
            n_cases += run_other(c, gen, case_seed, st, failures, skipped, max_err)
            continue
        try:
            qw = make_weights(c, gen)
            x = make_x(c, gen)
            bias = (torch.randn(c["n"], generator=gen, device=DEV) * 0.1).to(c["dtype"]) if c["bias"] else None
            ref = reference(x, qw, bias)
            cache: dict = {}
            try:
                out1 = run_path(c, x, qw, bias, cache)
                out2 = run_path(c, x, qw, bias, cache)
            except (ValueError, TypeError, NotImplementedError):
                raise
            if DEV == "cuda":
                torch.cuda.synchronize()
        except Exception as e:
            st["cases"] += 1
            st["failures"] += 1
            n_cases += 1
            failures.append({"case": case_repr(c), "seed": case_seed, "error": f"{type(e).__name__}: {e}"[:600]})
            if "illegal" in str(e).lower() or "CUDA error" in str(e):
                failures[-1]["trace"] = traceback.format_exc()[-2000:]
                break  # the context is gone: stop here and report
            continue
        n_cases += 1
        st["cases"] += 1
        if c["regime"] == "nonfinite":
            n_nonfinite += 1
        bound = REL_BOUND[c["dtype"]]
        ok, why, err = check(c, out1, ref, bound)
        dkey = f"{key}/{c['dtype']}".replace("torch.", "")
        if math.isfinite(err):
            max_err[dkey] = max(max_err.get(dkey, 0.0), err)
        det = bitwise_equal(out1, out2)
        n_det += 1
        if not det:
            st["nondeterministic"] += 1
        if not ok or not det:
            st["failures"] += 1
            failures.append({"case": case_repr(c), "seed": case_seed, "error": why or "outputs of two runs differ"})
    elapsed = time.time() - t_start
    result = {
        "seed": args.seed,
        "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (self-test of the checker)",
        "cases": n_cases,
        "failures": len(failures),
        "determinism_checks": n_det,
        "nonfinite_cases": n_nonfinite,
        "per_path": stats,
        "skipped_unsupported": skipped,
        "max_rel_error": max_err,
        "fuzz_s": round(elapsed, 1),
        "compile_s": round(compile_s, 1),
        "registry_entries": [f"{e.layout}:{e.name}" for e in dispatch.registered()],
        "failure_details": failures[:50],
    }
    (out_dir / "fuzz_gpu.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "failure_details"}, indent=1))
    for f in failures[:10]:
        print("FAIL", json.dumps(f)[:800])
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("QUICK_AUTOTUNE", "0")  # read at call time by quick.settings (module docstring: why)
    sys.exit(main())
