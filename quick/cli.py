"""The ``quick`` command line. Subcommands are discovered from the modules of :mod:`quick.commands`.

A command is a module defining ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``;
dropping such a module into ``quick/commands/`` adds it to the CLI, so nobody has to edit this file.
Command modules should import heavy libraries inside ``run`` so that ``quick --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from types import ModuleType

REQUIRED = ("NAME", "HELP", "add_arguments", "run")
EXIT_LIBRARY_ERROR = 2


def version() -> str:
    """Installed distribution version, or the package's ``__version__`` when running from a checkout."""
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        return dist_version("quick-llm")
    except PackageNotFoundError:
        import quick

        return getattr(quick, "__version__", "0+unknown")


def discover_commands(package: str = "quick.commands") -> dict[str, ModuleType]:
    """``{NAME: module}`` for every command module of ``package``, sorted by name.

    A module that fails to import or lacks the interface is reported on stderr and skipped, so one
    broken command does not take the whole CLI down.
    """
    pkg = importlib.import_module(package)
    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_"):
            continue
        try:
            mod = importlib.import_module(f"{package}.{info.name}")
        except Exception as e:  # a broken command must not break the others
            print(f"quick: warning: skipping command module {info.name!r}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        missing = [a for a in REQUIRED if not hasattr(mod, a)]
        if missing:
            print(f"quick: warning: {info.name!r} is not a command (missing {', '.join(missing)})", file=sys.stderr)
            continue
        if mod.NAME in found:
            print(f"quick: warning: duplicate command name {mod.NAME!r} in {info.name!r}; skipped", file=sys.stderr)
            continue
        found[mod.NAME] = mod
    return dict(sorted(found.items()))


def build_parser(commands: dict[str, ModuleType] | None = None) -> argparse.ArgumentParser:
    commands = discover_commands() if commands is None else commands
    parser = argparse.ArgumentParser(
        prog="quick", description="QUICK for everyone: 4-bit LLM quantization with interleaved GPU kernels."
    )
    parser.add_argument("--version", action="version", version=f"quick {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in commands.items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _raised_in_quick(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc``'s traceback is code of the ``quick`` package (a deliberate check)."""
    import os

    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    pkg = os.path.dirname(os.path.abspath(__file__))
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(pkg + os.sep)


def is_library_error(exc: BaseException) -> bool:
    """Expected, user-facing failures: ValueError/RuntimeError subclasses defined in the ``quick`` package, any
    ValueError/TypeError that ``quick``'s own checks raise, and OS errors about files the user named. Anything
    else is a bug and keeps its traceback."""
    if isinstance(exc, (ValueError, RuntimeError)) and type(exc).__module__.split(".")[0] == "quick":
        return True
    if isinstance(exc, OSError):
        return True
    return isinstance(exc, (ValueError, TypeError)) and _raised_in_quick(exc)


def check_device(name: str | None) -> str | None:
    """``None`` when ``--device NAME`` can be used here, else the reason (checked before any model is loaded)."""
    if name is None or name == "auto":
        return None
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        return f"--device {name}: not a device (cpu, cuda, cuda:1, ...)"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device {name}: no CUDA device is available here (use --device cpu)"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here"
    elif dev.type != "cpu":
        return f"--device {name}: only cpu and cuda devices are supported"
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``quick`` script; returns the exit status instead of exiting."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    problem = check_device(getattr(args, "device", None))
    if problem:
        print(f"quick {args.command}: error: {problem}", file=sys.stderr)
        return EXIT_LIBRARY_ERROR
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("quick: interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, TypeError, OSError) as e:
        if not is_library_error(e):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"quick {args.command}: error: {message}", file=sys.stderr)
        return EXIT_LIBRARY_ERROR


if __name__ == "__main__":
    sys.exit(main())
