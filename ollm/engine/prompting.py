"""GenerationRequest -> prompt token ids, through the model's own chat template."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from ollm.errors import InvalidRequestError
from ollm.generation import ChatMessage, GenerationRequest

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
    return out


def render_text(
    tokenizer: PreTrainedTokenizerBase, request: GenerationRequest, image_placeholders: bool = False
) -> str:
    """The exact prompt text the model sees (for chat: the template applied to the messages)."""
    if request.prompt is not None:
        return request.prompt
    assert request.messages is not None
    template = request.chat_template or tokenizer.chat_template
    if not template:
        raise InvalidRequestError(
            f"model {request.model} has no chat template; send a raw prompt (completions) instead",
            param="messages",
        )
    try:
        text = tokenizer.apply_chat_template(
            [template_message(m, image_placeholders) for m in request.messages],
            tools=list(request.tools) if request.tools else None,
            chat_template=template,
            add_generation_prompt=True,
            tokenize=False,
        )
    except Exception as exc:  # Jinja raises its own exception types for template errors.
        raise InvalidRequestError(f"the chat template failed on these messages: {exc}", param="messages") from exc
    return str(text)


def render_ids(tokenizer: PreTrainedTokenizerBase, request: GenerationRequest) -> list[int]:
    text = render_text(tokenizer, request)
    # A chat template writes its own special tokens; a raw prompt gets the tokenizer's (e.g. BOS).
    ids = tokenizer(text, add_special_tokens=request.prompt is not None)["input_ids"]
    if not ids:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    return list(ids)
