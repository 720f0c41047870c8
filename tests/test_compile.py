"""The compile check: every kernel variant the package launches builds for sm_80 and sm_90a with no spills.

Runs wherever nvcc exists (CI has it; no GPU needed) and skips otherwise. Marked ``compile`` so that a quick
local run can deselect it with ``-m "not compile"``; it takes about five minutes on two cores with a cold cache
(~860 builds), in a subprocess that ``conftest.py`` starts after collection so that it runs beside the other tests
(this test comes last and waits for it).
"""

from __future__ import annotations

import pytest
from helpers import have_nvcc

from quick.kernels import compile_check

pytestmark = pytest.mark.compile


@pytest.mark.skipif(not have_nvcc(), reason="nvcc not found")
def test_every_variant_compiles_without_spills(capsys):
    from conftest import COMPILE_RUN

    proc = COMPILE_RUN.get("proc")
    if proc is not None:  # started by conftest after collection, ran beside the other tests
        rc = proc.wait(timeout=3600)
        out = COMPILE_RUN["log"].read_text()
    else:
        rc = compile_check.main([])
        out = capsys.readouterr().out
    assert rc == 0, out[-20000:]
    assert "all clean" in out
    for kernel in ("quick_gemm", "quick_gemv", "quick_splitk_reduce"):
        assert kernel in out


def test_ptxas_log_parser():
    log = (
        "ptxas info    : Compiling entry function 'quick_gemm' for 'sm_90a'\n"
        "ptxas info    : Function properties for quick_gemm\n"
        "    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads\n"
        "ptxas info    : Used 128 registers, used 1 barriers, 1024 bytes smem, 400 bytes cmem[0]\n"
    )
    (r,) = compile_check.parse_ptxas(log)
    assert (r.name, r.registers, r.spill_bytes, r.stack, r.smem) == ("quick_gemm", 128, 28, 8, 1024)
