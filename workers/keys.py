"""Every Redis name ollm uses, in one place, so the server and the workers always agree.

All keys and channels start with the configured namespace; RQ's own keys all start with ``rq:``,
and a namespace of ``rq`` is refused, so the two never collide.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ollm.errors import InvalidRequestError, SettingsError

# Ids a client sends back (response and session ids): what ollm itself issues (``resp_<hex>``,
# ``sess_<hex>``) and any similar token, never a pattern, a separator or a path.
_CLIENT_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def client_id(value: str, what: str) -> str:
    """``value`` when it is a well-formed id; else a 400, before it becomes part of any key."""
    if not _CLIENT_ID.fullmatch(value):
        raise InvalidRequestError(
            f"{value[:64]!r} is not a valid {what} id (letters, digits, _ and -, at most 128)", param=f"{what}_id"
        )
    return value


@dataclass(frozen=True)
class Keys:
    namespace: str = "ollm"

    def __post_init__(self) -> None:
        if not self.namespace or self.namespace == "rq":
            raise SettingsError(
                f"redis.namespace {self.namespace!r} would collide with RQ's keys; pick another"
            )

    def queue(self, model: str) -> str:
        """The RQ queue name for one served model reference (RQ stores it under ``rq:queue:``)."""
        return f"{self.namespace}:model:{model}"

    def events(self, job_id: str) -> str:
        """Pub/sub channel the worker publishes one job's events on."""
        return f"{self.namespace}:events:{job_id}"

    @property
    def cancel_channel(self) -> str:
        """Pub/sub channel every worker listens on for request ids to cancel."""
        return f"{self.namespace}:cancel"

    def cancelled(self, job_id: str) -> str:
        """Marker set before a cancel is published, for a job no worker had picked up yet."""
        return f"{self.namespace}:cancelled:{job_id}"

    def worker(self, name: str) -> str:
        return f"{self.namespace}:worker:{name}"

    @property
    def workers(self) -> str:
        """Set of worker names; members whose heartbeat key expired are pruned by readers."""
        return f"{self.namespace}:workers"

    def response(self, response_id: str) -> str:
        return f"{self.namespace}:response:{client_id(response_id, 'response')}"

    def session(self, session_id: str) -> str:
        return f"{self.namespace}:session:{client_id(session_id, 'session')}"

    # -- keep-alive and derived models (the Ollama /api family) -----------------------------------

    def keep_alive(self, model: str) -> str:
        """The keep-alive a client last asked for on ``model`` (JSON: seconds, or null for forever)."""
        return f"{self.namespace}:keep_alive:{model}"

    @property
    def residency_channel(self) -> str:
        """Pub/sub channel telling workers to load or unload a model now ({"model", "action"})."""
        return f"{self.namespace}:residency"

    def loaded(self, host: str, pid: int) -> str:
        """Hash of the models one worker process holds in memory (model -> JSON size/expires_at)."""
        return f"{self.namespace}:loaded:{host}:{pid}"

    @property
    def derived_models(self) -> str:
        """Hash of models created with /api/create: name -> JSON definition over a base model."""
        return f"{self.namespace}:derived_models"
