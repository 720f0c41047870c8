"""benchmarks/kernel_shapes.py: the shape list, the options, the summary maths, the writers, the AWQ tensors given to
Humming, the compile process, and the whole loop on CPU (cuBLAS = F.linear, QUICK = the reference path, Humming
unavailable). One GPU case runs the loop on a small grid with all three implementations."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import kernel_shapes as ks  # noqa: E402

from quick.formats.layouts import get_layout  # noqa: E402
from quick.testing import random_quantized  # noqa: E402

# ---------------------------------------------------------------------------------------------- shapes


def test_shape_list_is_sane():
    shapes = ks.SHAPES
    kns = [(s.K, s.N) for s in shapes]
    assert len(set(kns)) == len(kns) >= 30
    assert all(k % ks.GROUP == 0 and n % 64 == 0 for k, n in kns)
    held = ks.held_out_shapes()
    assert 0.15 * len(kns) <= len(held) <= 0.35 * len(kns)
    assert set(held) | set(ks.tuning_shapes()) == set(kns) and not set(held) & set(ks.tuning_shapes())
    assert not set(held) & ks.ALREADY_TUNED  # shapes already in the committed tables are never held out
    assert all(s.model and s.layer for s in shapes)
    # many families and sizes: 0.5B to 72B, dense and MoE experts, all four layer kinds
    models = {m for s in shapes for m, _ in s.uses}
    for name in ("Qwen2.5-0.5B", "Qwen2.5-72B", "Llama-3.1-70B", "Mixtral-8x7B", "Qwen3-30B-A3B", "Phi-3-mini"):
        assert name in models
    layers = {lay.split(".")[-1] for s in shapes for _, lay in s.uses}
    assert {"qkv", "o", "gate_up", "down"} <= layers


def test_layer_formulas_from_configs():
    llama = ks.model_layers(ks.MODELS["Llama-3.1-8B"])
    assert llama == {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
    gemma = ks.model_layers(ks.MODELS["Gemma-2-9B"])  # head_dim 256: q/k/v wider than hidden
    assert gemma["qkv"] == (3584, (16 + 2 * 8) * 256) and gemma["o"] == (4096, 3584)
    moe = ks.model_layers(ks.MODELS["Qwen3-30B-A3B"])
    assert moe["experts.gate_up"] == (2048, 1536) and moe["experts.down"] == (768, 2048) and "gate_up" not in moe
    ds = ks.model_layers(ks.MODELS["DeepSeek-V2-Lite"])
    assert ds["experts.down"] == (1408, 2048) and ds["dense.down"] == (10944, 2048) and ds["kv_b"] == (512, 4096)


def test_k_not_multiple_of_group_is_skipped_and_reported():
    assert any(sk["K"] == 10944 and "multiple of 128" in sk["reason"] for sk in ks.SKIPPED)
    assert (10944, 2048) not in [(s.K, s.N) for s in ks.SHAPES]
    shapes, skipped = ks.build_shapes({"m": dict(hidden=1000, heads=8, kv=8, head_dim=125, ffn=4096)}, [("m", "qkv")])
    assert shapes == [] and skipped[0]["K"] == 1000
    with pytest.raises(ValueError, match="not in the model catalog"):
        ks.build_shapes(selected=[("Llama-3.1-8B", "nope")])


def test_duplicates_share_one_shape_with_all_models():
    s = next(s for s in ks.SHAPES if (s.K, s.N) == (4096, 28672))
    assert "Mistral-7B" in s.model and "Mixtral-8x7B" in s.model and s.uses[0] == ("Llama-3.1-8B", "gate_up")


def test_held_out_rule_is_fixed_per_shape():
    for s in ks.SHAPES:
        assert s.held_out == ks.is_held_out(s.K, s.N)
    assert not ks.is_held_out(8192, 8192)


# ---------------------------------------------------------------------------------------------- options


def test_parse_defaults_and_order():
    args = ks.parse_args([])
    assert args.ms == list(ks.M_ORDER) and args.ms[:5] == [1, 16, 128, 1024, 4096]
    assert sorted(args.ms) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    assert args.dtypes == ["fp16", "bf16"] and args.impls == ["cublas", "quick", "humming"]
    assert len(args.shapes) == len(ks.SHAPES) and args.budget_s > 0 and args.humming_tuning == "per-m"
    args = ks.parse_args(["--m", "4096", "3", "1", "--dtypes", "bf16", "--impls", "quick", "cublas"])
    assert args.ms == [1, 4096, 3] and args.dtypes == ["bf16"] and args.impls == ["quick", "cublas"]


def test_parse_shapes_by_name_kxn_and_group():
    args = ks.parse_args(["--shapes", "mistral-7b.qkv", "4096x6144", "1024x512", "held-out"])
    kns = [(s.K, s.N) for s in args.shapes]
    assert kns[:2] == [(4096, 6144), (1024, 512)] or (1024, 512) in kns
    assert kns.count((4096, 6144)) == 1 and set(ks.held_out_shapes()) <= set(kns)
    custom = next(s for s in args.shapes if (s.K, s.N) == (1024, 512))
    assert custom.model == "custom" and not custom.held_out
    assert [s.key for s in ks.parse_args(["--shapes", "tuned"]).shapes] == [f"{k}x{n}" for k, n in ks.tuning_shapes()]


@pytest.mark.parametrize(
    "argv", [["--shapes", "1000x512"], ["--shapes", "nosuch"], ["--m", "0"], ["--rep-ms", "0"], ["--dtypes", "fp32"]]
)
def test_bad_options_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        ks.parse_args(argv)


def test_plan_covers_every_shape_at_the_key_ms_first():
    ms = ks.order_ms([2, 4096, 1, 16])
    assert ms == [1, 16, 4096, 2]
    plan = ks.cell_plan(ms, 3, ["fp16", "bf16"])
    assert len(plan) == 4 * 3 * 2
    assert [c[0] for c in plan[:6]] == [1] * 6 and {c[1] for c in plan[:6]} == {0, 1, 2}
    with pytest.raises(ValueError):
        ks.order_ms([1, -2])


# ---------------------------------------------------------------------------------------------- summary


def _row(impl, m, us, k=1024, n=512, dt="fp16", held=False, **kw):
    return {"impl": impl, "M": m, "K": k, "N": n, "dtype": dt, "us": us, "choice": "c", "held_out": held, **kw}


def _synthetic():
    rows = []
    # tuned shape 1024x512: quick 10 us; cuBLAS 30 / 20 us at M 1 / 16; Humming 11 / 9 us
    rows += [_row("quick", 1, 10.0), _row("cublas", 1, 30.0), _row("humming", 1, 11.0)]
    rows += [_row("quick", 16, 10.0), _row("cublas", 16, 20.0), _row("humming", 16, 9.0)]
    # held-out shape 2048x256 at M 1: quick 8, cuBLAS 32, Humming 10; at M 1024 quick 100, cuBLAS 90
    rows += [_row("quick", 1, 8.0, 2048, 256, held=True), _row("cublas", 1, 32.0, 2048, 256, held=True)]
    rows += [_row("humming", 1, 10.0, 2048, 256, held=True)]
    rows += [_row("quick", 1024, 100.0, 2048, 256, held=True), _row("cublas", 1024, 90.0, 2048, 256, held=True)]
    # left out: an error row, a failed check, a missing partner, no time
    rows += [_row("humming", 1024, None, 2048, 256, held=True, error="RuntimeError: refused")]
    rows += [_row("quick", 16, 5.0, dt="bf16"), _row("cublas", 16, 50.0, dt="bf16", check="fail")]
    rows += [_row("cublas", 128, 40.0)]
    return rows


def _entry(summary, band, group, dt="all"):
    return next(e for e in summary["table"] if (e["band"], e["group"], e["dtype"]) == (band, group, dt))


def test_summarize_geomeans_worst_and_counts():
    s = ks.summarize(_synthetic())
    small_all = _entry(s, "M<=16", "all")
    assert small_all["cublas"]["n"] == 3
    assert math.isclose(small_all["cublas"]["geomean"], (3.0 * 2.0 * 4.0) ** (1 / 3))
    assert small_all["humming"]["n"] == 3
    assert math.isclose(small_all["humming"]["geomean"], (1.1 * 0.9 * 1.25) ** (1 / 3))
    assert small_all["humming"]["worst"]["M"] == 16 and math.isclose(small_all["humming"]["worst"]["ratio"], 0.9)
    assert small_all["humming"]["below"] == 1 and small_all["cublas"]["below"] == 0
    held = _entry(s, "M<=16", "held-out")
    assert held["cublas"]["n"] == 1 and math.isclose(held["cublas"]["geomean"], 4.0)
    tuned = _entry(s, "M<=16", "tuned")
    assert tuned["cublas"]["n"] == 2
    big = _entry(s, "M>=512", "all")
    assert big["cublas"]["n"] == 1 and big["cublas"]["below"] == 1 and big["humming"]["n"] == 0
    assert big["humming"]["geomean"] is None and big["humming"]["worst"] is None
    assert _entry(s, "M 32-256", "all")["cublas"]["n"] == 0  # the lone cuBLAS row at 128 has no quick partner
    assert _entry(s, "M<=16", "all", "bf16")["cublas"]["n"] == 0  # its cuBLAS row failed its check
    assert s["errors"] == {"humming": 1} and len(s["check_failures"]) == 1
    assert s["cells"] == {"cublas": 4, "humming": 3}
    targets = {t["target"]: t for t in s["targets"]}
    assert targets["vs cuBLAS: worst cell"]["met"] is False  # 0.9x at M 1024
    assert targets["vs Humming: geomean at M>=512 (all)"]["met"] is None
    per_m = {e["M"]: e for e in s["per_m"]}
    assert math.isclose(per_m[1]["fp16:cublas"]["geomean"], (3.0 * 4.0) ** 0.5)


def test_summarize_empty_and_all_errors():
    s = ks.summarize([_row("quick", 1, None, error="x"), _row("humming", 1, None, error="y")])
    assert all(e[o]["n"] == 0 for e in s["table"] for o in ks.OTHERS)
    assert s["errors"] == {"quick": 1, "humming": 1}
    assert ks.summarize([])["rows"] == 0


# ---------------------------------------------------------------------------------------------- writers

META = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "date": "2030-01-01", "humming_version": "0.1.19",
        "quick_commit": "abc123"}  # fmt: skip
RUN = {"ms": [1, 16, 1024], "dtypes": ["fp16", "bf16"], "warmup_ms": 3, "rep_ms": 15, "humming_tuning": "per-m",
       "status": "complete", "elapsed_s": 12.0, "not_run": 0, "skipped": ks.SKIPPED}  # fmt: skip


def test_markdown_report():
    shapes = [ks.Shape(1024, 512, (("A", "qkv"),), False), ks.Shape(2048, 256, (("B", "down"),), True)]
    text = ks.render_markdown(META, _synthetic(), shapes, RUN)
    parts = ["## Summary, fp16 and bf16 together", "## Targets", "## Summary, bf16", "## Geometric mean per M"]
    parts += ["## Every fp16 cell", "## Errors", "## Correctness", "## Shapes", "abc123", "humming-kernels 0.1.19"]
    for part in parts:
        assert part in text, part
    assert "| 2048x256* | B:down | 1 | 32.0 | 8.0 | 10.0 | 4.00x | 1.25x |" in text
    assert "| 1024 | 90.0 | 100.0 | err | 0.90x | - |" in text
    assert "humming: RuntimeError: refused | 1 |" in text
    assert "10944x2048 | skipped" in text
    assert "| M<=16 | held-out | 1 | 4.00x |" in text


def test_json_writer_keys_and_atomic(tmp_path):
    path = tmp_path / "out.json"
    ks.write_json(path, {**META, "extra": 1}, [_row("quick", 1, 1.0)])
    doc = json.loads(path.read_text())
    assert set(doc) == {"gpu", "torch", "date", "humming_version", "quick_commit", "rows"}
    assert doc["rows"][0]["impl"] == "quick" and not list(tmp_path.glob("*.tmp"))


def test_png(tmp_path):
    pytest.importorskip("matplotlib")
    assert ks.plot_png(tmp_path / "a.png", META, _synthetic()) and (tmp_path / "a.png").stat().st_size > 1000
    assert not ks.plot_png(tmp_path / "b.png", META, [])


# ---------------------------------------------------------------------------------------------- AWQ for Humming


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k,n", [(256, 128), (384, 64)])
def test_awq_tensors_as_humming_reads_them(k, n, dtype):
    qw = random_quantized(k, n, 128, dtype, generator=torch.Generator().manual_seed(k + n))
    t = ks.awq_tensors(qw)
    for name, (shape, dt) in ks.humming_awq_specs(k, n, 128, dtype).items():
        assert tuple(t[name].shape) == shape and t[name].dtype == dt, name
    # Humming's decoding (bit shifts + its reorder index) gives back our codes and zero points
    assert torch.equal(ks.humming_awq_decode(t["qweight"]), qw.q.to(torch.int32))
    assert torch.equal(ks.humming_awq_decode(t["qzeros"]), qw.zeros.to(torch.int32))
    assert torch.equal(t["scales"], qw.scales)
    # and the project's own reader agrees (the round trip)
    back = get_layout("awq_gemm").unpack(t, k, n, 128)
    assert torch.equal(back.q, qw.q) and torch.equal(back.zeros, qw.zeros) and torch.equal(back.scales, qw.scales)
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_awq_decode_catches_a_wrong_order():
    assert ks.awq_reorder_matches_humming()
    codes = torch.arange(8, dtype=torch.uint8).repeat(128, 1)  # column c holds c
    qw = random_quantized(128, 8, 128, torch.float16)
    qw.q = codes
    words = ks.awq_tensors(qw)["qweight"]
    assert torch.equal(ks.humming_awq_decode(words)[0], torch.arange(8, dtype=torch.int32))
    # plain sequential nibbles (no AWQ order) would decode to another column order
    plain = sum(c << (4 * c) for c in range(8))
    assert not torch.equal(ks.humming_awq_decode(torch.tensor([[plain]], dtype=torch.int32))[0], torch.arange(8))


# ---------------------------------------------------------------------------------------------- compile process


def _fake_compile(layer, compute, tuning, device):
    if layer == "bad":
        raise ValueError("refused shape")
    time.sleep(0.01)


def test_compile_server_reports_builds_and_errors():
    server = ks.CompileServer(workers=2, device=0, env={}, compile_fn=_fake_compile)
    try:
        server.submit(("a", 1), (1, 0, 0), "ok", "{}", "t1")
        server.submit(("b", 1), (0, 0, 0), "bad", "{}", None)
        server.submit(("a", 1), (0, 0, 0), "ok", "{}", "t1")  # a duplicate is not queued twice
        assert not server.ready(("a", 1)) or ("a", 1) in server.results
        assert server.ready(("never", 0))  # not submitted: runs inline
        deadline = time.time() + 120
        while not (server.ready(("a", 1)) and server.ready(("b", 1))) and time.time() < deadline:
            time.sleep(0.1)
        assert server.results[("a", 1)][0] is None
        assert "refused shape" in server.results[("b", 1)][0]
        assert len(server.submitted) == 2 and server.usable()
    finally:
        server.close()
    assert not server.proc.is_alive()


# ---------------------------------------------------------------------------------------------- the whole loop


def test_cpu_run_writes_every_output(tmp_path):
    argv = ["--shapes", "256x128", "384x192", "--m", "16", "1", "--outdir", str(tmp_path), "--tag", "t",
            "--rep-ms", "1", "--budget-s", "0"]  # fmt: skip
    assert ks.main(argv, device="cpu") == 0
    doc = json.loads(next(tmp_path.glob("kernel-shapes-cpu-*-t.json")).read_text())
    assert set(doc) == {"gpu", "torch", "date", "humming_version", "quick_commit", "rows"}
    rows = doc["rows"]
    assert len(rows) == 2 * 2 * 2 * 3
    assert [r["M"] for r in rows[:12]] == [1] * 12  # the M order: every shape at M 1 first
    for r in rows:
        assert {"impl", "M", "K", "N", "dtype", "us", "choice", "model", "layer", "held_out"} <= set(r)
        if r["impl"] == "humming":
            assert r["us"] is None and "CUDA" in r["error"]
        else:
            assert r["us"] > 0 and r["check"] == "ok" and r["first_call_ms"] >= 0 and not r.get("error")
            assert r["max_rel_err"] < 1e-2
    assert {r["choice"] for r in rows if r["impl"] == "quick"} == {"quick reference"}
    md = next(tmp_path.glob("*-t.md")).read_text()
    assert "| 256x128 | custom:256x128 | 1 |" in md and "Run: complete" in md
    assert next(tmp_path.glob("*-t.png")).stat().st_size > 1000


def test_cpu_run_stopped_by_the_budget_still_writes(tmp_path):
    argv = ["--shapes", "256x128", "--m", "1", "--outdir", str(tmp_path), "--budget-s", "0.000001", "--impls", "cublas"]
    assert ks.main(argv, device="cpu") == 0
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert doc["rows"] == []
    assert "planned cells not run" in next(tmp_path.glob("*.md")).read_text()


class _FakeHumming:
    """Humming's adapter interface on CPU: the layer is the dequantized AWQ weight, configs name M."""

    error = None
    version = "fake"
    compute = "{}"

    def build(self, awq, k, n, dtype):
        w = get_layout("awq_gemm").unpack(awq, k, n, 128).dequantize(torch.float32)
        return lambda x: (x.float() @ w).to(x.dtype)

    def layer_config(self, layer):
        return "layer"

    def config_for(self, layer, m):
        if m == 16:
            raise ValueError("no config")
        return {"mma_type": "mma", "block_shape": [m, 64, 64], "warp_shape": [m, 32, 32], "num_stages": 2}

    def tuning_string(self, cfg):
        return json.dumps(cfg)

    def call(self, layer, x, tuning):
        return layer(x)


