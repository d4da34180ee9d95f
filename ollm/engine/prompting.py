"""GenerationRequest -> prompt token ids, through the model's own chat template."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from ollm import harmony
from ollm.engine.output import harmony_markers
from ollm.errors import InvalidRequestError
from ollm.generation import ChatMessage, Constraint, GenerationRequest
from ollm.tools import render_tool_call, tools_system_prompt

# Most chat templates predate OpenAI's "developer" role; it means what "system" means to them.
_TEMPLATE_ROLE = {"developer": "system"}


def template_message(message: ChatMessage, image_placeholders: bool = False) -> dict[str, Any]:
    """One message in the shape Hugging Face chat templates expect."""
    content: Any = message.text()
    if image_placeholders and message.images():
        content = [{"type": "image"} for _ in message.images()] + [{"type": "text", "text": message.text()}]
    out: dict[str, Any] = {"role": _TEMPLATE_ROLE.get(message.role, message.role), "content": content}
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in message.tool_calls
        ]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.name:
        out["name"] = message.name
    if message.reasoning:
        # gpt-oss's template reads "thinking", Qwen3's "reasoning_content"; each keeps or drops it.
        out["thinking"] = out["reasoning_content"] = message.reasoning
    return out


def _supports_tools(template: str) -> bool:
    return "tools" in template and "tool_call" in template


def template_messages(
    request: GenerationRequest, template: str, image_placeholders: bool = False
) -> list[dict[str, Any]]:
    """The request's messages for ``template``; tool use is spelled out for templates without it.

    A template that knows no tools would drop the tool list, earlier calls and tool results, so
    they are written into the conversation in the convention ollm.tools parses back.
    """
    assert request.messages is not None
    if _supports_tools(template):
        return [template_message(m, image_placeholders) for m in request.messages]
    messages: list[dict[str, Any]] = []
    for message in request.messages:
        out = template_message(message, image_placeholders)
        out.pop("tool_calls", None)
        out.pop("tool_call_id", None)
        if message.tool_calls:
            calls = "\n".join(render_tool_call(call) for call in message.tool_calls)
            out["content"] = f"{message.text()}\n{calls}".strip()
        if message.role == "tool":
            out = {"role": "user", "content": f"<tool_response>\n{message.text()}\n</tool_response>"}
        messages.append(out)
    if request.tools:
        instructions = tools_system_prompt(request.tools)
        if messages and messages[0]["role"] == "system":
            messages[0]["content"] = f"{messages[0]['content']}\n\n{instructions}"
        else:
            messages.insert(0, {"role": "system", "content": instructions})
    return messages


def render_text(
    tokenizer: PreTrainedTokenizerBase, request: GenerationRequest, image_placeholders: bool = False
) -> str:
    """The exact prompt text the model sees (for chat: the template applied to the messages)."""
    if request.prompt is not None:
        return request.prompt
    assert request.messages is not None
    template = request.chat_template or tokenizer.chat_template
    if harmony_markers(tokenizer):
        text = _template_text(tokenizer, request, template, image_placeholders) if template else harmony.render(request)
        calls = request.constraint.calls if request.constraint else []
        return text + (harmony.forced_call_header(calls) if calls else "")
    if not template:
        raise InvalidRequestError(
            f"model {request.model} has no chat template; send a raw prompt (completions) instead",
            param="messages",
        )
    return _template_text(tokenizer, request, template, image_placeholders)


def _template_text(
    tokenizer: PreTrainedTokenizerBase, request: GenerationRequest, template: str, image_placeholders: bool
) -> str:
    # Thinking switches templates read (ignored by the others): Qwen3's enable_thinking, gpt-oss's
    # reasoning_effort.
    switches: dict[str, Any] = {"reasoning_effort": harmony.effort_of(request.think)}
    if request.think is not None:
        switches["enable_thinking"] = request.think is not False
    try:
        text = tokenizer.apply_chat_template(
            template_messages(request, template, image_placeholders),
            tools=list(request.tools) if request.tools and _supports_tools(template) else None,
            chat_template=template,
            add_generation_prompt=True,
            tokenize=False,
            **switches,
        )
    except Exception as exc:  # Jinja raises its own exception types for template errors.
        raise InvalidRequestError(f"the chat template failed on these messages: {exc}", param="messages") from exc
    return str(text)


def harmony_constraint(constraint: Constraint | None) -> Constraint | None:
    """A forced call's grammar for harmony: a prompt that already names the one tool (``render_text``)
    leaves only the arguments to constrain; a choice of several keeps the <tool_call> grammar, written
    in a commentary message."""
    if constraint is None or len(constraint.calls) != 1:
        return constraint
    assert constraint.json_schema is not None
    return Constraint(type="json_schema", json_schema=constraint.json_schema["properties"]["arguments"])


def render_ids(tokenizer: PreTrainedTokenizerBase, request: GenerationRequest) -> list[int]:
    text = render_text(tokenizer, request)
    # A chat template writes its own special tokens; a raw prompt gets the tokenizer's (e.g. BOS).
    ids = tokenizer(text, add_special_tokens=request.prompt is not None)["input_ids"]
    if not ids:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    return list(ids)
