"""Imports every command module so that each registers itself on the app."""

from cli import generate, models, serve, system  # noqa: F401
