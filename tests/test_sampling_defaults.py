"""Where a request's unset sampling fields come from: the client, a derived model, the configured
[generation] settings, the model's generation_config.json, then Ollama's defaults."""

from __future__ import annotations

import json
from pathlib import Path

from ollm.derived import DerivedModel, apply
from ollm.generation import ChatMessage, GenerationRequest
from ollm.sampling_defaults import (
    configured_fields,
    effective_defaults,
    model_recommended,
    sampling_params,
    with_model_defaults,
)
from ollm.settings import GenerationSettings, load_settings


def _model(tmp_path: Path, **config: object) -> Path:
    (tmp_path / "generation_config.json").write_text(json.dumps(config), encoding="utf-8")
    return tmp_path


def test_ollamas_defaults_when_nothing_else_says() -> None:
    params = sampling_params(GenerationSettings())
    assert (params.temperature, params.top_k, params.top_p) == (0.8, 40, 0.9)
    assert (params.repetition_penalty, params.repeat_last_n) == (1.1, 64)


def test_the_models_recommendations_fill_only_what_nobody_chose(tmp_path: Path) -> None:
    recommended = model_recommended(_model(tmp_path, temperature=1.0, top_p=1.0, top_k=0, eos_token_id=2))
    assert recommended == {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
    defaults = load_settings({"generation": {"top_k": 5}}).generation
    params = sampling_params(defaults, top_p=0.5)
    out = with_model_defaults(params, recommended, configured_fields(defaults))
    # The model's temperature; the client's top_p; the configured top_k.
    assert (out.temperature, out.top_p, out.top_k) == (1.0, 0.5, 5)
    assert out.model_fields_set == {"top_p"}


def test_a_derived_models_parameters_win_over_the_models_file(tmp_path: Path) -> None:
    request = GenerationRequest(
        model="d", messages=[ChatMessage(role="user", content="hi")], sampling=sampling_params(GenerationSettings())
    )
    derived = apply(request, DerivedModel(name="d", base="b", parameters={"temperature": 0.3}))
    out = with_model_defaults(derived.sampling, {"temperature": 1.0, "top_p": 0.95}, set())
    assert (out.temperature, out.top_p) == (0.3, 0.95)


def test_do_sample_false_recommends_nothing_and_effective_defaults_show_the_order(tmp_path: Path) -> None:
    assert model_recommended(_model(tmp_path, do_sample=False, temperature=0.3)) == {}
    shown = effective_defaults(GenerationSettings(), _model(tmp_path, temperature=0.6), {"top_k": 7})
    assert (shown["temperature"], shown["top_k"], shown["top_p"], shown["repeat_last_n"]) == (0.6, 7, 0.9, 64)
    assert "seed" not in shown
