"""Runtime planning: reference -> how to run it (backend, device, dtype, specialization).

Planning reads config files only, never weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from ollm import catalogue
from ollm.catalogue import ModelKind
from ollm.devices import resolve_device, resolve_dtype
from ollm.errors import ModelNotFoundError, UnsupportedModelError
from ollm.references import ModelReference, parse_reference
from ollm.settings import RuntimeSettings
from ollm.specialization import SpecializationProvider, provider_for, providers

__all__ = ["ModelKind", "RuntimePlan", "SupportLevel", "plan_model"]

SupportLevel = Literal["optimized", "generic", "unsupported"]


class RuntimePlan(BaseModel):
    reference: str
    resolved_reference: str
    path: Path | None = Field(None, description="Materialized directory; None when not materialized.")
    materialized: bool
    kind: ModelKind
    architecture: str | None = None
    model_type: str | None = None
    support_level: SupportLevel
    backend: Literal["optimized-native", "transformers-generic", "echo"]
    specialization_state: Literal["applied", "planned", "not-applicable", "disabled"]
    specialization_provider: str | None = None
    planned_passes: list[str] = Field(default_factory=list)
    applied_passes: list[str] = Field(default_factory=list)
    device: str
    dtype: str
    batch_invariant: bool = False
    context_length: int | None = None
    fallback_reason: str | None = None


def plan_model(reference: str, runtime: RuntimeSettings) -> RuntimePlan:
    """Decide how ``reference`` would run under ``runtime``, without loading anything heavy.

    Raises InvalidReferenceError / ModelNotFoundError for references that cannot be resolved
    (ModelNotMaterializedError for a repo ID that was never pulled: there is no config to read),
    UnsupportedModelError when ``runtime.backend`` forces a backend that cannot run the model,
    and SettingsError for a device that does not exist here.
    """
    ref = parse_reference(reference)
    if catalogue.is_echo(ref):
        return _echo_plan(reference, runtime)
    facts = _model_facts(ref, runtime)
    device = resolve_device(runtime.device)
    plan = RuntimePlan(
        reference=reference,
        resolved_reference=ref.name,
        path=facts.path,
        materialized=facts.path is not None,
        kind=facts.kind,
        architecture=facts.architecture,
        model_type=facts.model_type,
        support_level="generic",
        backend="transformers-generic",
        specialization_state="not-applicable",
        device=device,
        dtype=resolve_dtype(runtime.dtype, device),
        batch_invariant=runtime.batch_invariant,
        context_length=facts.context_length,
    )
    unsupported = _unsupported_reason(facts)
    if unsupported is not None:
        plan.support_level = "unsupported"
        plan.fallback_reason = unsupported
        if runtime.backend != "auto":
            raise UnsupportedModelError(
                f"cannot run {reference!r} with backend {runtime.backend}: {unsupported}"
            )
        return plan
    _choose_backend(plan, provider_for(facts.model_type), runtime)
    return plan


class _ModelFacts(BaseModel):
    path: Path | None
    kind: ModelKind
    architecture: str | None
    model_type: str | None
    context_length: int | None


def _model_facts(ref: ModelReference, runtime: RuntimeSettings) -> _ModelFacts:
    path = catalogue.materialized_path(ref, runtime)
    if path is not None:
        config: dict[str, Any] = catalogue.read_json(path / "config.json") or {}
        architectures = config.get("architectures") or [None]
        return _ModelFacts(
            path=path,
            kind=catalogue.detect_kind(config, path),
            architecture=architectures[0],
            model_type=config.get("model_type"),
            context_length=catalogue.context_length(config, path),
        )
    entry = catalogue.find_alias(ref.name) if ref.kind == "alias" else None
    if entry is None:
        catalogue.require_materialized(ref, runtime)  # raises with the pull hint
        raise ModelNotFoundError(f"model {ref.raw!r} is not available")
    return _ModelFacts(
        path=None,
        kind=entry.kind,
        architecture=entry.architecture,
        model_type=entry.model_type,
        context_length=entry.context_length,
    )


def _unsupported_reason(facts: _ModelFacts) -> str | None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if facts.model_type is None:
        return "config.json has no model_type, so Transformers cannot build the model"
    if facts.model_type not in CONFIG_MAPPING_NAMES:
        return f"model_type {facts.model_type!r} is not known to the installed Transformers"
    return None


def _choose_backend(
    plan: RuntimePlan, provider: SpecializationProvider | None, runtime: RuntimeSettings
) -> None:
    if provider is not None:
        plan.specialization_provider = provider.name
        plan.planned_passes = list(provider.pass_ids)
    forced = runtime.backend
    if forced == "optimized-native":
        if not runtime.use_specialization:
            raise UnsupportedModelError(
                "backend optimized-native conflicts with use_specialization=false (--no-specialization)"
            )
        if provider is None:
            families = ", ".join(p.name for p in providers())
            raise UnsupportedModelError(
                f"no optimized-native provider applies to model_type {plan.model_type!r} "
                f"(providers exist for: {families}); use --backend auto or transformers-generic"
            )
        if provider.missing_passes():
            raise UnsupportedModelError(
                f"{provider.name} provider passes {provider.missing_passes()} are not implemented yet, so "
                f"optimized-native cannot run {plan.reference!r}; use --backend auto or transformers-generic"
            )
    if provider is None:
        return
    if not runtime.use_specialization:
        plan.specialization_state = "disabled"
        plan.fallback_reason = (
            "specialization disabled (use_specialization=false); running transformers-generic"
        )
    elif forced == "transformers-generic":
        plan.specialization_state = "disabled"
        plan.fallback_reason = "backend forced to transformers-generic"
    elif provider.missing_passes():
        plan.specialization_state = "planned"
        plan.fallback_reason = (
            f"{provider.name} provider passes {provider.missing_passes()} are not implemented yet; "
            "running transformers-generic"
        )
    else:
        plan.specialization_state = "planned"
        plan.support_level = "optimized"
        plan.backend = "optimized-native"


def _echo_plan(reference: str, runtime: RuntimeSettings) -> RuntimePlan:
    # echo has no weights: it runs on the host whatever device is configured.
    return RuntimePlan(
        reference=reference,
        resolved_reference=catalogue.ECHO_ALIAS,
        path=None,
        materialized=True,
        kind="echo",
        architecture=None,
        model_type=None,
        support_level="generic",
        backend="echo",
        specialization_state="not-applicable",
        device="cpu",
        dtype="float32",
        context_length=None,
        fallback_reason=(
            None
            if runtime.backend == "auto"
            else f"backend {runtime.backend} does not apply to echo; running echo"
        ),
    )
