"""Inference engines: one interface, many concurrent requests (see base.Engine)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ollm.engine.base import Engine
    from ollm.plan import RuntimePlan
    from ollm.settings import Settings


def load_engine(plan: RuntimePlan, settings: Settings) -> Engine:
    """The engine a plan asks for. Echo has no weights and is built without importing torch or
    transformers (seconds of start-up and of exit), so an echo-only worker starts at once; every
    other kind goes through ``ollm.engine.loader``."""
    if plan.kind == "echo":
        from ollm.engine.echo import EchoEngine

        return EchoEngine(plan)
    from ollm.engine import loader

    return loader.load_engine(plan, settings)
