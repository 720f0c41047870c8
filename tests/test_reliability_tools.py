"""CPU checks of the reliability tooling: the sanitizer/fuzzer case tables cover every compiled kernel variant,
and the fuzzer's correctness check fails on wrong outputs (so a clean GPU run means something)."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quick.kernels import mma, wgmma
from quick.testing import kernel_cases as vc

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_every_quick_mma_variant_has_a_case():
    keys = {vc.mma_variant_key(c) for c in vc.mma_cases()}
    want = {(src, tuple(sorted(d.items()))) for src, d, _ in mma.VARIANTS}
    assert want <= keys, f"variants without a sanitizer case: {want - keys}"


def test_every_sm90_variant_has_a_case():
    mapped = vc.sm90_variant_configs(strict=True)
    assert len(mapped) == len(wgmma.VARIANTS)
    launched = {tuple(sorted(c.config.defines(c.group_size if c.group_size == 32 else 128, c.dtype).items()))
                for c in vc.sm90_cases()}  # fmt: skip
    want = {tuple(sorted(d.items())) for _s, _k, d in wgmma.VARIANTS}
    assert want <= launched


def test_every_dec_variant_has_a_case():
    from quick.kernels import decode

    def flags(c):
        return (c.extra.get("act", 0), c.extra.get("norm", 0), c.extra.get("pdl", 0))

    launched = {
        tuple(sorted(c.config.defines(c.m, 32 if c.group_size == 32 else 128, c.dtype, *flags(c)).items()))
        for c in vc.dec_cases()
        if c.group_size in (32, 128)
    }
    fused = {flags(c) for c in vc.dec_cases() if c.kernel == "dec_fused"}
    assert fused == {(a, n, p) for p in (0, 1) for a, n in ([(0, 0)] if p else []) + decode.FUSED_FLAGS}
    want = {tuple(sorted(d.items())) for _s, _k, d in decode.VARIANTS}
    assert want <= launched, f"decode variants without a sanitizer case: {want - launched}"
    for c in vc.dec_cases():  # every case is one the launcher takes (plan raises otherwise)
        g = c.k if c.group_size == -1 else c.group_size
        decode.plan(c.m, c.n, c.k, g, 132, c.config, c.splits)


def test_every_moe_variant_has_a_valid_case():
    """Each grouped-GEMM variant (config, dtype, gated; the wgmma one in both input/output orders), decode variant
    (both layouts), plan- and route-kernel variant is launched by a case whose inputs the launcher's validation
    takes (checked on CPU tensors: shapes, dtypes, plan block size, config)."""
    from quick.kernels import moe as qmoe
    from quick.kernels import moe_sm90

    cases = vc.moe_cases()
    launched = set()
    launched_sm90 = set()
    gen = torch.Generator().manual_seed(0)
    for c in cases:
        inp = vc.make_inputs(c, gen, "cpu")
        if c.kernel == "moe_plan":
            launched.add(("QP_IDX64", int(inp["x"].dtype == torch.int64)))
            continue
        if c.kernel == "moe_route":  # the limits the launcher checks before the device, and the variant it picks
            logits, ex = inp["x"], c.extra
            why = qmoe.route_unavailable(logits, ex["top_k"], ex["block"], c.n)
            assert why is not None and "CUDA" in why, why
            epl = next(p for p in qmoe.ROUTE_EPL if 32 * p >= logits.shape[1])
            assert logits.shape[1] > 32 * max([p for p in qmoe.ROUTE_EPL if p < epl], default=0)
            launched.add(tuple(sorted({"QR_BF16": int(c.dtype == torch.bfloat16), "QR_EPL": epl}.items())))
            continue
        if c.kernel == "moe_dec":
            p, ex = inp["packed"], c.extra
            gdiv = 1 if ex["act"] else ex["top_k"]
            d = qmoe.validate_dec(inp["x"], p["qweight"], p["scales"], p["zeros"], c.group_size, p["sorted_ids"],
                                  p["block_experts"], p["num_padded"], gdiv, ex["tokens"], None, ex["act"],
                                  need_cuda=False, layout=c.layout)  # fmt: skip
            assert (d.slots, d.n) == (c.m, c.n)
            act = qmoe.DEC_ACTS[ex["act"]]
            launched.add(tuple(sorted({**qmoe.DEC_CONFIGS[c.layout].defines(16, c.group_size, c.dtype, act),
                                       "QD_GROUPED": 1}.items())))  # fmt: skip
            continue
        if c.kernel == "moe_wgmma":
            p, ex = inp["packed"], c.extra
            plan_in = ex["order"] == "plan"
            slots = ex["tokens"] * ex["top_k"]
            d, got = moe_sm90.validate(inp["x"], p["qweight"], p["scales"], p["zeros"], c.group_size,
                                       p["sorted_ids"], p["block_experts"], p["num_padded"],
                                       1 if plan_in else ex["top_k"], None, slots, plan_in, plan_in,
                                       need_cuda=False)  # fmt: skip
            assert got == slots and d.n == c.n and d.n % 128, "N should end inside a 128-channel tile"
            launched_sm90.add((c.extra["order"], tuple(sorted(moe_sm90.CONFIGS[d.block_size].defines(c.group_size,
                               c.dtype).items()))))  # fmt: skip
            continue
        p = inp["packed"]
        d = qmoe.validate(inp["x"], p["qweight"], p["scales"], p["zeros"], c.group_size, p["sorted_ids"],
                          p["block_experts"], p["num_padded"], c.extra["top_k"], None, c.extra["act"],
                          need_cuda=False)  # fmt: skip
        assert (d.slots, d.n_out) == (c.m, c.n)
        cfg = qmoe.plan_launch(d, bool(c.extra["act"]), c.extra["config"]).config
        assert d.n % cfg.bn or (c.extra["act"] and cfg.bn == 128), "N should end inside a CTA tile"
        launched.add(tuple(sorted(cfg.defines(c.dtype, bool(c.extra["act"])).items())))
    want = {tuple(sorted(d.items())) for _s, d, _a in qmoe.VARIANTS if "QP_IDX64" not in d}
    assert any("QR_EPL" in dict(w) for w in want)
    assert any("QD_GROUPED" in dict(w) for w in want)
    want |= {("QP_IDX64", d["QP_IDX64"]) for _s, d, _a in qmoe.PLAN_VARIANTS}
    assert want <= launched, f"MoE variants without a sanitizer case: {want - launched}"
    want_sm90 = {
        (order, tuple(sorted((k, v) for k, v in d.items() if k != "QS_GROUPED")))
        for _s, _k, d in moe_sm90.VARIANTS
        for order in ("slots", "plan")
    }
    assert want_sm90 == launched_sm90, f"grouped wgmma variants without a case: {want_sm90 - launched_sm90}"


def test_every_attention_variant_has_valid_cases():
    """Each decode-attention variant has sanitizer cases, and their inputs pass the launcher's validation with the
    variant's head dim and group size (built on the CPU here)."""
    from quick.kernels import attention

    cases = vc.attn_cases()
    launched = {(c.extra["d"], c.group_size, c.dtype, c.kernel == "attn_rope", c.extra["pdl"]) for c in cases}
    want = {
        (d["QA_D"], d["QA_G"], attention.DTYPES[d["QA_DTYPE"]], bool(d.get("QA_ROPE")), bool(d.get("QA_PDL")))
        for _s, _k, d in attention.VARIANTS
    }
    assert want == launched
    assert any(c.extra["pos"] >= c.k for c in cases if c.kernel == "attn_rope")  # the no-write case
    gen = torch.Generator().manual_seed(0)
    for c in cases[:: len(cases) // 24]:
        inp = vc.make_inputs(c, gen, device="cpu")
        p = inp["packed"]
        if c.kernel == "attn_rope":
            args = (inp["x"], p["k"], p["v"], p["keys"], p["values"], p["pos"], p["cos"], p["sin"], p.get("mask"))
            b, h, kv, length, d = attention.validate_rope(*args)
            assert inp["x"].stride(0) == (h + 2 * kv) * d  # strided rows, as the fast step hands them in
        else:
            b, h, kv, length, d = attention.validate(inp["x"], p["keys"], p["values"], p["pos"], p.get("mask"))
        assert (b, h * d, length, h // kv, d) == (c.m, c.n, c.k, c.group_size, c.extra["d"])
        assert c.splits is None or c.splits <= attention.MAX_SPLITS


def test_cases_hit_tile_edges_and_split_k():
    cases = vc.mma_cases()
    for cfg in mma.GEMM_CONFIGS.values():
        mine = [c for c in cases if c.kernel == "mma_gemm" and c.config == cfg.name]
        assert any(c.m % cfg.bm for c in mine), cfg.name  # a partial M tile
        assert any((c.splits or 1) > 1 for c in mine), cfg.name  # split-k (and the reduce) launched
        assert all(c.k % cfg.bks == 0 and c.n % 64 == 0 for c in mine)
    order = vc.all_cases()
    first = {}
    for i, c in enumerate(order):
        first.setdefault((c.kernel, c.variant, c.dtype), i)
    assert max(first.values()) == len(first) - 1  # every variant's first case comes before any second case


@pytest.fixture(scope="module")
def fuzz():
    return _script("fuzz_gpu")


def _ref_case(dtype=torch.float16, regime="normal"):
    return {"dtype": dtype, "regime": regime}


def test_fuzz_check_accepts_rounding_and_rejects_errors(fuzz):
    torch.manual_seed(0)
    ref = torch.randn(16, 64, dtype=torch.float64)
    out = ref.to(torch.float16)
    ok, why, err = fuzz.check(_ref_case(), out, ref, 2e-3)
    assert ok and err < 1e-3, why
    bad = out.clone()
    bad[3, 5] += 1.0  # one wrong element
    assert not fuzz.check(_ref_case(), bad, ref, 2e-3)[0]
    nan = out.clone()
    nan[0, 0] = float("nan")  # an unwritten (poisoned) element
    assert not fuzz.check(_ref_case(), nan, ref, 2e-3)[0]
    assert not fuzz.check(_ref_case(), out[:, :32], ref, 2e-3)[0]  # wrong shape


def test_fuzz_check_nonfinite_rules(fuzz):
    ref = torch.randn(4, 64, dtype=torch.float64)
    ref[1] = float("nan")
    ref[2, 3] = 1e6  # beyond fp16: must be +inf
    out = ref.to(torch.float16)
    assert torch.isinf(out[2, 3])
    assert fuzz.check(_ref_case(regime="big"), out, ref, 2e-3)[0]
    fin = out.clone()
    fin[2, 3] = 65504.0  # saturated instead of inf
    assert not fuzz.check(_ref_case(regime="big"), fin, ref, 2e-3)[0]
    lost = out.clone()
    lost[1] = 0.0  # NaN input row not propagated
    assert not fuzz.check(_ref_case(regime="nonfinite"), lost, ref, 2e-3)[0]
    ref_inf = torch.zeros(2, 64, dtype=torch.float64)
    ref_inf[0, 0] = -math.inf
    out_inf = ref_inf.to(torch.float16)
    assert fuzz.check(_ref_case(), out_inf, ref_inf, 2e-3)[0]
    out_inf[0, 0] = math.inf  # wrong sign
    assert not fuzz.check(_ref_case(), out_inf, ref_inf, 2e-3)[0]


def test_fuzz_check_const_regime_is_exact(fuzz):
    ref = torch.full((3, 64), 0.25, dtype=torch.float64)
    out = ref.to(torch.float16)
    assert fuzz.check(_ref_case(regime="const"), out, ref, 2e-3)[0]
    out[0, 0] = 0.2502
    assert not fuzz.check(_ref_case(regime="const"), out, ref, 2e-3)[0]


def test_fuzz_bitwise_equal_sees_nan_payloads_and_signs(fuzz):
    a = torch.tensor([0.0, float("nan"), 1.0], dtype=torch.float16)
    assert fuzz.bitwise_equal(a, a.clone())
    b = a.clone()
    b[0] = -0.0
    assert not fuzz.bitwise_equal(a, b)


def test_sanitizer_log_parser():
    san = _script("sanitize")
    text = "\n".join(
        [
            "CASE 0 mma_gemm[m16k4/fp16] fp16 M=1",
            'JSON {"event": "case", "i": 0, "label": "x", "kernel": "mma_gemm", "variant": "m16k4/fp16", "ok": true}',
            "========= Invalid __global__ read of size 16 bytes",
            "=========     at quick_gemm+0x1a0",
            "========= ERROR SUMMARY: 1 error",
        ]
    )
    res = san.parse_log(text)
    assert res["errors"] == 1 and res["cases"] == 1 and res["variants"] == 1
    assert res["reports"][0]["case"].startswith("0 mma_gemm") and "Invalid" in res["reports"][0]["report"]
    race = san.parse_log("========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)")
    assert race["errors"] == 1 and race["warnings"] == 1
    assert san.parse_log("killed")["summary_found"] is False


def test_gpu_run_runs_every_job_and_packs_the_results(tmp_path):
    """The GPU runner: each plan line runs with its own OUT folder and time limit, a failing or timed-out job does
    not stop the next one, and everything lands in one archive with a summary."""
    import tarfile

    plan = tmp_path / "smoke.plan"
    plan.write_text(
        "# name | limit (s) | command\n"
        "ok   | 20 | echo hello > $OUT/a.txt\n"
        "\n"
        "fail | 20 | echo broken; exit 3\n"
        "slow | 1  | sleep 30\n"
        "last | 20 | echo done > $OUT/b.txt\n"
    )
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "QUICK_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_run.sh"), str(plan)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    summary = (out / "summary.txt").read_text()
    for name, rc in (("ok", 0), ("fail", 3), ("slow", 124), ("last", 0)):
        assert re.search(rf"--- {name} rc={rc} ", summary), summary
    with tarfile.open(out / "ok.tar.gz") as tar:  # one archive per job, written as it ends
        assert {"ok/a.txt", "ok.log"} <= set(tar.getnames()), tar.getnames()
        assert tar.extractfile("ok/a.txt").read() == b"hello\n"
    with tarfile.open(out / "last.tar.gz") as tar:
        assert tar.extractfile("last/b.txt").read() == b"done\n"
    with tarfile.open(out / "fail.tar.gz") as tar:
        assert "fail.log" in tar.getnames()


@pytest.mark.parametrize("layout", ["w4a8", "w4a8_sm90", "quick", "quick_sm90"])
def test_registry_layers_are_built_in_the_case_layout(layout):
    """A registry case hands its kernel the tensors of its own layout (a W4A8 layer built in the portable layout
    would feed the Hopper kernel tensors of the wrong shape)."""
    gen = torch.Generator().manual_seed(0)
    mod = vc.build_module(layout, 384, 512, 128, torch.float16, True, gen, "cpu")
    stored = getattr(mod, "storage", None) or mod.layout_name
    assert stored == layout
    assert vc.module_tensors(mod)["qweight"].dim() == 2


def test_profile_kernel_categories():
    """The step / prefill profiler sorts kernel names (as the H100 profiles recorded them) into what they compute."""
    prof = _script("profile_decode")
    names = {
        "nvjet_sm90_hsh_256x64_64x5_2x1_v_bz_TNT": "linear",
        "_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel": "linear",
        "quick_sm90_gemm": "linear",
        "quick_w4a8_sm90_gemm": "linear",
        "quick_dec": "linear",
        "quick_attn_decode": "attention",
        "pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>": "attention",
        "fmha_cutlassF_f16_aligned_64x64_rf_sm80": "attention",
        "quick_actquant": "act_quant",
        "quick_rms_norm_quant": "act_quant",
        "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0": "norm",
        "triton_poi_fused_mul_silu_0": "other",
        "quick_moe_plan": "other",
        "Memcpy DtoD (Device -> Device)": "other",
    }
    assert {n: prof.category(n) for n in names} == names
    split = prof.split_by_category([("quick_sm90_gemm", 5.0), ("quick_dec", 2.0), ("triton_poi_fused_mul_silu_0", 1.0)])
    assert split == {"linear": 7.0, "attention": 0.0, "act_quant": 0.0, "norm": 0.0, "other": 1.0}
