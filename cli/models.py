"""Placeholder until its owner lands it."""

from cli.main import app  # noqa: F401
