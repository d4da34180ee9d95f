"""Test-only: known output from a tiny random checkpoint, inside a real ``ollm worker``.

The live harmony tests need a model that answers in harmony's channels; random weights never
would. ``OLLM_TEST_STEERING`` names a JSON file ``{trigger: output}``: a chat request whose last
user message contains a trigger has its output forced, token by token through the logits, to
that output's tokens. Unset (always, outside tests), nothing changes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from ollm.generation import GenerationRequest

STEERING_ENV = "OLLM_TEST_STEERING"


def steered_tokens(request: GenerationRequest, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    path = os.environ.get(STEERING_ENV)
    users = [m.text() for m in request.messages or [] if m.role == "user"]
    if not path or not users:
        return []
    for trigger, output in json.loads(Path(path).read_text(encoding="utf-8")).items():
        if trigger in users[-1]:
            return list(tokenizer.encode(output, add_special_tokens=False))
    return []
