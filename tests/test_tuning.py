"""Measured kernel tables (``quick/kernels/tuning.py``): format checks, lookup by batch bucket, the fallbacks, and the
Hopper route that consults them (``quick_sm90.route``). CPU only: the device name is monkeypatched."""

from __future__ import annotations

import json

import pytest
import torch

from quick.kernels import quick_dec as qd
from quick.kernels import quick_sm90 as sm
from quick.kernels import tuning

GPU = "NVIDIA Test GPU 80GB"
DEV = torch.device("cuda", 0)


def _entry(m, kernel, config=None, splits=None, k=4096, n=14336, layout="quick_sm90"):
    return {"layout": layout, "K": k, "N": n, "M": m, "kernel": kernel, "config": config or {}, "splits": splits}


TABLE = {
    "gpu": GPU,
    "torch": "2.11.0+cu130",
    "date": "2026-12-05",
    "group_size": 128,
    "entries": [
        _entry(1, "dec", {"rb": 4, "warps": 8, "stages": 4}, 4),
        _entry(16, "dec", {"rb": 4, "warps": 8, "stages": 6}, 2),
        _entry(64, "dec", {"rb": 2, "warps": 1, "stages": 4, "nw": 8}, 8),
        _entry(256, "wgmma", {"nt": 256, "nwg": 2, "stages": 4, "grp": 4, "grp32": 4, "pipe": 0}, 3),
        _entry(1024, "wgmma", {"nt": 128, "nwg": 2, "stages": 6, "grp": 4, "grp32": 3, "pipe": 2}, 1),
    ],
}


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("QUICK_TUNING_DIR", str(tmp_path))
    monkeypatch.delenv("QUICK_TUNING", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda idx=None: GPU)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(sm, "DEC_MAX_M", 0)
    tuning.clear_cache()
    (tmp_path / f"{tuning.gpu_key(GPU)}.json").write_text(json.dumps(TABLE))
    yield tmp_path
    tuning.clear_cache()


def test_gpu_key_is_a_plain_file_stem():
    assert tuning.gpu_key("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert tuning.gpu_key("NVIDIA H200") == "nvidia-h200"


def test_lookup_takes_the_smallest_measured_batch_that_holds_m(table_dir):
    got = {m: tuning.lookup("quick_sm90", DEV, m, 14336, 4096, 128) for m in (1, 2, 16, 17, 64, 65, 256, 300, 2048)}
    assert got[1].config["stages"] == 4 and got[1].splits == 4
    assert got[2] == got[16] and got[16].config["stages"] == 6
    assert got[17] == got[64] and got[64].config["nw"] == 8
    assert got[65].kernel == "wgmma" and got[65].config["nt"] == 256
    assert got[300].config["nt"] == 128 and got[2048] == got[300]  # beyond the largest measured M: the last entry
    assert tuning.lookup("quick_sm90", DEV, 2049, 14336, 4096, 128) is None  # ... up to twice it, then heuristics


def test_lookup_uses_only_what_was_measured(table_dir, monkeypatch):
    assert tuning.lookup("quick_sm90", DEV, 8, 4096, 4096, 128) is None  # another shape
    assert tuning.lookup("quick_sm90", DEV, 8, 14336, 4096, 64) is None  # another group size
    assert tuning.lookup("quick", DEV, 8, 14336, 4096, 128) is None  # another layout
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda idx=None: "Some Other GPU")
    tuning.clear_cache()
    assert tuning.lookup("quick_sm90", DEV, 8, 14336, 4096, 128) is None  # no table for this GPU
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda idx=None: GPU)
    monkeypatch.setenv("QUICK_TUNING", "0")
    tuning.clear_cache()
    assert tuning.lookup("quick_sm90", DEV, 8, 14336, 4096, 128) is None  # turned off


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda t: t.pop("entries"), "entries"),
        (lambda t: t.update(group_size=64), "group size 128"),
        (lambda t: t["entries"][0].pop("K"), "entry 0"),
        (lambda t: t["entries"][1].update(kernel="gemv"), "not one of"),
        (lambda t: t["entries"][2].update(M=0), "bad shape"),
        (lambda t: t["entries"][3].update(splits=0), "bad shape"),
    ],
)
def test_bad_tables_are_refused_with_the_reason(mutate, match):
    t = json.loads(json.dumps(TABLE))
    mutate(t)
    with pytest.raises(tuning.TuningTableError, match=match):
        tuning.parse_table(t)


