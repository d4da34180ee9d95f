"""Runtime planning: reference -> how to run it (backend, device, dtype, specialization).

Planning reads config files only, never weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

SupportLevel = Literal["optimized", "generic", "unsupported"]
ModelKind = Literal["causal-lm", "seq2seq", "image-text", "embedding", "echo"]


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
    context_length: int | None = None
    fallback_reason: str | None = None
