"""The CLI answers help, version and argument errors quickly: building the parser imports no torch."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import pytest

from quick.cli import discover_commands, main

# run in a fresh interpreter: what `quick ...` imports, and how long it takes, before any command runs
_PROBE = """
import sys, time
t0 = time.perf_counter()
from quick.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
heavy = sorted(m for m in ("torch", "transformers", "rich", "matplotlib") if m in sys.modules)
print(f"PROBE rc={rc} s={time.perf_counter() - t0:.3f} heavy={','.join(heavy)}")
"""


def _probe(argv: list[str]) -> tuple[int, float, str, str]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("PROBE "))
    fields = dict(f.split("=", 1) for f in line.split()[1:])
    return int(fields["rc"]), wall, fields["heavy"], out.stdout + out.stderr


@pytest.mark.parametrize(
    "argv,code",
    [
        (["--help"], 0),
        (["--version"], 0),
        (["bench"], 0),
        (["bench", "e2e", "--help"], 0),
        (["demo", "--group-size", "48"], 2),
        (["no-such-command"], 2),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else str(v),
)
def test_help_and_usage_errors_are_fast_and_import_no_torch(argv, code):
    rc, wall, heavy, text = _probe(argv)
    assert rc == code, text
    assert heavy == "", f"`quick {' '.join(argv)}` imported {heavy}"
    assert wall < 2.0, f"`quick {' '.join(argv)}` took {wall:.2f} s"


@pytest.mark.parametrize("name", sorted(discover_commands()))
def test_every_command_help_imports_no_torch(name):
    rc, _wall, heavy, text = _probe([name, "--help"])
    assert rc == 0, text
    assert heavy == "", f"`quick {name} --help` imported {heavy}"


def test_bench_alone_prints_its_help(capsys):
    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    assert "usage: quick bench" in out and "e2e" in out


def test_bench_e2e_help_shows_every_default(capsys):
    assert main(["bench", "e2e", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    from quick.bench.cli_args import BATCHES, DEFAULT_VARIANT

    assert f"(default: {BATCHES})" in out and f"(default: ['{DEFAULT_VARIANT}'])" in out
    assert "(default: 128)" in out  # --prompt and --gen


def test_eval_perplexity_defaults_are_the_demos():
    cmds = discover_commands()
    parsers = {}
    for name in ("eval", "demo"):
        p = argparse.ArgumentParser()
        cmds[name].add_arguments(p)
        parsers[name] = p
    ev = parsers["eval"].parse_args(["some-model", "--ppl"])
    demo = parsers["demo"].parse_args([])
    assert (ev.seqlen, ev.max_tokens, ev.data) == (demo.seqlen, demo.max_tokens, demo.eval)


def test_piped_console_is_wide(capsys):
    from quick.commands._console import PIPE_WIDTH, make_console

    console = make_console()  # pytest captures stdout: not a terminal
    assert not console.is_terminal and console.width == PIPE_WIDTH
    from rich.table import Table

    table = Table()
    for col in ("model", "linears", "linear weights", "perplexity", "delta", "ppl time", "generate"):
        table.add_column(col)
    table.add_row("Q4_1 GGUF, dequantized", "210 dense", "202.5 MiB (float16)", "16.061", "", "20.1 s", "24 tok, 1.0 s")
    console.print(table)
    out = capsys.readouterr().out
    assert "Q4_1 GGUF, dequantized" in out and "202.5 MiB (float16)" in out  # no cell cut or wrapped


def test_eval_backend_reaches_every_4bit_layer():
    """`quick eval --backend reference` runs every 4-bit layer through dequantize-then-matmul (the numerics check of
    the kernels on the same device); the option parses and reaches W4A16 and W4A8 layers alike."""
    import torch
    from torch import nn

    from quick.commands.eval import set_backend
    from quick.nn.linear import QuickLinear
    from quick.nn.linear_w4a8 import QuickLinearW4A8

    lin = nn.Linear(256, 128)
    model = nn.Sequential(
        QuickLinear.from_linear(lin, 128, "quick", dtype=torch.float16), nn.ReLU(), QuickLinearW4A8.from_linear(lin)
    )
    assert set_backend(model, "reference") == 2
    assert [m.backend for m in (model[0], model[2])] == ["reference", "reference"]
    p = argparse.ArgumentParser()
    discover_commands()["eval"].add_arguments(p)
    assert p.parse_args(["m", "--ppl", "--backend", "reference"]).backend == "reference"
    assert p.parse_args(["m", "--ppl"]).backend == "auto"
    with pytest.raises(SystemExit):
        p.parse_args(["m", "--ppl", "--backend", "fast"])
