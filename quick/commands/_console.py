"""The rich console the commands print their tables to."""

from __future__ import annotations

PIPE_WIDTH = 200  # piped or redirected output: wide enough that no table column is cut or wrapped


def make_console():
    """A :class:`rich.console.Console`; when stdout is not a terminal it gets :data:`PIPE_WIDTH` columns instead of
    rich's default of 80, which would cut table cells in logs and CI output."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=PIPE_WIDTH)
    return console
