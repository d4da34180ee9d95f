"""Streaming text: multi-byte characters are never split, stop sequences never leak."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from ollm.engine.detokenize import IncrementalDetokenizer, StopMatcher


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.mark.parametrize("text", ["héllo wörld 🌍 世界 — ok", "emoji 👩‍👩‍👧 end", "naïve café 東京タワー"])
def test_token_by_token_text_equals_full_decode_and_never_splits_a_character(tokenizer, text: str) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == tokenizer.decode(ids)
    # Byte-level BPE splits the emoji into several tokens: some steps must have held text back.
    assert any(delta == "" for delta in deltas[:-1])


def test_stop_matcher_holds_back_partial_stops_and_cuts_at_the_first() -> None:
    stops = StopMatcher(["END", "\n\n"])
    out = [stops.feed(piece) for piece in ["Hello E", "N", "ough said", " E", "ND and more"]]
    assert "".join(out) == "Hello ENough said "
    assert stops.stopped and stops.matched == "END"


def test_stop_matcher_names_the_earliest_stop_in_the_text() -> None:
    stops = StopMatcher(["zz", "b"])
    assert stops.feed("a b zz") == "a "
    assert stops.matched == "b"


def test_stop_matcher_releases_held_text_when_the_stream_ends() -> None:
    stops = StopMatcher(["STOP"])
    assert stops.feed("abc ST") == "abc "
    assert stops.flush() == "ST"
    assert not stops.stopped and stops.matched is None


def test_no_stops_passes_everything_through() -> None:
    stops = StopMatcher([])
    assert stops.feed("anything") == "anything"
