"""The LLM's hot loop: a preallocated KV cache, beams reordered in place, and on CUDA a graph-captured step.

`LlamaEngine` drives a Hugging Face LLaMA (optionally peft-wrapped, any quantised linear layers) through its own
modules: the token embedding, each `LlamaDecoderLayer` (attention, MLP, norms, LoRA: the model's code, so the
numbers are the model's), the final norm and the output head. Only the orchestration is ours:

- the KV cache is one tensor `(layers, 2, rows, kv_heads, capacity, head_dim)` allocated once per row count and
  kept across calls (for the most recent row counts); the decoder layers write into it through the
  `update(key, value, layer)` call that transformers' attention makes on any cache object, and beam reordering
  gathers it in place, up to the filled length, for every layer at once;
- the prompt (`inputs_embeds`) is run once, eagerly, exactly as transformers' forward runs it;
- a step feeds one id per row at the next position. Eagerly (CPU, or `capture=False`) attention reads exactly the
  filled part of the cache, which is what transformers' own dynamic cache hands it, so the ids are the same; on
  CUDA the step is recorded once per row count as a CUDA graph over the whole cache with a mask built on the
  device from a position tensor, and every later step is one graph replay with no host synchronisation.

The decode semantics (transformers 4.28's greedy, sampling and beam search) live in generate.py and beam.py and
see only `start`, `step` and `reorder`.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

import torch

CAPACITY_STEP = 64  # cache lengths are rounded up to this, so prompts of similar length share one cache and graph
KEPT_ROW_COUNTS = 2  # on CUDA: a batch of 16 x 4 beams of 13B holds ~10 GB of cache, so not every one is kept
GRAPHS_ENV = "SALMONN_CUDA_GRAPHS"  # "0" turns graph capture off (eager CUDA steps), e.g. to compare the two


class DecodeEngine(Protocol):
    """What the decode loops drive: prompts in, then one id per row at a time."""

    def start(self, inputs_embeds: torch.Tensor, beams: int, max_new_tokens: int) -> torch.Tensor:
        """Run the prompts (B, N, D); last-position logits (B * beams, V), each prompt's row repeated `beams` times."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one id per row (rows,) at the next position; logits (rows, V), valid until the next step."""

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i of the cache becomes row `rows[i]` (beam search's surviving hypotheses)."""


@dataclass(frozen=True)
class _Layout:
    """The cache's shape facts, read once from the model's config."""

    layers: int
    kv_heads: int
    head_dim: int


def _layout(config: Any) -> _Layout:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return _Layout(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim)


@lru_cache(maxsize=None)
def cache_keyword(layer_class: type) -> str:
    """A decoder layer's (or model's) cache keyword: `cache` from transformers 5.2x (which deprecates
    `past_key_values` and drops it in 5.40), `past_key_values` before; a fact of the class, looked up once."""
    return "cache" if "cache" in inspect.signature(layer_class.forward).parameters else "past_key_values"


class StaticKV:
    """One row count's cache and the state of the call using it; what the attention layers call `update` on.

    `length` is the number of filled positions. In `masked` mode (CUDA graphs) `update` writes at the position held
    in the device tensor `position` and returns the whole cache, which `step_mask` limits to the filled part;
    otherwise it returns exactly the filled part (no mask), as transformers' dynamic cache would.
    """

    def __init__(self, layout: _Layout, rows: int, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        # zeros, not empty: masked-out positions are still multiplied by 0 in attention, and garbage could be NaN
        self.kv = torch.zeros(
            (layout.layers, 2, rows, layout.kv_heads, capacity, layout.head_dim), dtype=dtype, device=device
        )
        self.rows, self.capacity = rows, capacity
        self.length = 0
        self.masked = False
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # the step's position, as data
        self._positions = torch.arange(capacity, device=device)

    def fits(self, rows: int, capacity: int, dtype: torch.dtype) -> bool:
        return self.rows == rows and self.capacity >= capacity and self.kv.dtype == dtype

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        """transformers' cache call from inside attention: store this layer's new key/value, return what to attend."""
        new = key.shape[2]
        keys, values = self.kv[layer_idx, 0], self.kv[layer_idx, 1]
        if self.length == 0:  # the prompt: written for every beam of its prompt row; attention uses its own k/v
            repeat = self.rows // key.shape[0]
            keys.view(key.shape[0], repeat, *keys.shape[1:])[:, :, :, :new] = key[:, None]
            values.view(value.shape[0], repeat, *values.shape[1:])[:, :, :, :new] = value[:, None]
            return key, value
        if self.masked:
            keys.index_copy_(2, self.position, key)
            values.index_copy_(2, self.position, value)
            return keys, values
        keys[:, :, self.length : self.length + 1] = key
        values[:, :, self.length : self.length + 1] = value
        return keys[:, :, : self.length + 1], values[:, :, : self.length + 1]

    def step_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask over the whole cache: 0 up to and including `position`, blocked after. (1, 1, 1, capacity)"""
        blocked = self._positions > self.position
        return _additive(blocked, dtype).view(1, 1, 1, -1)

    def reorder(self, rows: torch.Tensor) -> None:
        filled = self.kv[:, :, :, :, : self.length]
        filled.copy_(filled.index_select(2, rows.to(self.kv.device)))


def _additive(blocked: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An attention mask to add to the scores: 0 where allowed, the dtype's lowest value where `blocked`."""
    return torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill_(blocked, torch.finfo(dtype).min)


class _CapturedStep:
    """One row count's decode step recorded as a CUDA graph: static token/position inputs, static logits output."""

    def __init__(self, engine: "LlamaEngine", cache: StaticKV, pool: Any) -> None:
        self.cache = cache
        self.tokens = torch.zeros(cache.rows, dtype=torch.long, device=cache.kv.device)
        self.graph = torch.cuda.CUDAGraph()
        self.logits: torch.Tensor | None = None
        self._engine, self._pool = engine, pool

    def run(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        if self.logits is None:
            # first use: one eager step in masked mode gives this step's logits and warms up every kernel (on a side
            # stream, as capture requires); the recording that follows executes nothing, so the cache is written once
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # the same position written twice with the same values: idempotent
                    first = self._engine._step_forward(self.tokens, self.cache).clone()
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(self.graph, pool=self._pool):
                self.logits = self._engine._step_forward(self.tokens, self.cache)
            return first
        self.graph.replay()
        return self.logits


class LlamaEngine:
    """`DecodeEngine` over a Hugging Face LLaMA-family causal LM (`lm`: the model, or peft's wrapper around it).

    `capture`: record the step as a CUDA graph (default: on CUDA, unless SALMONN_CUDA_GRAPHS=0). `masked_steps`:
    steps attend over the whole cache through a mask built on the device, as a recorded step must (default: when
    capturing; on its own it runs the recorded step's arithmetic eagerly, to compare the two). A cache (and its
    graph) is kept per row count, for the two most recently used row counts on CUDA and one elsewhere (host
    memory is the scarcer there); `release()` frees them.
    """

    def __init__(self, lm: Any, *, capture: bool | None = None, masked_steps: bool | None = None) -> None:
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # peft keeps the HF modules in place
        self.base = base
        self.layout = _layout(base.config)
        self._embed = base.get_input_embeddings()
        self.device = self._embed.weight.device
        if capture is None:
            capture = self.device.type == "cuda" and os.environ.get(GRAPHS_ENV, "1") != "0"
        self.capture = bool(capture) and self.device.type == "cuda"
        self.masked_steps = self.capture if masked_steps is None else bool(masked_steps) or self.capture
        self._keyword = cache_keyword(type(base.model.layers[0]))
        # caches (and graphs) kept: two row counts on CUDA (greedy and beams, say), one elsewhere (host memory)
        self._keep = KEPT_ROW_COUNTS if self.capture else 1
        self._caches: dict[int, StaticKV] = {}
        self._graphs: dict[int, _CapturedStep] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._cache: StaticKV | None = None  # the current call's

    # -- the DecodeEngine protocol -------------------------------------------------------------------------
    def start(self, inputs_embeds: torch.Tensor, beams: int, max_new_tokens: int) -> torch.Tensor:
        batch, length = inputs_embeds.shape[:2]
        # the last generated id is never fed, so prompt + max_new_tokens positions always suffice
        capacity = -(-(length + max_new_tokens) // CAPACITY_STEP) * CAPACITY_STEP
        cache = self._cache_for(batch * beams, capacity, inputs_embeds.dtype)
        cache.length, cache.masked = 0, False
        positions = torch.arange(length, device=inputs_embeds.device)[None]
        hidden = self._layers(inputs_embeds, positions, self._prompt_mask(length, inputs_embeds.dtype), cache)
        cache.length = length
        # the head runs on every prompt position, as transformers' forward does: on the last alone the matrix
        # product takes another path and the logits move in the last bits (~4e-6), enough to risk an id
        return self._head(hidden).repeat_interleave(beams, dim=0)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        cache = self._cache
        if self.masked_steps:
            cache.masked = True
            cache.position.fill_(cache.length)  # a device-side write outside any graph: the graph reads the tensor
        if self.capture:
            graph = self._graphs.get(cache.rows)
            if graph is None or graph.cache is not cache:
                graph = self._graphs[cache.rows] = _CapturedStep(self, cache, self._pool)
            logits = graph.run(tokens)
        else:
            logits = self._step_forward(tokens, cache)
        cache.length += 1
        return logits

    def reorder(self, rows: torch.Tensor) -> None:
        self._cache.reorder(rows)

    def release(self) -> None:
        """Free every cache and graph (the next call allocates and, on CUDA, records again)."""
        self._caches.clear()
        self._graphs.clear()
        self._cache = None

    # -- internals -------------------------------------------------------------------------------------------
    def _cache_for(self, rows: int, capacity: int, dtype: torch.dtype) -> StaticKV:
        cache = self._caches.pop(rows, None)  # re-inserted below: the dict's order is least recently used first
        if cache is None or not cache.fits(rows, capacity, dtype):
            cache = self._cache = None  # an unfit cache is freed before its successor is allocated
            self._graphs.pop(rows, None)  # a graph is bound to its cache's memory
            while len(self._caches) > self._keep - 1:  # and so are the least recently used beyond the kept number
                oldest = next(iter(self._caches))
                del self._caches[oldest]
                self._graphs.pop(oldest, None)
            cache = StaticKV(self.layout, rows, capacity, dtype, self.device)
        self._caches[rows] = self._cache = cache
        return cache

    def _step_forward(self, tokens: torch.Tensor, cache: StaticKV) -> torch.Tensor:
        hidden = self._embed(tokens[:, None])
        if cache.masked:
            positions, mask = cache.position.view(1, 1), cache.step_mask(hidden.dtype)
        else:
            positions, mask = torch.full((1, 1), cache.length, dtype=torch.long, device=tokens.device), None
        return self._head(self._layers(hidden, positions, mask, cache))

    def _layers(self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache: StaticKV):
        """Every decoder layer on `hidden` (rows, L, D) at `positions` (1, L): transformers' own layer code."""
        model = self.base.model
        position_embeddings = model.rotary_emb(hidden, position_ids=positions)
        keyword = {self._keyword: cache}
        for layer in model.layers[: self.layout.layers]:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings, **keyword)
        return hidden

    def _prompt_mask(self, length: int, dtype: torch.dtype) -> torch.Tensor | None:
        """None for SDPA (it applies causality itself when given no mask, as transformers asks it to); an explicit
        causal mask for attention implementations that need one (eager)."""
        if self.base.config._attn_implementation == "sdpa":
            return None
        blocked = torch.ones(length, length, dtype=torch.bool, device=self.device).triu(1)
        return _additive(blocked, dtype)[None, None]

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.base.lm_head(self.base.model.norm(hidden))[:, -1, :]


_ENGINE_ATTRIBUTE = "_salmonn_decode_engine"


def engine_for(lm: Any) -> LlamaEngine:
    """The one engine of a model (created on first use), so its caches and CUDA graphs serve every call.

    Kept on the model itself (a plain attribute, not a submodule): it lives and dies with the model.
    """
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    engine = base.__dict__.get(_ENGINE_ATTRIBUTE)
    if engine is None:
        engine = LlamaEngine(base)
        base.__dict__[_ENGINE_ATTRIBUTE] = engine
    return engine
