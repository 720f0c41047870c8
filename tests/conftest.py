"""Settings every test runs under: kernel choices that do not depend on timing, and no writes to the user's tables.

The compile check (``tests/test_compile.py``, every kernel variant through nvcc) is the longest test and uses no
Python: when it is selected, it starts as a subprocess right after collection, runs beside the other tests, and its
test is moved to the end of the run, where it waits for the subprocess and checks its report.

``QUICK_AUTOTUNE=0`` (the measured tables, then the model: the same kernel for a shape in every run and inside and
outside CUDA-graph capture) and ``QUICK_TUNING_DIR`` a folder of this test run (the user's tables and autotune
cache are neither read nor written). Tests about autotuning (marked ``autotune`` or with ``autotune`` in their name)
keep ``QUICK_AUTOTUNE`` as they set it and start from an empty folder of their own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

COMPILE_TEST = "test_every_variant_compiles_without_spills"
# the background compile check: {"proc": Popen, "log": Path}, filled when its test is selected and nvcc exists
COMPILE_RUN: dict = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "autotune: sets QUICK_AUTOTUNE itself; gets an empty QUICK_TUNING_DIR of its own"
    )


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    compile_items = [it for it in items if it.name == COMPILE_TEST]
    for it in compile_items:  # last: it waits for the check started below
        items.remove(it)
        items.append(it)


def pytest_collection_finish(session: pytest.Session) -> None:
    from helpers import have_nvcc

    if not any(it.name == COMPILE_TEST for it in session.items) or not have_nvcc():
        return
    fd, name = tempfile.mkstemp(prefix="quick_compile_check_", suffix=".log")
    os.close(fd)
    log = Path(name)
    with log.open("w") as f:
        # lowest CPU priority: the compilers take only what the tests leave idle (torch's spinning worker threads
        # slow down badly when they have to share cores)
        cmd = [sys.executable, "-m", "quick.kernels.compile_check"]
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(19))
    COMPILE_RUN.update(proc=proc, log=log)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    proc = COMPILE_RUN.get("proc")
    if proc is not None and proc.poll() is None:  # the run stopped early (-x, Ctrl-C): no orphan compiler
        proc.kill()
        proc.wait()
    if "log" in COMPILE_RUN:  # read by the test already (which prints it on failure)
        COMPILE_RUN["log"].unlink(missing_ok=True)


@pytest.fixture(scope="session")
def _session_tuning_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quick_tuning")


@pytest.fixture(autouse=True)
def _deterministic_kernel_choice(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, _session_tuning_dir: Path
) -> None:
    if request.node.get_closest_marker("autotune") is None and "autotune" not in request.node.name:
        monkeypatch.setenv("QUICK_AUTOTUNE", "0")
        monkeypatch.setenv("QUICK_TUNING_DIR", str(_session_tuning_dir))
    else:  # a cache written by an autotune test must not reach the user's folder nor the next test
        monkeypatch.setenv("QUICK_TUNING_DIR", str(request.getfixturevalue("tmp_path")))


@pytest.fixture(autouse=True)
def _restore_threads():
    """Tests that run on one thread must not leave it set: later tests compare against subprocesses that run with
    torch's default thread count, and the summation order (hence the last bits) follows the thread count."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
