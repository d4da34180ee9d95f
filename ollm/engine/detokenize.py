"""Token ids -> streamed text: never split a multi-byte character, never leak a stop sequence."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas (the vLLM/TGI offsets technique).

    Each step decodes a short window that starts one step back, so tokenizers' context-dependent
    spacing (SentencePiece's leading-space marker) stays right without re-decoding everything.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            # An incomplete UTF-8 sequence: wait for the bytes that finish the character.
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """Whatever is still held back at the end (a dangling partial character, shown as-is)."""
        if self._read_offset == len(self._ids):
            return ""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        self._read_offset = len(self._ids)
        return full[len(prefix) :]

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))


class StopMatcher:
    """Holds back text that may be the start of a stop sequence; cuts output at the first match."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [stop for stop in stops if stop]
        self._pending = ""
        # The stop sequence that matched (the earliest in the text), once one has.
        self.matched: str | None = None

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def feed(self, text: str) -> str:
        """Text safe to emit now. Sets ``matched`` once a stop sequence appears."""
        if not self._stops:
            return text
        self._pending += text
        found = [(i, stop) for stop in self._stops if (i := self._pending.find(stop)) >= 0]
        if found:
            cut, self.matched = min(found, key=lambda hit: hit[0])
            out, self._pending = self._pending[:cut], ""
            return out
        hold = self._longest_partial_stop()
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(self._pending) - hold :]
        return out

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out

    def _longest_partial_stop(self) -> int:
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:size]):
                    longest = size
                    break
        return longest
