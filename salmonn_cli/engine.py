"""The LLM's hot loop: a preallocated KV cache, beams reordered in place, and a fast one-token step where it can be
had (compiled with torch.compile, recorded as a CUDA graph), each falling back to a slower correct one.

`LlamaEngine` drives a Hugging Face LLaMA (optionally peft-wrapped, any quantised linear layers) through its own
modules: the token embedding, each `LlamaDecoderLayer` (attention, MLP, norms, LoRA: the model's code, so the
numbers are the model's), the final norm and the output head. Only the orchestration is ours:

- the KV cache (kv_cache.py) is kept per row count across calls (for the most recent row counts);
- the prompt (`inputs_embeds`) is run once, eagerly, exactly as transformers' forward runs it;
- a step feeds one id per row at the next position. The exact step (CPU, or nothing faster available) attends to
  exactly the filled part of the cache, as transformers' own dynamic cache does, so the ids are the same. The
  masked step attends over the whole cache through a mask built on the device from a position tensor, so all it
  reads are tensors at fixed addresses: the tokens, the position, the cache and the LoRA scales. That step is what
  gets compiled (`--compile`, step_compile.py) and, on CUDA, recorded once per row count as a CUDA graph
  (step_recording.py), every later step then one replay with no host synchronisation.

Failing safe: a model whose step cannot be recorded (LLM.int8) is never recorded; a recording or a compile that
raises leaves one line (notices.py) and the engine decodes the slower way from then on, without retrying.

The decode semantics (transformers 4.28's greedy, sampling and beam search) live in generate.py and beam.py and
see only `start`, `step` and `reorder`.
"""

from __future__ import annotations

import inspect
import os
import time
import warnings
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Protocol

import torch

from .kv_cache import EXACT, MASKED, PROMPT, Layout, StaticKV, additive_mask
from .llm import adapter_state, lora_scale_tensor
from .notices import inform, warn
from .step_compile import ALWAYS, NEVER, RECOMPILE_LIMIT, CompilePlan, StepShape
from .step_recording import CudaGraphRecorder, RecordedStep, Recorder

CAPACITY_STEP = 64  # cache lengths are rounded up to this, so prompts of similar length share one cache and graph
KEPT_ROW_COUNTS = 2  # on CUDA: a batch of 16 x 4 beams of 13B holds ~10 GB of cache, so not every one is kept
GRAPHS_ENV = "SALMONN_CUDA_GRAPHS"  # "0" turns graph capture off (eager CUDA steps), e.g. to compare the two
NO_COMPILING = CompilePlan()


class DecodeEngine(Protocol):
    """What the decode loops drive: prompts in, then one id per row at a time."""

    def start(self, inputs_embeds: torch.Tensor, beams: int, max_new_tokens: int) -> torch.Tensor:
        """Run the prompts (B, N, D); last-position logits (B * beams, V), each prompt's row repeated `beams` times."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one id per row (rows,) at the next position; logits (rows, V), valid until the next step."""

    def reorder(self, sources: Sequence[int]) -> None:
        """Row i of the cache becomes row `sources[i]` (beam search's surviving hypotheses)."""


@lru_cache(maxsize=None)
def cache_keyword(layer_class: type) -> str:
    """A decoder layer's (or model's) cache keyword: `cache` from transformers 5.2x (which deprecates
    `past_key_values` and drops it in 5.40), `past_key_values` before; a fact of the class, looked up once."""
    return "cache" if "cache" in inspect.signature(layer_class.forward).parameters else "past_key_values"