def _slow_compile(layer, compute, tuning, device):
    time.sleep(0.3)


def test_humming_cells_wait_for_their_kernel_and_run_later(tmp_path):
    class FakeRunner(ks.Runner):
        def setup(self):
            self.humming = _FakeHumming()
            self.server = ks.CompileServer(workers=1, device=0, env={}, compile_fn=_slow_compile)

    argv = ["--shapes", "256x128", "384x192", "--m", "1", "16", "4", "--outdir", str(tmp_path), "--rep-ms", "1",
            "--budget-s", "0"]  # fmt: skip
    runner = FakeRunner(ks.parse_args(argv), torch.device("cpu"), log=lambda msg: None)
    assert runner.run() == 0 and runner.status == "complete" and runner.not_run == 0
    rows = runner.rows
    hum = [r for r in rows if r["impl"] == "humming"]
    assert len(rows) == 2 * 3 * 2 * 3 and len(hum) == 12
    assert rows.index(hum[0]) > 3  # deferred: the first Humming row comes after other cells
    for r in hum:
        if r["M"] == 16:
            assert "no config" in r["error"]
        else:
            assert r["us"] > 0 and r["check"] == "ok" and r["compile_s"] >= 0.25 and r["choice"].startswith("mma b")
    assert not runner.server.proc.is_alive()
    s = ks.summarize(rows)
    assert s["cells"]["humming"] == 8 and s["errors"] == {"humming": 4}