def test_a_corrupt_table_file_warns_and_is_ignored(table_dir):
    (table_dir / f"{tuning.gpu_key(GPU)}.json").write_text('{"entries": [')  # truncated
    tuning.clear_cache()
    with pytest.warns(RuntimeWarning, match="ignoring the kernel tuning table"):
        assert tuning.lookup("quick_sm90", DEV, 1, 14336, 4096, 128) is None


def test_route_follows_the_table_then_the_heuristics(table_dir):
    dec, dcfg, dspl, cfg, spl = sm.route(DEV, 40, 14336, 4096, 128)
    assert dec and dcfg == qd.DecConfig(2, 1, 4, nw=8) and dspl == 8 and cfg is None
    dec, dcfg, dspl, cfg, spl = sm.route(DEV, 200, 14336, 4096, 128)
    assert not dec and cfg == sm.Sm90Config(256, 2, 4, 4, 4, 0) and spl == 3
    # the caller's config wins; an unmeasured shape keeps the heuristics (decode kernel off by default)
    forced = sm.Sm90Config(64, 2, 8, 6, 4, 0)
    assert sm.route(DEV, 40, 14336, 4096, 128, config=forced)[3:] == (forced, None)
    assert sm.route(DEV, 40, 4096, 4096, 128) == (False, None, None, None, None)
    # a decode entry never runs where the decode kernel cannot (N not a multiple of its 256 channels)
    t = json.loads(json.dumps(TABLE))
    t["entries"] = [_entry(64, "dec", {"rb": 2, "warps": 1, "stages": 4, "nw": 8}, 8, n=4096 + 128)]
    (table_dir / f"{tuning.gpu_key(GPU)}.json").write_text(json.dumps(t))
    tuning.clear_cache()
    assert sm.route(DEV, 40, 4096 + 128, 4096, 128)[0] is False


def test_route_keeps_the_switch_first(table_dir, monkeypatch):
    """QUICK_DEC_MAX_M set by the user (DEC_FORCED) forces the decode kernel with its default config up to its M;
    the default switch (not set) comes after the table."""
    monkeypatch.setattr(sm, "DEC_MAX_M", 64)
    monkeypatch.setattr(sm, "DEC_FORCED", True)
    assert sm.route(DEV, 40, 14336, 4096, 128) == (True, None, None, None, None)
    assert sm.route(DEV, 100, 14336, 4096, 128)[3] == sm.Sm90Config(256, 2, 4, 4, 4, 0)  # the M = 256 entry
    monkeypatch.setattr(sm, "DEC_FORCED", False)
    # the table first: its M = 64 entry's config and splits, not the decode kernel's defaults
    assert sm.route(DEV, 40, 14336, 4096, 128)[:3] == (True, qd.DecConfig(2, 1, 4, 0, 8), 8)
    assert sm.route(DEV, 4, 8192, 4096, 128) == (True, None, None, None, None)  # no entry for this shape: the default


def test_a_config_from_another_version_is_ignored_with_a_warning(table_dir):
    t = json.loads(json.dumps(TABLE))
    t["entries"] = [_entry(64, "wgmma", {"nt": 64, "no_such_field": 1}, 2)]
    (table_dir / f"{tuning.gpu_key(GPU)}.json").write_text(json.dumps(t))
    tuning.clear_cache()
    with pytest.warns(RuntimeWarning, match="does not fit Sm90Config"):
        assert sm.route(DEV, 64, 14336, 4096, 128) == (False, None, None, None, None)


