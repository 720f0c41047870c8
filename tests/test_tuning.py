"""Measured kernel tables (``quick/kernels/tuning.py``): format checks, lookup by batch bucket, the fallbacks, and the
choice that consults them (``quick.kernels.select``), the autotune cache. CPU only: the device name is monkeypatched."""

from __future__ import annotations

import json

import pytest
import torch

from quick.kernels import autotune, select, tuning
from quick.kernels import decode as qd
from quick.kernels import mma as qm
from quick.kernels import wgmma as sm

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
    monkeypatch.setattr(qm, "capability", lambda dev: (9, 0))
    monkeypatch.setattr(qm, "num_sms", lambda dev: 132)
    monkeypatch.setattr(sm, "is_available", lambda dev=None: True)
    monkeypatch.setenv("QUICK_AUTOTUNE", "0")
    monkeypatch.delenv("QUICK_KERNEL", raising=False)
    select.clear()
    (tmp_path / f"{tuning.gpu_key(GPU)}.json").write_text(json.dumps(TABLE))
    yield tmp_path
    select.clear()


def pick(m, n=14336, k=4096, layout="quick_sm90", dtype=torch.float16) -> select.Choice:
    return select.choose(select.Problem(layout, m, n, k, 128, dtype, DEV))


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


def test_choice_follows_the_table_then_the_model(table_dir):
    c = pick(40)
    assert (c.kernel, c.config, c.splits, c.source) == ("dec", qd.DecConfig(2, 1, 4, nw=8), 8, "table")
    c = pick(200)
    assert (c.kernel, c.config, c.splits, c.source) == ("wgmma", sm.Sm90Config(256, 2, 4, 4, 4, 0), 3, "table")
    # an unmeasured shape: the model (the wgmma GEMM's tuned config above 8 rows, the decode kernel up to 8)
    c = pick(40, n=4096)
    assert (c.kernel, c.config, c.source) == ("wgmma", sm.tuned_config(40, torch.float16)[0], "model")
    assert pick(4, n=4096).kernel == "dec" and pick(4, n=4096).source == "model"
    # a decode entry never runs where the decode kernel cannot (N not a multiple of its 256 channels)
    t = json.loads(json.dumps(TABLE))
    t["entries"] = [_entry(64, "dec", {"rb": 2, "warps": 1, "stages": 4, "nw": 8}, 8, n=4096 + 128)]
    (table_dir / f"{tuning.gpu_key(GPU)}.json").write_text(json.dumps(t))
    select.clear()
    assert pick(40, n=4096 + 128).kernel == "wgmma"


def test_the_override_comes_first(table_dir, monkeypatch):
    """QUICK_KERNEL=dec@64 forces the decode kernel with its default config up to 64 rows, before the table."""
    monkeypatch.setenv("QUICK_KERNEL", "dec@64")
    c = pick(40)
    assert (c.kernel, c.config, c.splits, c.source) == ("dec", None, None, "override")
    assert pick(100).config == sm.Sm90Config(256, 2, 4, 4, 4, 0)  # beyond its M: the table's M = 256 entry
    monkeypatch.setenv("QUICK_KERNEL", "wgmma")
    assert pick(1).kernel == "wgmma" and pick(1).source == "override"
    monkeypatch.delenv("QUICK_KERNEL")
    # the table first: its M = 64 entry's config and splits, not the decode kernel's defaults
    c = pick(40)
    assert (c.kernel, c.config, c.splits) == ("dec", qd.DecConfig(2, 1, 4, 0, 8), 8)
    assert pick(4, n=8192).source == "model"  # no entry for this shape


def test_reasons_say_why_a_kernel_cannot_run(table_dir):
    p = select.Problem("quick_sm90", 100, 4096, 4096, 128, torch.float16, DEV)
    why = dict(select.reasons(p))
    assert "1 <= M <= 64" in why["dec"] and why["wgmma"] == "ok"
    assert select.explain(p)[-1][0] == "chosen"
    with pytest.raises(ValueError, match="no kernels for layout"):
        select.kernels_for("awq_gemm")


