"""Constrained decoding with xgrammar: one compiled grammar per constraint, one matcher per sequence.

xgrammar compiles a JSON schema into a pushdown automaton over the tokenizer's vocabulary and
gives the allowed-token bitmask for each step, which is what vLLM and SGLang use; a batch needs one
matcher per sequence because each sequence is at its own place in its own grammar.
"""

from __future__ import annotations

import json
import threading

import torch
import xgrammar as xgr
from transformers import PreTrainedTokenizerBase

from ollm.errors import InvalidRequestError
from ollm.generation import Constraint


def _literal(text: str) -> xgr.Grammar:
    return xgr.Grammar.from_ebnf(f"root ::= {json.dumps(text)}")


class GrammarMask:
    """The per-sequence logits processor: masks disallowed tokens, then follows the chosen one."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int) -> None:
        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._vocab_size = vocab_size

    def __call__(self, logits: torch.Tensor) -> None:
        self._matcher.fill_next_token_bitmask(self._bitmask)
        row = logits.view(1, -1)
        xgr.apply_token_bitmask_inplace(row, self._bitmask.to(logits.device), vocab_size=self._vocab_size)

    def accept(self, token_id: int) -> None:
        if not self._matcher.accept_token(token_id):
            raise RuntimeError(f"grammar rejected token {token_id} it allowed")

    @property
    def finished(self) -> bool:
        return self._matcher.is_terminated()


class GrammarCompiler:
    """Compiles constraints for one tokenizer, caching by constraint so repeats cost nothing."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: list[int]):
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self._compiler = xgr.GrammarCompiler(info)
        self._vocab_size = vocab_size
        self._cache: dict[str, xgr.CompiledGrammar] = {}
        self._lock = threading.Lock()

    def mask_for(self, constraint: Constraint) -> GrammarMask:
        key = constraint.model_dump_json()
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is None:
                compiled = self._compile(constraint)
                self._cache[key] = compiled
        return GrammarMask(compiled, self._vocab_size)

    def _compile(self, constraint: Constraint) -> xgr.CompiledGrammar:
        try:
            if constraint.type == "json_schema":
                body = xgr.Grammar.from_json_schema(json.dumps(constraint.json_schema), any_whitespace=False)
            else:
                body = xgr.Grammar.builtin_json_grammar()
            parts = [body]
            if constraint.prefix:
                parts.insert(0, _literal(constraint.prefix))
            if constraint.suffix:
                parts.append(_literal(constraint.suffix))
            grammar = parts[0] if len(parts) == 1 else xgr.Grammar.concat(*parts)
            return self._compiler.compile_grammar(grammar)
        except (RuntimeError, ValueError) as exc:
            raise InvalidRequestError(f"cannot compile the output schema: {exc}", param="response_format") from exc
