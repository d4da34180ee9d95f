"""The errors ollm raises on purpose; each carries the HTTP status it maps to and says what to do."""

from __future__ import annotations


class OllmError(Exception):
    """Base for errors a user can act on. ``status`` is the HTTP status the server answers with."""

    status: int = 500
    code: str = "internal_error"
    kind: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class SettingsError(OllmError):
    status = 400
    code = "invalid_settings"
    kind = "invalid_request_error"


class InvalidRequestError(OllmError):
    status = 400
    code = "invalid_request"
    kind = "invalid_request_error"


class InvalidReferenceError(InvalidRequestError):
    """A model reference that cannot be used (provider-prefixed, malformed)."""

    code = "invalid_model_reference"


class ModelNameClashError(InvalidReferenceError):
    """A name that means two models: a built-in alias and a directory in models_dir."""

    status = 409
    code = "model_name_clash"


class ModelNotFoundError(OllmError):
    status = 404
    code = "model_not_found"
    kind = "invalid_request_error"


class ModelNotMaterializedError(ModelNotFoundError):
    code = "model_not_materialized"


class UnsupportedModelError(InvalidRequestError):
    code = "unsupported_model"


class MemoryBudgetError(UnsupportedModelError):
    """The model cannot run within runtime.memory_budget (the plan's numbers say why)."""

    code = "memory_budget_exceeded"


class PullError(OllmError):
    status = 502
    code = "pull_failed"
    kind = "server_error"


class ContextLengthError(InvalidRequestError):
    code = "context_length_exceeded"


class ServiceUnavailableError(OllmError):
    status = 503
    code = "service_unavailable"
    kind = "server_error"


class GenerationTimeoutError(OllmError):
    status = 504
    code = "timeout"
    kind = "server_error"


class GenerationFailedError(OllmError):
    status = 500
    code = "generation_failed"
    kind = "server_error"
