"""Measured kernel choices per (GPU, layout, K, N, M): the tables the automatic routes consult first.

A table is a JSON file in ``quick/kernels/tables/`` named after the GPU (:func:`gpu_key`), written by
``quick tune`` (:mod:`quick.bench.tune`) on that GPU, or kept from the first-use autotune's cache (same format; the
tables' README says which), and committed::

    {"gpu": <device name>, "torch": <version>, "date": <YYYY-MM-DD>, "group_size": 128,
     "entries": [{"layout": "quick_sm90", "K": 4096, "N": 14336, "M": 1024,
                  "kernel": "wgmma", "config": {"nt": 128, ...}, "splits": 1, "us": <measured time>,
                  "candidates": <how many were timed>}, ...]}

``M`` is the largest batch an entry covers: a call with M tokens takes the entry of the smallest measured M >= its
own (the batch sizes are powers of two and timing grows with M), or the largest one up to twice its M (further out
a measured split count could cost more than it saves, so the heuristics decide). Only what was measured is used:
another K, N, layout or group size gets ``None`` and the selection layer's next step (the autotune cache, then its
model). Entries were
timed in fp16 and are used for bf16 as well (same instructions but for the 16-bit type; bf16 is checked for
correctness with every config, not timed). Tables are searched in the user's folder first (``quick tune`` writes
there: ``$QUICK_TUNING_DIR`` or ``~/.cache/quick/tables``), then in the package. ``QUICK_TUNING=0`` turns them off.
"""

from __future__ import annotations

import json
import re
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quick import settings

TABLE_DIR = Path(__file__).resolve().parent / "tables"
# kernels per layout; config fields: the dataclass fields of Sm90Config / DecConfig, {"name": ...} for gemm / gemv
KERNELS = {"quick_sm90": ("wgmma", "dec"), "quick": ("gemm", "gemv", "dec")}


class TuningTableError(ValueError):
    """A table file that does not follow the format above."""


@dataclass(frozen=True)
class Choice:
    """One measured winner: ``kernel`` (per layout, :data:`KERNELS`), its config fields and split count."""

    kernel: str
    config: dict = field(default_factory=dict, hash=False)
    splits: int | None = None
    us: float | None = None


