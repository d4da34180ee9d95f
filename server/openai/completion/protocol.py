"""Request side of the OpenAI completions wire format; responses use the `openai` package's types."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ollm.generation import Seed
from server.openai.chat_completion.protocol import StreamOptions

# Each prompt of a list, times n, is its own job holding a pub/sub connection while it runs: a
# bound keeps one request from taking every connection the server has (a 503 for everyone).
MAX_GENERATIONS = 64
PromptList = Annotated[list[str], Field(max_length=MAX_GENERATIONS)]
TokenPrompt = Annotated[list[int], Field(max_length=131072)]
TokenPromptList = Annotated[list[TokenPrompt], Field(max_length=MAX_GENERATIONS)]


class CompletionRequest(BaseModel):
    # OpenAI adds fields often; unknown ones are ignored like the OpenAI API itself ignores them.
    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str | PromptList | TokenPrompt | TokenPromptList
    suffix: str | None = None
    echo: bool = False
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    best_of: int | None = Field(None, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=5, description="Return this many top alternatives per token.")
    stop: str | list[str] | None = None
    seed: Seed | None = None
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: str | None = None

    @model_validator(mode="after")
    def _best_of_is_n(self) -> CompletionRequest:
        # best_of > n would need server-side ranking by logprob; ollm generates exactly n.
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of must equal n (ollm generates exactly n choices)")
        single = isinstance(self.prompt, str) or (bool(self.prompt) and isinstance(self.prompt[0], int))
        prompts = 1 if single else len(self.prompt)
        if prompts * self.n > MAX_GENERATIONS:
            raise ValueError(
                f"{prompts} prompts with n={self.n} would be {prompts * self.n} generations; at most "
                f"{MAX_GENERATIONS} per request: split the list over several requests"
            )
        return self