def test_a_config_from_another_version_is_ignored_with_a_warning(table_dir):
    t = json.loads(json.dumps(TABLE))
    t["entries"] = [_entry(64, "wgmma", {"nt": 64, "no_such_field": 1}, 2)]
    (table_dir / f"{tuning.gpu_key(GPU)}.json").write_text(json.dumps(t))
    select.clear()
    c = pick(64)
    assert (c.kernel, c.config, c.source) == ("wgmma", sm.tuned_config(64, torch.float16)[0], "model")


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
    from quick.kernels import mma as qm

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


def test_quick_layout_choice_follows_the_table(table_dir, monkeypatch):
    t = json.loads(json.dumps(TABLE))
    t["entries"] = [
        _entry(4, "gemv", {"name": "v8"}, 2, layout="quick"),
        _entry(16, "dec", {"rb": 1, "warps": 8, "stages": 6, "wb": 1}, 3, layout="quick"),
        _entry(64, "gemm", {"name": "m16n2k4"}, 4, layout="quick"),
        _entry(4096, "gemm", {}, None, layout="quick"),
    ]
    (table_dir / f"{tuning.gpu_key(GPU)}.json").write_text(json.dumps(t))
    select.clear()

    def q(m, n=14336):
        c = pick(m, n, layout="quick")
        return c.kernel, c.config, c.splits

    assert q(3) == ("gemv", "v8", 2)
    assert q(9) == ("dec", qd.DecConfig(1, 8, 6, wb=1), 3)
    assert q(40) == ("gemm", "m16n2k4", 4)
    assert q(1000) == ("gemm", None, None)
    assert q(3, 4096) == ("dec", None, None)  # not measured: the model (decode kernel up to 8 rows)
    assert q(40, 4096) == ("gemm", None, None)
    monkeypatch.setenv("QUICK_KERNEL", "dec")  # set by the user: before the table
    assert q(3) == ("dec", None, None)


def test_autotune_entries_are_read_back_and_survive_a_new_process(table_dir, monkeypatch):
    """A choice timed at first use is recorded on disk per GPU and read before the model by a fresh process; a
    corrupt file warns and is ignored."""
    monkeypatch.setenv("QUICK_AUTOTUNE", "1")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    p = select.Problem("quick_sm90", 24, 4096, 4096, 128, torch.float16, DEV)
    cands = select.candidates(p)
    assert cands[0] == select._model(p) and len(cands) == len(set(cands)) <= select.MAX_CANDIDATES
    assert {c.kernel for c in cands} == {"dec", "wgmma"}  # both kernels take M = 24
    want = cands[3]
    monkeypatch.setattr(autotune, "time_candidates", lambda run, cs, *a: [20.0 if c != want else 11.0 for c in cs])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda idx=None: GPU)
    got = select.choose(p, tensors=(None, None, None, None))
    assert (got.kernel, got.config, got.splits, got.source) == (want.kernel, want.config, want.splits, "autotune")
    path = table_dir / f"{tuning.gpu_key(GPU)}.autotune.json"
    entry = json.loads(path.read_text())["entries"][0]
    assert (entry["M"], entry["K"], entry["N"], entry["dtype"]) == (32, 4096, 4096, "float16")  # the bucket of 24
    select.clear()  # a new process: memory gone, the file stays
    monkeypatch.setattr(autotune, "time_candidates", lambda *a: pytest.fail("timed again"))
    again = select.choose(select.Problem("quick_sm90", 17, 4096, 4096, 128, torch.float16, DEV), (None,) * 4)
    assert (again.kernel, again.config, again.splits, again.source) == (want.kernel, want.config, want.splits,
                                                                         "autotune")  # fmt: skip
    path.write_text("{not json")
    select.clear()
    with pytest.warns(RuntimeWarning, match="ignoring the autotune cache"):
        assert select.choose(p).source == "model"


