"""Settings every test runs under: kernel choices that do not depend on timing, and no writes to the user's tables.

``QUICK_AUTOTUNE=0`` (the measured tables, then the model: the same kernel for a shape in every run and inside and
outside CUDA-graph capture) and ``QUICK_TUNING_DIR`` a folder of this test run (the user's tables and autotune
cache are neither read nor written). Tests about autotuning (marked ``autotune`` or with ``autotune`` in their name)
keep ``QUICK_AUTOTUNE`` as they set it and start from an empty folder of their own.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "autotune: sets QUICK_AUTOTUNE itself; gets an empty QUICK_TUNING_DIR of its own"
    )


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
