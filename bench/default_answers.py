"""How often the default model names Paris when asked for France's capital with the default sampling.

`python -m bench.default_answers [--runs 10] [--max-new-tokens 256]` runs the question with
seeds 0..runs-1 and nothing else set (the sampling defaults as `ollm prompt` resolves them:
ollm.sampling_defaults), in float32 so a seed gives the same draw on any CPU, and prints each
answer and the count. A bench, not a test: the count is a property of the model's distribution,
not of ollm's code.

Measured 2026-12-03 (seeds 0-9, the default model as pulled from its Q4_1 GGUF): 8/10 with the
model card's sampling (temperature 0.2, top_p 0.9, the catalogue's default) and 8/10 at 0.1; the
same two seeds answer "L'Étoile ... is the capital of France". The first token nearly ties: "The"
15.5%, "L" 14.0%, "La" 10.2% at temperature 1 ("The" 57%, "L" 35% at 0.2), so only greedy decoding
(temperature 0: "The capital of France is Paris.") names Paris every time. Without the repeat
penalty (Ollama's 1.1) it is 6/10: the "L'Étoile" answers then loop.
"""

from __future__ import annotations

import argparse
import json

from ollm.engine.base import stream
from ollm.engine.loader import load_engine
from ollm.generation import ChatMessage, FinalEvent, GenerationRequest
from ollm.plan import plan_model
from ollm.sampling_defaults import configured_fields, model_recommended, sampling_params, with_model_defaults
from ollm.settings import load_settings

QUESTION = "What is the capital of France?"


def count_paris(runs: int, max_new_tokens: int) -> dict[str, object]:
    settings = load_settings({"runtime": {"dtype": "float32"}})
    plan = plan_model(settings.runtime.model_reference, settings.runtime)
    engine = load_engine(plan, settings)
    answers = []
    try:
        for seed in range(runs):
            params = sampling_params(settings.generation, seed=seed, max_new_tokens=max_new_tokens)
            params = with_model_defaults(params, model_recommended(plan.path), configured_fields(settings.generation))
            request = GenerationRequest(
                model=plan.reference, messages=[ChatMessage(role="user", content=QUESTION)], sampling=params
            )
            final = [event for event in stream(engine, request) if isinstance(event, FinalEvent)][0]
            answers.append(final.text)
    finally:
        engine.close()
    return {"model": plan.reference, "runs": runs, "paris": sum("Paris" in a for a in answers), "answers": answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args()
    print(json.dumps(count_paris(args.runs, args.max_new_tokens), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