def test_nothing_is_timed_during_graph_capture_or_when_switched_off(table_dir, monkeypatch):
    monkeypatch.setattr(autotune, "time_candidates", lambda *a: pytest.fail("must not time"))
    p = select.Problem("quick_sm90", 24, 4096, 4096, 128, torch.float16, DEV)
    assert select.choose(p, (None,) * 4).source == "model"  # QUICK_AUTOTUNE=0 in the fixture
    monkeypatch.setenv("QUICK_AUTOTUNE", "1")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert select.choose(p, (None,) * 4).source == "model"


def test_autotune_bucket_is_the_next_power_of_two():
    assert [autotune.bucket(m) for m in (1, 2, 3, 8, 9, 1000, 1024, 1025)] == [1, 2, 4, 8, 16, 1024, 1024, 2048]


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
    "raw,want",
    [(None, ()), ("", ()), ("dec", (("dec", 0),)), ("dec@8, wgmma", (("dec", 8), ("wgmma", 0))), ("mma", ()),
     ("dec@x,gemm", (("gemm", 0),)), ("dec@-1", ())],
)  # fmt: skip
def test_the_kernel_override_reads_the_environment_safely(raw, want, monkeypatch):
    """Unset or empty: no override; a bad entry warns and is skipped, the rest still applies."""
    from quick import settings

    if raw is None:
        monkeypatch.delenv("QUICK_KERNEL", raising=False)
    else:
        monkeypatch.setenv("QUICK_KERNEL", raw)
    settings._WARNED.clear()
    if raw and len(want) != len(raw.split(",")):
        with pytest.warns(RuntimeWarning, match="QUICK_KERNEL entry"):
            assert settings.kernel_override() == want
    else:
        assert settings.kernel_override() == want


def test_time_candidates_checks_each_against_the_models_pick(monkeypatch):
    """Timing at first use on stand-in CUDA events (CPU): a candidate that fails, writes NaN or disagrees with the
    model's pick (the first) gets None; if the model's pick itself fails, nothing is timed."""

    class Event:
        clock = [0.0]

        def __init__(self, enable_timing=True):
            self.t = 0.0

        def record(self):
            Event.clock[0] += 1.0
            self.t = Event.clock[0]

        def elapsed_time(self, end):
            return end.t - self.t

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(autotune, "FLUSH_BYTES", 16)
    ref = torch.randn(4, 8)

    def run(c, out):
        if c == "fails":
            raise RuntimeError("no variant")
        out.copy_({"nan": torch.full_like(ref, float("nan")), "off": ref * 1.5}.get(c, ref + 1e-4 * (c == "close")))
        return out

    times = autotune.time_candidates(run, ["model", "close", "fails", "nan", "off"], (4, 8), torch.float32, "cpu")
    assert times[0] is not None and times[1] is not None and times[2:] == [None, None, None]
    with pytest.warns(RuntimeWarning):
        autotune.time_candidates(run, ["model", "fails"], (4, 8), torch.float32, "cpu")
    assert autotune.time_candidates(run, ["fails", "model"], (4, 8), torch.float32, "cpu") == [None, None]
    assert autotune.time_candidates(run, ["nan", "model"], (4, 8), torch.float32, "cpu") == [None, None]


@pytest.mark.parametrize("kernel", ["gemm", "gemv"])
@pytest.mark.parametrize(("k", "group", "want"), [(192, 192, -1), (4096, 4096, -1), (4096, 128, 128), (128, 128, -1)])
def test_quick_layout_launches_get_the_group_size_their_launchers_take(kernel, k, group, want, monkeypatch):
    """The problem holds the resolved group size (K when per-channel); the ``quick`` launchers take -1 for that."""
    seen = []
    monkeypatch.setattr(qm, "_run", lambda kind, x, q, s, z, g, *a: seen.append((kind, g)))
    p = select.Problem("quick", 4, 256, k, group, torch.float16, DEV)
    select.KERNELS[kernel].run(p, select.Choice(kernel), None, (None, None, None), None, None)
    assert seen == [(kernel, want)]