def capacity_for(positions: int, compiled: bool) -> int:
    """The cache length a call needing `positions` gets: the next multiple of CAPACITY_STEP, or when steps may be
    compiled (one graph per length) the next power of two of such multiples, so a long-lived process meets few."""
    steps = -(-positions // CAPACITY_STEP)
    if compiled:
        steps = 1 << (steps - 1).bit_length()
    return steps * CAPACITY_STEP


class LlamaEngine:
    """`DecodeEngine` over a Hugging Face LLaMA-family causal LM (`lm`: the model, or peft's wrapper around it).

    `capture`: record the masked step as a CUDA graph (default: on CUDA, unless SALMONN_CUDA_GRAPHS=0 or the model
    cannot be recorded); `recorder` records it another way (the tests' CPU stand-in). `masked_steps`: take the
    masked step even when it is neither recorded nor compiled (to compare its arithmetic with the exact step's).
    `compile`: which step shapes to compile (step_compile.CompilePlan). A cache (and its recorded step) is kept
    per row count, for the two most recently used row counts when recording and one otherwise (host memory is the
    scarcer there); `release()` frees them.
    """

    def __init__(
        self,
        lm: Any,
        *,
        capture: bool | None = None,
        masked_steps: bool = False,
        compile: CompilePlan = NO_COMPILING,
        recorder: Recorder | None = None,
    ) -> None:
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # peft keeps the HF modules in place
        self.base = base
        self.layout = Layout.of(base.config)
        self._embed = base.get_input_embeddings()
        self.device = self._embed.weight.device
        self._keyword = cache_keyword(type(base.model.layers[0]))
        # installed before anything is recorded or compiled: every step reads the scales from this one vector
        self._scales = lora_scale_tensor(base)
        self._adapter_state = adapter_state(base)
        self._recorder = recorder
        self.capture = self._capture_allowed(capture)
        self.masked_steps = masked_steps
        self.compile_plan = compile
        self.compile_seconds: list[float] = []  # each compile's start cost, in the order paid (the benchmark's)
        self._compiled: Any = None  # the compiled masked step, made on first need
        self._markers: Any = None  # the folder of step_compile's markers, once compiling is on
        self._identity: str | None = None  # what a compiled step depends on in the model (_model_identity)
        self._compiled_shapes: dict[tuple[int, int], bool] = {}  # (rows, capacity) -> compiled or not
        # caches (and recorded steps) kept: two row counts when recording (greedy and beams, say), one elsewhere
        self._keep = KEPT_ROW_COUNTS if self.capture else 1
        self._caches: dict[int, StaticKV] = {}
        self._recorded: dict[int, RecordedStep] = {}
        self._cache: StaticKV | None = None  # the current call's

    # -- the DecodeEngine protocol -------------------------------------------------------------------------
    def start(self, inputs_embeds: torch.Tensor, beams: int, max_new_tokens: int) -> torch.Tensor:
        self._follow_the_adapter()
        batch, length = inputs_embeds.shape[:2]
        # the last generated id is never fed, so prompt + max_new_tokens positions always suffice
        capacity = capacity_for(length + max_new_tokens, self.compile_plan.when != NEVER)
        cache = self._cache_for(batch * beams, capacity, inputs_embeds.dtype)
        cache.length, cache.phase = 0, PROMPT
        positions = torch.arange(length, device=inputs_embeds.device)[None]
        hidden = self._layers(inputs_embeds, positions, self._prompt_mask(length, inputs_embeds.dtype), cache)
        cache.length = length
        # the head runs on every prompt position, as transformers' forward does: on the last alone the matrix
        # product takes another path and the logits move in the last bits (~4e-6), enough to risk an id
        return self._head(hidden).repeat_interleave(beams, dim=0)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        cache = self._cache
        logits = self._fast_step(tokens, cache)
        if logits is None:
            cache.phase = EXACT
            logits = self._exact_step(tokens, cache)
        cache.length += 1
        return logits

    def reorder(self, sources: Sequence[int]) -> None:
        self._cache.reorder(sources)

    def release(self) -> None:
        """Free every cache and recorded step (the next call allocates and, on CUDA, records again)."""
        self._caches.clear()
        self._recorded.clear()
        self._cache = None

    # -- the fast step and its fallbacks ---------------------------------------------------------------------
    def _fast_step(self, tokens: torch.Tensor, cache: StaticKV) -> torch.Tensor | None:
        """The masked step, compiled and/or recorded where this engine does either; None: take the exact step."""
        compiled = self._compiled_for(cache)
        if not (compiled or self.capture or self.masked_steps):
            return None
        cache.phase = MASKED
        cache.position.fill_(cache.length)  # a device-side write outside any graph: the step reads the tensor
        if compiled and (cache.rows, cache.capacity) not in self._compiled_shapes and not self._compile(tokens, cache):
            compiled = False
        step = self._compiled if compiled else self._masked_step
        if not self.capture:
            return step(tokens, cache) if compiled or self.masked_steps else None
        recorded = self._recorded.get(cache.rows)
        if recorded is None or recorded.cache is not cache or recorded.step != step:  # its cache, its step function
            recorded = self._recorded[cache.rows] = RecordedStep(cache, step, self._recorder or CudaGraphRecorder())
        try:
            return recorded.run(tokens)
        except RuntimeError as error:  # torch's errors from a refused recording (AcceleratorError is one)
            self._stop_recording(error)
            return step(tokens, cache) if compiled else None

    def _compiled_for(self, cache: StaticKV) -> bool:
        """Whether this cache's steps are compiled: the plan's answer for its shape, decided once per shape."""
        if self.compile_plan.when == NEVER:
            return False
        shape = (cache.rows, cache.capacity)
        decided = self._compiled_shapes.get(shape)
        if decided is None:
            decided = self.compile_plan.when == ALWAYS or self._compiled_here_before(cache)
            if decided and self._compiled is None and not self._make_compiled():
                return False
            if not decided:
                self._compiled_shapes[shape] = False
        return decided

    def _make_compiled(self) -> bool:
        from quantize import uncompilable_reason

        from .step_compile import use_compile_cache

        reason = uncompilable_reason(self.base)
        if reason is not None:
            if self.compile_plan.asked:
                warn(f"the decode step is not compiled: {reason}")
            self.compile_plan = NO_COMPILING
            return False
        self._markers = use_compile_cache()
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self._compiled = torch.compile(self._masked_step, fullgraph=True, dynamic=False)
        return True

    def _compile(self, tokens: torch.Tensor, cache: StaticKV) -> bool:
        """Compile the step for this cache's shape now (its first run; the position it writes is written again by
        the run that follows, with the same values), timing the start cost. False: compiling failed."""
        from .step_compile import mark_compiled, was_compiled

        shape = self._step_shape(cache)
        first_here = not was_compiled(self._markers, shape)
        started = time.perf_counter()
        try:
            with warnings.catch_warnings():  # what PyTorch says to the authors of quanto's tensors, not to a user
                warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")
                self._compiled(tokens, cache)
        except RuntimeError as error:  # dynamo's and inductor's errors are RuntimeErrors
            self._stop_compiling(error)
            return False
        seconds = time.perf_counter() - started
        if first_here and not self.compile_seconds:  # the start cost, said once: the first time on this machine
            inform(f"compiled the decode step in {seconds:.1f} s, once for this machine and shape (kept in "
                   f"{self._markers.parent})")  # fmt: skip
        self.compile_seconds.append(seconds)
        self._compiled_shapes[(cache.rows, cache.capacity)] = True
        mark_compiled(self._markers, shape, seconds)
        return True

    def _compiled_here_before(self, cache: StaticKV) -> bool:
        from .step_compile import use_compile_cache, was_compiled

        return was_compiled(use_compile_cache(), self._step_shape(cache))

    def _step_shape(self, cache: StaticKV) -> StepShape:
        if self._identity is None:  # read once: the config's JSON and every module's type
            self._identity = _model_identity(self.base)
        return StepShape(self._identity, cache.rows, cache.capacity, _device_name(self.device), _versions())

    def _stop_recording(self, error: RuntimeError) -> None:
        self.capture = False
        self._recorded.clear()
        warn(f"recording the decode step as a CUDA graph failed ({_first_line(error)}): decoding goes on without it, "
             f"which is slower (SALMONN_CUDA_GRAPHS=0 skips the attempt)")  # fmt: skip

    def _stop_compiling(self, error: RuntimeError) -> None:
        self.compile_plan, self._compiled = NO_COMPILING, None
        self._compiled_shapes.clear()
        warn(
            f"compiling the decode step failed ({_first_line(error)}): decoding goes on uncompiled, which is slower"
            " (--compile off skips the attempt)"
        )

    def _capture_allowed(self, asked: bool | None) -> bool:
        from quantize import unrecordable_reason

        on_cuda = self.device.type == "cuda"
        if asked is None:
            asked = on_cuda and os.environ.get(GRAPHS_ENV, "1") != "0"
        if not asked or not (on_cuda or self._recorder is not None):
            return False
        reason = unrecordable_reason(self.base)
        if reason is not None:
            warn(f"the decode step is not recorded as a CUDA graph: {reason}; each step runs eagerly, which is slower")
            return False
        return True

    def _follow_the_adapter(self) -> None:
        """Before each call: scalings peft replaced go back into the scale vector every step reads (lora_scale_tensor),
        and a changed adapter state (disabled, merged, another adapter active) drops the steps recorded under the old
        one (a compiled step's own guards recompile it)."""
        scales, state = lora_scale_tensor(self.base), adapter_state(self.base)
        if state != self._adapter_state or scales is not self._scales:  # (a new vector: the model moved devices)
            self._scales, self._adapter_state = scales, state
            self._recorded.clear()

    # -- the model's arithmetic ---------------------------------------------------------------------------------
    def _cache_for(self, rows: int, capacity: int, dtype: torch.dtype) -> StaticKV:
        cache = self._caches.pop(rows, None)  # re-inserted below: the dict's order is least recently used first
        if cache is None or not cache.fits(rows, capacity, dtype):
            cache = self._cache = None  # an unfit cache is freed before its successor is allocated
            self._recorded.pop(rows, None)  # a recorded step is bound to its cache's memory
            while len(self._caches) > self._keep - 1:  # and so are the least recently used beyond the kept number
                oldest = next(iter(self._caches))
                del self._caches[oldest]
                self._recorded.pop(oldest, None)
            cache = StaticKV(self.layout, rows, capacity, dtype, self.device)
        self._caches[rows] = self._cache = cache
        return cache

    def _masked_step(self, tokens: torch.Tensor, cache: StaticKV) -> torch.Tensor:
        """One id per row at `cache.position`, attending over the whole cache: reads tensors only (recordable)."""
        hidden = self._embed(tokens[:, None])
        mask = cache.step_mask(hidden.dtype)
        return self._head(self._layers(hidden, cache.position.view(1, 1), mask, cache))

    def _exact_step(self, tokens: torch.Tensor, cache: StaticKV) -> torch.Tensor:
        """One id per row at `cache.length`, attending to exactly the filled positions (transformers' numbers)."""
        hidden = self._embed(tokens[:, None])
        positions = torch.full((1, 1), cache.length, dtype=torch.long, device=tokens.device)
        return self._head(self._layers(hidden, positions, None, cache))

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
        return additive_mask(blocked, dtype)[None, None]

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.base.lm_head(self.base.model.norm(hidden))[:, -1, :]


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def _model_identity(base: Any) -> str:
    """What a compiled step depends on in the model: its config, dtype and the kinds of its layers."""
    kinds = sorted({f"{type(m).__module__}.{type(m).__name__}" for m in base.modules()})
    return f"{base.config.to_json_string(use_diff=False)}|{base.get_input_embeddings().weight.dtype}|{kinds}"


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@lru_cache(maxsize=1)
def _versions() -> str:
    from importlib.metadata import version

    return " ".join(f"{name} {version(name)}" for name in ("torch", "transformers", "peft"))


_ENGINE_ATTRIBUTE = "_salmonn_decode_engine"


def engine_for(lm: Any) -> LlamaEngine:
    """The one engine of a model (created on first use), so its caches, recorded and compiled steps serve every call.

    Kept on the model itself (a plain attribute, not a submodule): it lives and dies with the model.
    """
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    engine = base.__dict__.get(_ENGINE_ATTRIBUTE)
    if engine is None:
        engine = LlamaEngine(base)
        base.__dict__[_ENGINE_ATTRIBUTE] = engine
    return engine


def plan_compile(lm: Any, plan: CompilePlan) -> None:
    """Which step shapes the engine of `lm` compiles from now on (`step_compile.compile_plan`)."""
    engine_for(lm).compile_plan = plan