def test_eager_rows_are_left_out_of_ratios():
    rows = [_row("quick", 1, 10.0), _row("cublas", 1, 30.0, graph=False), _row("humming", 1, 12.0)]
    s = ks.summarize(rows)
    assert s["cells"] == {"cublas": 0, "humming": 1} and len(s["eager_rows"]) == 1
    assert "timed eagerly" in ks.render_markdown(META, rows, [], RUN, s)


def test_humming_choice_names_the_config():
    cfg = {"block_shape": [176, 256, 64], "mma_type": "wgmma", "multi_cast_size_a": 2, "num_stages": 4,
           "use_stream_k": True, "use_tma": True, "use_warp_spec": True, "warp_shape": [176, 32, 64]}  # fmt: skip
    assert ks.humming_choice(cfg) == "wgmma b176x256x64 w176x32x64 st4 streamk ws tma"
    assert ks.humming_choice({}).startswith("?")


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_small_grid(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import importlib.util

    impls = ["cublas", "quick"] + (["humming"] if importlib.util.find_spec("humming") else [])
    argv = ["--shapes", "1024x768", "--m", "1", "128", "--outdir", str(tmp_path), "--budget-s", "0", "--impls",
            *impls]  # fmt: skip
    assert ks.main(argv) == 0
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    assert len(rows) == 2 * 2 * len(impls)
    for r in rows:
        assert not r.get("error"), r
        assert r["check"] == "ok" and r["us"] > 0 and r["choice"], r
