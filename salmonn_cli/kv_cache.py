"""The decode engine's KV cache: one preallocated tensor per row count, which transformers' attention writes into.

The cache is `(layers, 2, rows, kv_heads, capacity, head_dim)`, allocated once and kept across calls. Decoder layers
reach it through the `update(key, value, layer)` call that transformers' attention makes on any cache object. It
is in one of three phases, a plain attribute each layer's call reads (a recorded or compiled step sees the same
value on every step, so nothing it reads changes between steps but tensors):

- `PROMPT`: the prompt pass writes its keys/values for every beam of its prompt row; attention uses its own;
- `EXACT`: an eager step writes at `length` and attends to exactly the filled part, which is what transformers'
  dynamic cache hands it (so the ids are transformers');
- `MASKED`: a step that can be recorded or compiled writes at the position held in the device tensor `position`
  and attends over the whole cache through `step_mask`, built on the device from that position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

PROMPT, EXACT, MASKED = "prompt", "exact", "masked"


@dataclass(frozen=True)
class Layout:
    """The cache's shape facts, read once from the model's config."""

    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: Any) -> "Layout":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim)


class StaticKV:
    """One row count's cache and the state of the call using it; what the attention layers call `update` on."""

    def __init__(self, layout: Layout, rows: int, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        # zeros, not empty: masked-out positions are still multiplied by 0 in attention, and garbage could be NaN
        self.kv = torch.zeros(
            (layout.layers, 2, rows, layout.kv_heads, capacity, layout.head_dim), dtype=dtype, device=device
        )
        self.rows, self.capacity = rows, capacity
        self.length = 0  # filled positions
        self.phase = PROMPT
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # a MASKED step's position, as data
        self._positions = torch.arange(capacity, device=device)

    def fits(self, rows: int, capacity: int, dtype: torch.dtype) -> bool:
        return self.rows == rows and self.capacity >= capacity and self.kv.dtype == dtype

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        """transformers' cache call from inside attention: store this layer's new key/value, return what to attend."""
        keys, values = self.kv[layer_idx, 0], self.kv[layer_idx, 1]
        if self.phase == MASKED:  # reads no Python number that changes from step to step
            keys.index_copy_(2, self.position, key)
            values.index_copy_(2, self.position, value)
            return keys, values
        new = key.shape[2]
        if self.phase == PROMPT:  # written for every beam of its prompt row
            repeat = self.rows // key.shape[0]
            keys.view(key.shape[0], repeat, *keys.shape[1:])[:, :, :, :new] = key[:, None]
            values.view(value.shape[0], repeat, *values.shape[1:])[:, :, :, :new] = value[:, None]
            return key, value
        keys[:, :, self.length : self.length + new] = key
        values[:, :, self.length : self.length + new] = value
        return keys[:, :, : self.length + new], values[:, :, : self.length + new]

    def step_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask over the whole cache: 0 up to and including `position`, blocked after. (1, 1, 1, capacity)"""
        blocked = self._positions > self.position
        return additive_mask(blocked, dtype).view(1, 1, 1, -1)

    def reorder(self, sources: Sequence[int]) -> None:
        """Row i becomes what row `sources[i]` holds (beam search's surviving hypotheses), up to the filled length.

        Only the rows that change are written, one copy each; only a source that is itself overwritten is first
        set aside (most steps move few rows, and many none: then nothing runs). A gather of the whole filled
        cache would move all of it, twice, every step, through a temporary as large.
        """
        moves = [(row, source) for row, source in enumerate(sources) if row != source]
        if not moves:
            return
        filled = self.kv[:, :, :, :, : self.length]
        overwritten = {row for row, _ in moves}
        endangered = sorted({source for _, source in moves if source in overwritten})
        set_aside = {}
        if endangered:
            kept = filled.index_select(2, torch.tensor(endangered, device=filled.device))
            set_aside = {source: kept[:, :, i] for i, source in enumerate(endangered)}
        for row, source in moves:
            filled[:, :, row].copy_(set_aside[source] if source in set_aside else filled[:, :, source])


def additive_mask(blocked: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An attention mask to add to the scores: 0 where allowed, the dtype's lowest value where `blocked`."""
    return torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill_(blocked, torch.finfo(dtype).min)
