"""Every ``QUICK_*`` environment setting, read here and nowhere else.

==================  ===========================  ================================================================
variable            default                      effect
==================  ===========================  ================================================================
``QUICK_KERNEL``    unset                        force a kernel where it can run: ``dec``, ``wgmma``, ``gemm`` or
                                                 ``gemv``; ``name@M`` only up to M rows; a comma-separated list is
                                                 tried in order (``dec@8,wgmma``). Other calls choose as usual.
``QUICK_AUTOTUNE``  ``1``                        ``0``: never time candidates at first use (table, then model)
``QUICK_TUNING``    ``1``                        ``0``: ignore the measured kernel tables
``QUICK_TUNING_DIR`` ``~/.cache/quick/tables``   the user's kernel tables (``quick tune``) and autotune cache
``QUICK_CACHE_DIR`` ``~/.cache/quick``           compiled kernels (cubins)
``QUICK_NVCC``      ``nvcc`` on ``PATH``         the CUDA compiler used to build kernels at first use
``QUICK_ATTN_KERNEL`` ``1``                      ``0``: PyTorch SDPA instead of the decode attention kernel
``QUICK_FUSIONS``   :data:`DEFAULT_FUSIONS`      decode-path fusions to use: ``all``, ``none`` or a comma-separated
                                                 subset of :data:`FUSIONS`
``QUICK_NO_TRANSFORMERS_HOOK`` unset             ``1``: ``import quick`` leaves transformers alone (then call
                                                 ``quick.register_with_transformers()`` by hand)
==================  ===========================  ================================================================

Values are read at call time (cheap ``os.environ`` lookups), so a test or a script can change them between calls.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

KERNEL_NAMES = ("dec", "wgmma", "gemm", "gemv")
# The fast decode step's kernel fusions (docs/decode_path.md): rotary + cache append in the attention kernel,
# act(gate) * up staged by the down projection, residual add + RMSNorm after the o / down projections,
# programmatic dependent launches, and the W4A8 q/k/v and gate/up activation quantization done by the RMSNorm
# before them (quick.models.normquant).
FUSIONS = ("rope", "act", "norm", "pdl", "normquant")
# All on unless switched off: their GPU tests pass and each pays end to end (measurements: docs/decode_path.md).
DEFAULT_FUSIONS: frozenset[str] = frozenset(FUSIONS)


def _flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    return default if raw is None or not raw.strip() else raw.strip() != "0"


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    return Path(os.environ.get("QUICK_CACHE_DIR") or Path.home() / ".cache" / "quick")


def nvcc() -> str | None:
    """An explicit compiler path, or None (then ``nvcc`` on ``PATH`` / ``CUDA_HOME``)."""
    return os.environ.get("QUICK_NVCC") or None


def tuning_dir() -> Path:
    """The user's kernel tables and the autotune cache."""
    return Path(os.environ.get("QUICK_TUNING_DIR") or Path.home() / ".cache" / "quick" / "tables")


def selection_key() -> tuple[str | None, ...]:
    """The raw values of the settings a kernel choice depends on (a memo of choices keys on them)."""
    env = os.environ
    return tuple(env.get(n) for n in ("QUICK_KERNEL", "QUICK_TUNING", "QUICK_TUNING_DIR", "QUICK_AUTOTUNE"))


def tables_enabled() -> bool:
    return _flag("QUICK_TUNING", True)


def autotune_enabled() -> bool:
    return _flag("QUICK_AUTOTUNE", True)


def transformers_hook_enabled() -> bool:
    return not _flag("QUICK_NO_TRANSFORMERS_HOOK", False)


def attention_kernel_enabled() -> bool:
    return _flag("QUICK_ATTN_KERNEL", True)


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def kernel_override() -> tuple[tuple[str, int], ...]:
    """``QUICK_KERNEL`` parsed: ``((kernel, max_m), ...)`` in order (``max_m`` 0 = any M). A malformed entry warns
    once and is skipped: a typo must not stop the model from running."""
    raw = os.environ.get("QUICK_KERNEL", "").strip()
    if not raw:
        return ()
    out = []
    for item in raw.split(","):
        name, _, bound = item.strip().partition("@")
        try:
            max_m = int(bound) if bound else 0
            if name not in KERNEL_NAMES or max_m < 0:
                raise ValueError
        except ValueError:
            _warn_once(f"QUICK_KERNEL entry {item.strip()!r} ignored: expected one of {KERNEL_NAMES}, optionally @M")
            continue
        out.append((name, max_m))
    return tuple(out)


def fusions() -> frozenset[str]:
    """The decode-path fusions switched on (``QUICK_FUSIONS``)."""
    raw = os.environ.get("QUICK_FUSIONS", "").strip().lower()
    if not raw:
        return DEFAULT_FUSIONS
    if raw == "all":
        return frozenset(FUSIONS)
    if raw == "none":
        return frozenset()
    names = {s.strip() for s in raw.split(",") if s.strip()}
    unknown = names - set(FUSIONS)
    if unknown:
        _warn_once(f"QUICK_FUSIONS: unknown {sorted(unknown)} ignored; known: {FUSIONS}, 'all', 'none'")
    return frozenset(names & set(FUSIONS))


def fusion_enabled(name: str) -> bool:
    if name not in FUSIONS:
        raise ValueError(f"unknown fusion {name!r}; known: {FUSIONS}")
    return name in fusions()
