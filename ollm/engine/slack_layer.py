"""A full-attention cache layer that grows into spare columns instead of concatenating every step.

Transformers' ``DynamicLayer.update`` builds new key and value tensors (``torch.cat``) on every
forward, so a decode step copies the whole batch's KV once per layer: at 16 rows of 150 columns
of SmolLM2 that is ~110 MB of copying per step, a tenth of the step. ``SlackLayer`` keeps its
keys and values as views of the first columns of a larger buffer (the *room*) and writes each
step's new columns in place; only when the room is full does it move to a room
``FULL_ATTENTION_SLACK`` columns larger (once every 32 steps; memory plans count the spare
columns). The cache manager's joins and trims replace ``keys``/``values`` with exact-size tensors
(``replace``); the next update moves them into a room of their own.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from ollm.memory import FULL_ATTENTION_SLACK


class SlackLayer(DynamicLayer):
    def __init__(self) -> None:
        super().__init__()
        self._room: tuple[torch.Tensor, torch.Tensor] | None = None
        self._view: torch.Tensor | None = None  # the keys this layer last handed out

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
            self.is_initialized = True
            self.device = key_states.device
            self.keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[3]))
            self.values = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[3]))
        assert self.values is not None
        used, new = self.keys.shape[2], key_states.shape[2]
        room = self._room
        # Keys that are not this layer's last view were assigned from outside (a crop, a batch
        # selection): they move into a room of their own, as they do when the room is full.
        if room is None or self.keys is not self._view or room[0].shape[2] < used + new:
            room = self._move(used + new)
        keys, values = room[0][:, :, : used + new], room[1][:, :, : used + new]
        keys[:, :, used:] = key_states
        values[:, :, used:] = value_states
        self.keys, self.values, self._view = keys, values, keys
        return keys, values

    def _move(self, needed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A room for ``needed`` columns and the slack, holding the current keys and values."""
        assert self.keys is not None and self.values is not None
        columns = needed + FULL_ATTENTION_SLACK
        used = self.keys.shape[2]
        rooms = []
        for tensor in (self.keys, self.values):
            room = tensor.new_empty((tensor.shape[0], tensor.shape[1], columns, tensor.shape[3]))
            room[:, :, :used] = tensor
            rooms.append(room)
        self._room = (rooms[0], rooms[1])
        return self._room

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold exactly ``keys`` and ``values`` (a join or a trim): the old room is freed now, not
        at the next update, so the two are never held together for every layer at once."""
        self.keys, self.values = keys, values
        self._room = self._view = None

    def room_bytes(self) -> int:
        """Bytes this layer holds, spare columns included."""
        if self._room is not None and self.keys is self._view:
            return self._room[0].nbytes + self._room[1].nbytes
        if self.keys is None or self.values is None:
            return 0
        return self.keys.nbytes + self.values.nbytes

    def reset(self) -> None:
        self._room = self._view = None
        super().reset()
