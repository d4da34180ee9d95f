"""Which parser a request's output needs (ollm.reasoning, ollm.harmony), from its model's tokenizer."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from ollm import harmony
from ollm.generation import GenerationRequest
from ollm.reasoning import THINK_CLOSE, THINK_OPEN, OutputParser, TaggedParser, thinking_template

# Prompt tokens read back to see where the prompt leaves the answer (inside <think>, inside a header).
_TAIL_TOKENS = 32


def harmony_markers(tokenizer: PreTrainedTokenizerBase) -> dict[int, str]:
    """Token id -> marker for a harmony tokenizer (gpt-oss); empty for any other."""
    markers = {}
    for marker in harmony.MARKERS:
        token_id = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(token_id, int) and tokenizer.convert_ids_to_tokens(token_id) == marker:
            markers[token_id] = marker
    return markers if len(markers) == len(harmony.MARKERS) else {}


def output_parser(
    request: GenerationRequest, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], harmony_model: bool
) -> OutputParser:
    """A raw prompt's output is text as written; a chat answer is split by its model's format."""
    if request.prompt is not None:
        return TaggedParser(thinking=False, tools=False)
    tail = str(tokenizer.decode(prompt_ids[-_TAIL_TOKENS:], skip_special_tokens=False))
    if harmony_model:
        header = tail.rpartition(harmony.START + "assistant")[2]
        return harmony.HarmonyParser(header=header, tools=bool(request.tools))
    thinking = thinking_template(request.chat_template or tokenizer.chat_template)
    in_reasoning = thinking and tail.rstrip().endswith(THINK_OPEN)
    return TaggedParser(thinking=thinking, tools=bool(request.tools), in_reasoning=in_reasoning)


def end_of_reasoning(harmony_model: bool) -> str:
    """What closes reasoning and opens the answer: forced once a reasoning budget is spent."""
    if harmony_model:
        return f"{harmony.END}{harmony.START}assistant{harmony.CHANNEL}final{harmony.MESSAGE}"
    return f"{THINK_CLOSE}\n\n"
