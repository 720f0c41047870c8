"""CLI subcommands, one module each (``NAME``, ``HELP``, ``add_arguments(parser)``, ``run(args) -> int``).

:mod:`quick.cli` discovers them with :func:`pkgutil.iter_modules`; modules whose name starts with ``_``
are helpers, not commands.
"""
