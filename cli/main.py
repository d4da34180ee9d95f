"""The `ollm` command: one typer app; each command group lives in its own module."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="ollm",
    help="Run Hugging Face Transformers models locally and serve them.",
    no_args_is_help=False,
    add_completion=False,
)


def main() -> None:
    from cli import commands  # noqa: F401  (registers every command on `app`)

    app()