def test_build_table_keeps_the_fastest_correct_candidate():
    rows = [
        {"layout": "quick_sm90", "K": 4096, "N": 4096, "M": 1, "kernel": "wgmma", "config": {"nt": 8}, "us": 14.0},
        {"layout": "quick_sm90", "K": 4096, "N": 4096, "M": 1, "kernel": "dec", "config": {"rb": 4}, "us": 9.0},
        # faster but failed its check, or not timed: never chosen
        {"layout": "quick_sm90", "K": 4096, "N": 4096, "M": 1, "kernel": "dec", "config": {"rb": 2}, "us": 5.0},
        {"layout": "quick_sm90", "K": 4096, "N": 4096, "M": 16, "kernel": "dec", "config": {"rb": 2}, "us": None},
        {"layout": "quick_sm90", "K": 4096, "N": 4096, "M": 16, "kernel": "wgmma", "config": {"nt": 16}, "us": 15.5},
    ]
    for r in rows:
        r["ok"] = r["config"] != {"rb": 2}
    t = tuning.build_table(rows, GPU, "2.11", "2026-12-05")
    by_m = {e["M"]: e for e in t["entries"]}
    assert by_m[1]["kernel"] == "dec" and by_m[1]["config"] == {"rb": 4} and by_m[1]["candidates"] == 2
    assert by_m[16]["kernel"] == "wgmma" and by_m[16]["us"] == 15.5
    assert tuning.parse_table(t)[("quick_sm90", 4096, 4096)][0][1].kernel == "dec"


def test_the_user_table_comes_before_the_package_table(table_dir, tmp_path_factory, monkeypatch):
    pkg = tmp_path_factory.mktemp("pkg")
    t = json.loads(json.dumps(TABLE))
    t["entries"] = [_entry(8, "wgmma", {"nt": 8}, 1, k=2048, n=2048)]
    (pkg / f"{tuning.gpu_key(GPU)}.json").write_text(json.dumps(t))
    monkeypatch.setattr(tuning, "TABLE_DIR", pkg)
    tuning.clear_cache()
    assert tuning.lookup("quick_sm90", DEV, 8, 14336, 4096, 128).kernel == "dec"  # the user's table
    assert tuning.lookup("quick_sm90", DEV, 8, 2048, 2048, 128) is None  # ... which does not fall through per shape
    (table_dir / f"{tuning.gpu_key(GPU)}.json").unlink()
    tuning.clear_cache()
    assert tuning.lookup("quick_sm90", DEV, 8, 2048, 2048, 128).config == {"nt": 8}  # the package's


def test_quick_tune_refuses_to_run_without_a_gpu():
    from quick.cli import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="compute capability 8.0"):
        main(["tune", "--budget-s", "1"])


def test_tune_candidates_are_launchable_plans():
    """Every candidate the tuner would time is a config the launchers accept for that shape (pure arithmetic)."""
    from quick.bench import tune
    from quick.kernels import quick_mma as qm

    for layout in ("quick_sm90", "quick"):
        for k, n in ((4096, 11008), (14336, 4096)):
            for m in (1, 8, 16, 64, 256, 4096):
                cands = tune.candidates(layout, m, n, k, 132)
                assert cands, (layout, m)
                for kernel, fields, splits, cfg in cands:
                    assert kernel in tuning.KERNELS[layout]
                    # what the table stores rebuilds the same config
                    rebuilt = {"dec": qd.DecConfig, "wgmma": sm.Sm90Config}.get(kernel)
                    assert (rebuilt(**fields) if rebuilt else fields.get("name")) == cfg
                    if kernel == "dec":
                        qd.plan(m, n, k, 128, 132, cfg, splits)
                    elif kernel == "wgmma":
                        sm.plan(m, n, k, 132, cfg, splits, 128)
                    elif kernel == "gemm":
                        qm.plan_gemm(m, n, k, 132, cfg, splits)
                    else:
                        qm.plan_gemv(m, n, k, 128, 132, cfg, splits)
                if layout == "quick_sm90" and m >= 64:  # the weights-through-TMA tiles are tried at large M too
                    assert {c.nt for _k, _f, _s, c in cands if getattr(c, "wtma", 0)} >= (
                        {128, 256} if m >= 256 else {64}
                    )


