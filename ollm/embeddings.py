"""Sentence embeddings: mean-pooled over real tokens, L2-normalized, computed in batches."""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from ollm.engine.threads import on_fresh_thread
from ollm.errors import ContextLengthError, InvalidRequestError
from ollm.generation import EmbeddingRequest, EmbeddingResult

_BATCH = 32


class Embedder:
    def __init__(self, reference: str, path: Path, device: str, dtype: torch.dtype) -> None:
        self.reference = reference
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._model = AutoModel.from_pretrained(path, dtype=dtype).to(device).eval()
        self._max_length = min(
            int(getattr(self._model.config, "max_position_embeddings", 512)),
            int(self._tokenizer.model_max_length or 512),
        )
        self._pad = self._tokenizer.pad_token_id or 0
        # One forward at a time: the model is shared by every thread of the worker.
        self._lock = threading.Lock()

    def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        # On a thread that ends with the request, not the worker's job thread: a job thread that ran
        # a forward would keep an OpenMP pool that slows every engine step (ollm/engine/threads.py).
        return on_fresh_thread(lambda: self._embed(request), name="ollm-embed")

    def _embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        ids = [self._ids(item, request.truncate) for item in request.inputs]
        vectors: list[list[float]] = []
        for start in range(0, len(ids), _BATCH):
            vectors.extend(self._embed_batch(ids[start : start + _BATCH], request.dimensions))
        return EmbeddingResult(model=request.model, embeddings=vectors, prompt_tokens=sum(len(item) for item in ids))

    def _ids(self, item: str | list[int], truncate: bool) -> list[int]:
        if isinstance(item, str):
            ids = list(self._tokenizer(item, add_special_tokens=True)["input_ids"])
        else:
            vocab = self._tokenizer.vocab_size
            if any(not 0 <= token < vocab for token in item):
                raise InvalidRequestError(f"token ids must be in [0, {vocab})", param="input")
            ids = list(item)
        if not ids:
            raise InvalidRequestError("an input is empty", param="input")
        if len(ids) > self._max_length:
            if not truncate:
                raise ContextLengthError(
                    f"an input is {len(ids)} tokens; {self.reference} takes at most {self._max_length}. "
                    "Shorten it or allow truncation."
                )
            ids = ids[: self._max_length]
        return ids

    @torch.inference_mode()
    def _embed_batch(self, batch: list[list[int]], dimensions: int | None) -> list[list[float]]:
        length = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), length), self._pad, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        device = self._model.device
        mask = mask.to(device)
        with self._lock:
            hidden = self._model(input_ids=input_ids.to(device), attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = ((hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)).float()
        if dimensions is not None:
            if dimensions > pooled.shape[1]:
                raise InvalidRequestError(
                    f"dimensions must be at most {pooled.shape[1]} for {self.reference}", param="dimensions"
                )
            pooled = pooled[:, :dimensions]
        return torch.nn.functional.normalize(pooled, p=2, dim=1).tolist()
