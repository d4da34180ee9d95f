"""`ollm prompt` (one-shot) and `ollm chat` / bare `ollm` (interactive): generation in-process."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console

from cli.main import app
from cli.options import (
    BackendOption,
    DeviceOption,
    DTypeOption,
    KVOffloadOption,
    LayerStreamingOption,
    MemoryBudgetOption,
    ModelOption,
    ModelsDirOption,
    NoSpecializationOption,
    PlanJsonOption,
    QuantizationOption,
    fail,
    runtime_overrides,
    settings_or_exit,
)
from ollm.engine.base import Engine, stream
from ollm.errors import OllmError
from ollm.generation import (
    ChatMessage,
    ErrorEvent,
    FinalEvent,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from ollm.plan import RuntimePlan, plan_model
from ollm.sampling_defaults import configured_fields, model_recommended, sampling_params, with_model_defaults
from ollm.settings import Settings

stderr = Console(stderr=True)

MaxNewTokens = Annotated[int | None, typer.Option("--max-new-tokens", "-n", help="Most tokens to generate.")]
Temperature = Annotated[float | None, typer.Option("--temperature", "-t", help="0 for greedy decoding.")]
TopP = Annotated[float | None, typer.Option("--top-p")]
TopK = Annotated[int | None, typer.Option("--top-k", help="0 disables top-k.")]
MinP = Annotated[float | None, typer.Option("--min-p")]
Seed = Annotated[int | None, typer.Option("--seed", help="Same seed, same sampled output.")]
RepetitionPenalty = Annotated[float | None, typer.Option("--repetition-penalty")]
FrequencyPenalty = Annotated[float | None, typer.Option("--frequency-penalty")]
PresencePenalty = Annotated[float | None, typer.Option("--presence-penalty")]
Stop = Annotated[list[str] | None, typer.Option("--stop", help="Stop sequence (repeatable); not included.")]
System = Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")]
HideThinking = Annotated[
    bool, typer.Option("--hide-thinking", help="Do not print a thinking model's reasoning (shown dimmed by default).")
]
_DIM, _RESET = "\x1b[2m", "\x1b[0m"


def _sampling(settings: Settings, plan: RuntimePlan, stop: list[str] | None) -> SamplingParams:
    # Flags already sit in settings.generation (they override it, and are "configured" so the
    # model's recommendations stay under them), so only stop is added here.
    params = sampling_params(settings.generation, stop=stop)
    return with_model_defaults(params, model_recommended(plan.path), configured_fields(settings.generation))


def _plan(settings: Settings) -> RuntimePlan:
    try:
        return plan_model(
            settings.runtime.model_reference,
            settings.runtime,
            prefill_tokens=settings.worker.max_tokens_per_step,
            max_batch=settings.worker.max_batch,
        )
    except OllmError as exc:
        fail(exc.message)


def _load(settings: Settings, plan: RuntimePlan) -> Engine:
    from ollm.engine import load_engine
    from ollm.pull import pull_model

    try:
        if not plan.materialized:
            # Like `ollama run`: a model that is not here yet is pulled first.
            stderr.print(f"[dim]{plan.reference} is not materialized; pulling it…[/dim]")
            pull_model(plan.reference, settings.runtime)
            plan = _plan(settings)
        with stderr.status(f"Loading {plan.reference} ({plan.backend}, {plan.device}, {plan.dtype})…"):
            return load_engine(plan, settings)
    except OllmError as exc:
        fail(exc.message)


@app.command("prompt")
def prompt_command(
    prompt: Annotated[str, typer.Argument(help="The prompt, or - to read it from standard input.")],
    system: System = None,
    model: ModelOption = None,
    max_new_tokens: MaxNewTokens = None,
    temperature: Temperature = None,
    top_p: TopP = None,
    top_k: TopK = None,
    min_p: MinP = None,
    seed: Seed = None,
    repetition_penalty: RepetitionPenalty = None,
    frequency_penalty: FrequencyPenalty = None,
    presence_penalty: PresencePenalty = None,
    stop: Stop = None,
    stream_output: Annotated[
        bool | None, typer.Option("--stream/--no-stream", help="Print tokens as they come (default: on).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON result with metadata.")] = False,
    hide_thinking: HideThinking = False,
    backend: BackendOption = None,
    no_specialization: NoSpecializationOption = False,
    plan_json: PlanJsonOption = False,
    device: DeviceOption = None,
    dtype: DTypeOption = None,
    models_dir: ModelsDirOption = None,
    memory_budget: MemoryBudgetOption = None,
    layer_streaming: LayerStreamingOption = None,
    kv_offload: KVOffloadOption = None,
    quantization: QuantizationOption = None,
) -> None:
    """Answer one prompt and exit (non-zero on failure)."""
    generation = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "min_p": min_p,
        "seed": seed,
        "repetition_penalty": repetition_penalty,
        "frequency_penalty": frequency_penalty,
        "presence_penalty": presence_penalty,
        "stream": stream_output,
    }
    settings = settings_or_exit(
        {
            "runtime": runtime_overrides(
                model, backend, no_specialization, device, dtype, models_dir, memory_budget, layer_streaming,
                kv_offload, quantization,
            ),  # fmt: skip
            "generation": generation,
        }
    )
    plan = _plan(settings)
    if plan_json:
        typer.echo(plan.model_dump_json(indent=2))
        return
    text = sys.stdin.read() if prompt == "-" else prompt
    if not text.strip():
        fail("the prompt is empty", code=2)
    messages = [ChatMessage(role="system", content=system)] if system else []
    messages.append(ChatMessage(role="user", content=text))
    request = GenerationRequest(model=plan.reference, messages=messages, sampling=_sampling(settings, plan, stop))
    engine = _load(settings, plan)
    try:
        final = _run(engine, request, echo=settings.generation.stream and not as_json, thinking=not hide_thinking)
    finally:
        engine.close()
    if as_json:
        result = {
            "model": plan.reference,
            "text": final.text,
            "reasoning": final.reasoning,
            "finish_reason": final.finish_reason,
            "usage": final.usage.model_dump() | {"total_tokens": final.usage.total_tokens},
            "timings": final.timings.model_dump(),
            "execution": final.execution.model_dump() if final.execution else None,
        }
        typer.echo(json.dumps(result, indent=2))
    elif not settings.generation.stream:
        if final.reasoning and not hide_thinking:
            _write_reasoning(final.reasoning)
            sys.stdout.write("\n\n")
        typer.echo(final.text)


def _write_reasoning(text: str) -> None:
    """Reasoning is shown apart from the answer: dimmed in a terminal, plain in a pipe."""
    dim = sys.stdout.isatty()
    sys.stdout.write(f"{_DIM}{text}{_RESET}" if dim else text)


def _run(engine: Engine, request: GenerationRequest, echo: bool, thinking: bool = True) -> FinalEvent:
    """Generate; print tokens as they arrive when ``echo`` (reasoning too when ``thinking``, then a
    blank line before the answer). Exits non-zero on a generation error."""
    reasoned = False
    for event in stream(engine, request):
        if isinstance(event, TokenEvent) and echo:
            if event.reasoning and thinking:
                _write_reasoning(event.reasoning)
                reasoned = True
            if event.text:
                if reasoned:
                    sys.stdout.write("\n\n")
                    reasoned = False
                sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, ErrorEvent):
            fail(event.message)
        elif isinstance(event, FinalEvent):
            if echo:
                sys.stdout.write("\n")
            return event
    raise AssertionError("the engine ended a stream without a final event")


@app.command("chat")
def chat_command(
    system: System = None,
    model: ModelOption = None,
    max_new_tokens: MaxNewTokens = None,
    temperature: Temperature = None,
    seed: Seed = None,
    hide_thinking: HideThinking = False,
    backend: BackendOption = None,
    no_specialization: NoSpecializationOption = False,
    plan_json: PlanJsonOption = False,
    device: DeviceOption = None,
    dtype: DTypeOption = None,
    models_dir: ModelsDirOption = None,
    memory_budget: MemoryBudgetOption = None,
    layer_streaming: LayerStreamingOption = None,
    kv_offload: KVOffloadOption = None,
    quantization: QuantizationOption = None,
) -> None:
    """Interactive chat with history. /clear forgets the conversation, /exit leaves."""
    generation = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
    settings = settings_or_exit(
        {
            "runtime": runtime_overrides(
                model, backend, no_specialization, device, dtype, models_dir, memory_budget, layer_streaming,
                kv_offload, quantization,
            ),  # fmt: skip
            "generation": generation,
        }
    )
    plan = _plan(settings)
    if plan_json:
        typer.echo(plan.model_dump_json(indent=2))
        return
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        fail("`ollm chat` needs an interactive terminal; for scripts and pipes use `ollm prompt`", code=2)
    engine = _load(settings, plan)
    try:
        _chat_loop(engine, plan, settings, system, thinking=not hide_thinking)
    finally:
        engine.close()


def _chat_loop(engine: Engine, plan: RuntimePlan, settings: Settings, system: str | None, thinking: bool) -> None:
    console = Console()
    console.print(f"[bold]{plan.reference}[/bold] ready. /clear resets the conversation, /exit leaves.")
    history: list[ChatMessage] = []
    while True:
        try:
            line = console.input("[bold green]>>> [/bold green]")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit", "/bye"):
            return
        if command == "/clear":
            history.clear()
            console.print("[dim]conversation cleared[/dim]")
            continue
        history.append(ChatMessage(role="user", content=line))
        messages = ([ChatMessage(role="system", content=system)] if system else []) + history
        request = GenerationRequest(model=plan.reference, messages=messages, sampling=_sampling(settings, plan, None))
        try:
            final = _run(engine, request, echo=True, thinking=thinking)
        except KeyboardInterrupt:
            # Ctrl-C stops this answer (stream() cancels it), not the session.
            console.print("\n[dim]stopped[/dim]")
            history.pop()
            continue
        history.append(ChatMessage(role="assistant", content=final.text, reasoning=final.reasoning))


@app.callback(invoke_without_command=True)
def default_command(ctx: typer.Context) -> None:
    """Bare `ollm` starts an interactive chat with the default model."""
    if ctx.invoked_subcommand is None:
        chat_command(
            system=None,
            model=None,
            max_new_tokens=None,
            temperature=None,
            seed=None,
            backend=None,
            no_specialization=False,
            plan_json=False,
            device=None,
            dtype=None,
            models_dir=None,
        )