def test_quick_layout_route_follows_the_table(table_dir, monkeypatch):
    from quick.kernels import quick_mma as qm

    monkeypatch.setattr(qm, "DEC_QUICK_MAX_M", 0)
    t = json.loads(json.dumps(TABLE))
    t["entries"] = [
        _entry(4, "gemv", {"name": "v8"}, 2, layout="quick"),
        _entry(16, "dec", {"rb": 1, "warps": 8, "stages": 6, "wb": 1}, 3, layout="quick"),
        _entry(64, "gemm", {"name": "m16n2k4"}, 4, layout="quick"),
        _entry(4096, "gemm", {}, None, layout="quick"),
    ]
    (table_dir / f"{tuning.gpu_key(GPU)}.json").write_text(json.dumps(t))
    tuning.clear_cache()
    assert qm.route(DEV, 3, 14336, 4096, 128) == ("gemv", "v8", 2)
    assert qm.route(DEV, 9, 14336, 4096, 128) == ("dec", qd.DecConfig(1, 8, 6, wb=1), 3)
    assert qm.route(DEV, 40, 14336, 4096, 128) == ("gemm", "m16n2k4", 4)
    assert qm.route(DEV, 1000, 14336, 4096, 128) == ("gemm", None, None)
    assert qm.route(DEV, 3, 4096, 4096, 128) == ("gemm", None, None)  # not measured: the heuristics
    monkeypatch.setattr(qm, "DEC_QUICK_MAX_M", 8)  # the default switch: after the table, before the heuristics
    monkeypatch.setattr(qm, "DEC_FORCED", False)
    assert qm.route(DEV, 3, 14336, 4096, 128) == ("gemv", "v8", 2)
    assert qm.route(DEV, 3, 4096, 4096, 128) == ("dec", None, None)
    monkeypatch.setattr(qm, "DEC_FORCED", True)  # set by the user: before the table
    assert qm.route(DEV, 3, 14336, 4096, 128) == ("dec", None, None)


@pytest.mark.parametrize(
    "argv,cap,match",
    [
        (["--shapes", "4096x100"], (9, 0), "multiple of 128"),
        (["--shapes", "4096by4096"], (9, 0), "KxN"),
        (["--ms", "0"], (9, 0), "batch sizes >= 1"),
        (["--layouts", "awq_gemm"], (9, 0), "--layouts takes"),
        (["--layouts", "quick_sm90"], (8, 0), "sm_90"),
        ([], (7, 5), "compute capability 8.0"),
    ],
)
def test_quick_tune_checks_its_arguments_before_any_gpu_work(argv, cap, match, monkeypatch, tmp_path):
    import argparse

    from quick.bench import tune

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx=None: cap)
    p = argparse.ArgumentParser()
    tune.add_arguments(p)
    with pytest.raises(SystemExit, match=match):
        tune.main(p.parse_args([*argv, "--out", str(tmp_path)]))
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(
    "raw,want", [(None, 8), ("", 8), ("0", 0), ("16", 16), (" 64 ", 64), ("on", 8), ("-3", 8), ("1.5", 8)]
)
def test_the_decode_switch_reads_the_environment_safely(raw, want, monkeypatch):
    """Unset or empty: the measured default; a bad value warns and keeps it; 0 turns the decode kernel off."""
    if raw is None:
        monkeypatch.delenv("QUICK_DEC_MAX_M", raising=False)
    else:
        monkeypatch.setenv("QUICK_DEC_MAX_M", raw)
    if raw is not None and raw.strip() not in ("", "0") and not raw.strip().isdigit():
        with pytest.warns(RuntimeWarning, match="not a non-negative integer"):
            assert tuning.env_max_m(default=8) == want
    else:
        assert tuning.env_max_m(default=8) == want