def gpu_key(name: str) -> str:
    """File stem for a device name: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def user_folder() -> Path:
    """Where ``quick tune`` writes by default: ``$QUICK_TUNING_DIR``, else ``~/.cache/quick/tables``."""
    return settings.tuning_dir()


def _folders() -> tuple[Path, ...]:
    """Searched in order: the user's folder (a table measured on this machine), then the package's tables."""
    return (user_folder(), TABLE_DIR)


def parse_table(data: object, source: str = "table") -> dict[tuple[str, int, int], list[tuple[int, Choice]]]:
    """Validate a loaded table; returns ``{(layout, K, N): [(M, Choice), ...] sorted by M}``."""
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise TuningTableError(f"{source}: expected an object with an 'entries' list")
    if data.get("group_size", 128) != 128:
        raise TuningTableError(f"{source}: only group size 128 tables are read, got {data.get('group_size')}")
    out: dict[tuple[str, int, int], list[tuple[int, Choice]]] = {}
    for i, e in enumerate(data["entries"]):
        try:
            layout, k, n, m, kernel = e["layout"], int(e["K"]), int(e["N"]), int(e["M"]), e["kernel"]
            config, splits = e.get("config") or {}, e.get("splits")
        except (TypeError, KeyError, ValueError) as err:
            raise TuningTableError(f"{source}: entry {i} is missing or has a bad field ({err!r})") from None
        if kernel not in KERNELS.get(layout, ()):
            raise TuningTableError(f"{source}: entry {i}: kernel {kernel!r} is not one of {KERNELS.get(layout)}")
        if min(k, n, m) <= 0 or not isinstance(config, dict) or not (splits is None or int(splits) >= 1):
            raise TuningTableError(f"{source}: entry {i} has a bad shape, config or split count")
        choice = Choice(kernel, dict(config), None if splits is None else int(splits), e.get("us"))
        out.setdefault((layout, k, n), []).append((m, choice))
    for rows in out.values():
        rows.sort(key=lambda r: r[0])
    return out


_TABLES: dict[str, dict | None] = {}
_LOCK = threading.Lock()


def load(key: str) -> dict[tuple[str, int, int], list[tuple[int, Choice]]] | None:
    """The parsed table for GPU ``key`` (cached), or None if there is none. A corrupt file warns once and is
    ignored: the heuristics still give a correct, if slower, choice."""
    folders = _folders()
    cache_key = f"{folders}/{key}"
    if cache_key in _TABLES:
        return _TABLES[cache_key]
    with _LOCK:
        table = None
        for path in (f / f"{key}.json" for f in folders):
            if not path.is_file():
                continue
            try:
                table = parse_table(json.loads(path.read_text()), str(path))
                break
            except (OSError, json.JSONDecodeError, TuningTableError) as err:
                warnings.warn(f"ignoring the kernel tuning table {path}: {err}", RuntimeWarning, stacklevel=2)
        _TABLES[cache_key] = table
        return table


def clear_cache() -> None:
    _TABLES.clear()
    _LOOKUPS.clear()


_LOOKUPS: dict[tuple, Choice | None] = {}


def lookup(layout: str, device: torch.device, m: int, n: int, k: int, group_size: int) -> Choice | None:
    """The measured choice for this call, or None (no table for the GPU, shape not measured, group size not 128,
    tables turned off)."""
    if not settings.tables_enabled() or group_size != 128 or m <= 0:
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    key = (layout, idx, m, n, k, str(settings.tuning_dir()))
    hit = _LOOKUPS.get(key, False)
    if hit is not False:
        return hit
    table = load(gpu_key(torch.cuda.get_device_name(idx)))
    choice = None
    if table is not None:
        rows = table.get((layout, k, n))
        if rows and m <= 2 * rows[-1][0]:  # far beyond the measured batches the heuristics decide (splits, tiles)
            choice = next((c for mm, c in rows if mm >= m), rows[-1][1])
    if len(_LOOKUPS) > 65536:
        _LOOKUPS.clear()
    _LOOKUPS[key] = choice
    return choice


_WARNED: set[tuple] = set()


def make_config(cls: type, choice: Choice) -> object | None:
    """``cls(**choice.config)``, or None (with one warning per distinct config) when the table's fields do not fit
    ``cls`` (a table written by another version): the caller then keeps its heuristic."""
    try:
        return cls(**choice.config)
    except (TypeError, ValueError) as err:
        key = (cls.__name__, tuple(sorted(choice.config.items())))
        if key not in _WARNED:
            _WARNED.add(key)
            msg = f"tuning table config {choice.config} does not fit {cls.__name__}: {err}"
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return None


def build_table(rows: list[dict], gpu: str, torch_version: str, date: str) -> dict:
    """The table for one tuning run: per (layout, K, N, M) the fastest row that passed its correctness check.

    ``rows``: ``{"layout", "K", "N", "M", "kernel", "config": {...}, "splits", "us", "ok"}`` per timed candidate
    (``ok`` False or a missing ``us`` drops it). Entries record how many candidates were timed."""
    best: dict[tuple, dict] = {}
    count: dict[tuple, int] = {}
    for r in rows:
        if not r.get("ok") or not isinstance(r.get("us"), (int, float)) or r["us"] <= 0:
            continue
        key = (r["layout"], int(r["K"]), int(r["N"]), int(r["M"]))
        count[key] = count.get(key, 0) + 1
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    entries = [
        {
            "layout": key[0],
            "K": key[1],
            "N": key[2],
            "M": key[3],
            "kernel": r["kernel"],
            "config": dict(r.get("config") or {}),
            "splits": r.get("splits"),
            "us": round(float(r["us"]), 2),
            "candidates": count[key],
        }
        for key, r in sorted(best.items())
    ]
    table = {"gpu": gpu, "torch": torch_version, "date": date, "group_size": 128, "entries": entries}
    parse_table(table, "build_table")  # what is written must load
    return table
