"""Load the engines a worker serves, once, at start-up: reference -> plan -> engine or embedder.

Each engine is registered under the reference as given and under the planner's resolved name, so
a request naming either (an alias or its repo ID) reaches it.
"""

from __future__ import annotations

import logging

from ollm.engine.base import Engine
from ollm.settings import Settings
from workers.job import Embedder

log = logging.getLogger(__name__)


def load_models(references: list[str], settings: Settings) -> tuple[dict[str, Engine], dict[str, Embedder]]:
    from ollm.engine.threads import on_fresh_thread

    # On a thread that ends with the load: its OpenMP pool would otherwise slow every engine step.
    return on_fresh_thread(lambda: _load_models(references, settings), name="ollm-load-models")


def _load_models(references: list[str], settings: Settings) -> tuple[dict[str, Engine], dict[str, Embedder]]:
    from ollm.engine import load_engine
    from workers.memory import plan_for

    engines: dict[str, Engine] = {}
    embedders: dict[str, Embedder] = {}
    for reference in references:
        # The plan the worker's memory accounting uses too: its real batch size and prefill step.
        plan = plan_for(reference, settings)
        names = list(dict.fromkeys([reference, plan.resolved_reference]))
        log.info("loading %s (%s, %s on %s)", reference, plan.kind, plan.backend, plan.device)
        if plan.kind == "embedding":
            from ollm.engine import loader

            embedder: Embedder = loader.load_embedder(plan, settings)
            embedders.update(dict.fromkeys(names, embedder))
        else:
            engine = load_engine(plan, settings)
            engines.update(dict.fromkeys(names, engine))
    return engines, embedders