def test_autotune_cache_of_another_format_is_timed_again(tmp_path):
    """Entries timed by an older format (eager launches, host cost included) are not trusted: the file is ignored."""
    entry = {"layout": "quick_sm90", "K": 768, "N": 2048, "M": 64, "group_size": 128, "dtype": "float16",
             "kernel": "dec", "config": {}, "splits": 4, "us": 28.8}  # fmt: skip
    old, new = tmp_path / "old.autotune.json", tmp_path / "new.autotune.json"
    old.write_text(json.dumps({"gpu": GPU, "entries": [entry]}))
    new.write_text(json.dumps({"format": autotune.FORMAT, "gpu": GPU, "entries": [entry]}))
    autotune.clear_memory()
    try:
        assert autotune._load(old) == {}
        assert list(autotune._load(new).values()) == [entry]
    finally:
        autotune.clear_memory()


def test_wgmma_candidates_add_64_channel_tiles_only_on_narrow_layers():
    """Where 128-channel tiles leave most SMs idle (few tiles at this M), one-warpgroup tiles are timed too."""
    kern = select.KERNELS["wgmma"]
    dev = torch.device("cuda", 0)

    def nwgs(k, n, m):
        p = select.Problem("quick_sm90", m, n, k, 128, torch.float16, dev)
        return {c.config.nwg for c in kern.candidates(p, 132)}

    assert 1 in nwgs(768, 2048, 128) and 1 in nwgs(2048, 1536, 64)
    assert 1 not in nwgs(4096, 11008, 1024) and 1 not in nwgs(4096, 22016, 256)
    assert 1 not in nwgs(768, 2048, 16)  # below 64 rows the decode kernel and the split variants cover it


def test_chosen_lists_the_choices_of_one_batch_size():
    """What benchmarks record per case: the choice made for each layer shape at that M, of the given layouts only."""
    dev = torch.device("cpu")
    a = select.Problem("quick_sm90", 64, 4096, 4096, 128, torch.float16, dev)
    b = select.Problem("w4a8_sm90", 64, 11008, 4096, 128, torch.float16, dev)
    c = select.Problem("quick_sm90", 1, 4096, 4096, 128, torch.float16, dev)
    select.clear()
    try:
        for p, name in ((a, "wgmma"), (b, "w4a8_wgmma"), (c, "dec")):
            select._CHOSEN[(p, ())] = select.Choice(name, source="autotune")
        assert select.chosen(64) == {
            "quick_sm90 4096x4096 float16": "wgmma[default] splits=auto (autotune)",
            "w4a8_sm90 4096x11008 float16": "w4a8_wgmma[default] splits=auto (autotune)",
        }
        assert list(select.chosen(64, {"quick_sm90"})) == ["quick_sm90 4096x4096 float16"]
        assert select.chosen(64, set()) == {} and list(select.chosen(1)) == ["quick_sm90 4096x4096 float16"]
    finally:
        select.clear()


@pytest.mark.parametrize(("value", "uncached"), [(None, False), ("0", False), ("1", True)])
def test_autotune_does_not_capture_without_the_caching_allocator(monkeypatch, value, uncached):
    """With PyTorch's caching allocator off (compute-sanitizer runs) a capture would call cudaMalloc: time eagerly."""
    from quick.kernels import autotune

    if value is None:
        monkeypatch.delenv("PYTORCH_NO_CUDA_MEMORY_CACHING", raising=False)
    else:
        monkeypatch.setenv("PYTORCH_NO_CUDA_MEMORY_CACHING", value)
    assert autotune._uncached_allocator() is uncached
