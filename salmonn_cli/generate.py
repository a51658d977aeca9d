"""Token decoding that reproduces transformers 4.28's `generate()` exactly, as SALMONN's reference used it.

SALMONN calls `PeftModel.generate(inputs_embeds=..., ...)` under transformers 4.28. That version starts
inputs_embeds-only generation from `input_ids = [[bos]]`: a placeholder that is never fed to the model but
counts for `min_length`, for the repetition penalty (id 1 is penalised from step 1) and for beam-search
length normalisation. Current transformers starts from an empty id tensor and its vectorised beam search
normalises and early-stops differently, so its ids differ. This module re-implements 4.28's `greedy_search`,
`sample`, `beam_search` and `beam_sample` on top of the real parts: the LLM's own layers, driven with a static KV
cache (and on CUDA a captured step) by engine.py, and transformers' own logits processors, applied to an id
tensor that includes the placeholder.

`decode_batch` runs B prompts of one length together (segments of a long file share the prompt and have the
same number of audio tokens); every row gets the semantics it would get alone. Beam search lives in beam.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from .beam import beam_decode
from .decode_options import DecodeOptions
from .decode_watch import checkpoint
from .engine import DecodeEngine, engine_for
from .errors import UsageError

LLAMA_BOS, LLAMA_EOS, LLAMA_PAD = 1, 2, 0  # LLaMA's ids (pad: <unk>), for callers that pass no tokenizer's


class DecodeLimits(NamedTuple):
    """When a row stops and what fills it: `max_length` counts the bos placeholder (4.28's max_length)."""

    max_length: int
    eos: int
    bos: int  # the placeholder 4.28 starts from; never fed to the model
    pad: int  # fed to greedy rows that already finished; never part of an answer


@dataclass(frozen=True)
class DecodeOutput:
    """What `decode` produced.

    `token_ids`: the new ids without the bos placeholder, ending with eos when generation ended with eos.
    `sequence_score`: beam search only: the winning hypothesis' normalised score (HF `sequences_scores`).
    `step_scores`: without beams: float32 (n, V), the scores 4.28 returned per step (after processors and,
    when sampling, warpers); None when `decode_batch` was asked not to keep them.
    """

    token_ids: tuple[int, ...]
    sequence_score: float | None = None
    step_scores: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Timings:
    """Wall-clock seconds spent per stage of one generation."""

    encode_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0


@dataclass(frozen=True)
class GenerationResult:
    """The answer to one prompt: decoded text, the generated ids (as `DecodeOutput.token_ids`) and timings."""

    text: str
    token_ids: list[int]
    timings: Timings = field(default_factory=Timings)


def build_logits_processors(options: DecodeOptions, eos_token_id: int, device: torch.device | str = "cpu"):
    """4.28 `_get_logits_processor` for SALMONN's settings: repetition penalty, then min length."""
    from transformers import LogitsProcessorList, MinLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor

    processors = LogitsProcessorList()
    if options.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty=float(options.repetition_penalty)))
    if options.min_length > 0:
        processors.append(MinLengthLogitsProcessor(options.min_length, eos_token_id, device=str(device)))
    return processors


def build_logits_warpers(options: DecodeOptions):
    """4.28 `_get_logits_warper`: temperature, top-k, top-p; beams keep at least 2 tokens."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    keep = 2 if options.num_beams > 1 else 1
    warpers = LogitsProcessorList()
    if options.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(options.temperature)))
    if options.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=options.top_k, min_tokens_to_keep=keep))
    if options.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=float(options.top_p), min_tokens_to_keep=keep))
    return warpers


# Off CUDA a host check costs nothing; on CUDA greedy rows are checked for "all finished" every few steps, so the
# host does not wait on the device each step (the extra steps feed pad to finished rows and change no row's ids).
# Sampling checks every step: an extra step would draw from the generator and change the next call's draws.
STOP_CHECK_STEPS = 8


def _stop_check_interval(options: DecodeOptions, device: torch.device) -> int:
    return STOP_CHECK_STEPS if device.type == "cuda" and not options.do_sample else 1


def _greedy_or_sample(
    engine: DecodeEngine, embeds, options, processors, warpers, limits: DecodeLimits, generator, keep_scores
) -> list[DecodeOutput]:
    """4.28 `greedy_search` / `sample`: a row stops at eos, or all stop when ids (placeholder included) hit max_length.

    As in 4.28, a row that produced eos is fed pad from then on and its later steps are ignored; the loop ends
    when every row has finished (4.28's `unfinished_sequences`) or at max_length.
    """
    max_length, eos, bos, pad = limits.max_length, limits.eos, limits.bos, limits.pad
    batch, device = embeds.shape[0], embeds.device
    ids = torch.full((batch, 1), bos, dtype=torch.long, device=device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    generated = torch.zeros(batch, dtype=torch.long, device=device)  # ids per row up to and including its eos
    check_every = _stop_check_interval(options, device)
    logits = engine.start(embeds, 1, options.max_new_tokens)
    step_scores = []
    while True:
        scores = processors(ids, logits)
        if options.do_sample:
            scores = warpers(ids, scores)
            probs = torch.softmax(scores, dim=-1)
            # one draw per row, in row order, from the one generator (as 4.28's batched multinomial)
            next_tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
        else:
            next_tokens = torch.argmax(scores, dim=-1)
        if keep_scores:
            step_scores.append(scores.float().cpu())
        next_tokens = torch.where(unfinished, next_tokens, pad)
        checkpoint(next_tokens)  # a watcher's stop flag, and the ids it streams (nothing when unwatched)
        ids = torch.cat([ids, next_tokens[:, None]], dim=-1)
        generated += unfinished
        unfinished &= next_tokens != eos
        # 4.28's MaxLengthCriteria and SALMONN's stop-at-eos criterion (each row as if alone)
        if ids.shape[-1] >= max_length or (ids.shape[-1] % check_every == 0 and not unfinished.any()):
            break
        logits = engine.step(next_tokens)
    counts, rows = generated.tolist(), ids[:, 1:].tolist()
    table = torch.stack(step_scores, dim=1).numpy() if keep_scores else None  # (batch, steps, V)
    return [
        DecodeOutput(token_ids=tuple(row[:n]), step_scores=None if table is None else table[b, :n])
        for b, (row, n) in enumerate(zip(rows, counts, strict=True))
    ]


def decode_batch(
    lm: torch.nn.Module | DecodeEngine,
    inputs_embeds: torch.Tensor,
    options: DecodeOptions,
    *,
    eos_token_id: int = LLAMA_EOS,
    bos_token_id: int = LLAMA_BOS,
    pad_token_id: int = LLAMA_PAD,
    generator: torch.Generator | None = None,
    keep_step_scores: bool = True,
) -> list[DecodeOutput]:
    """Generate from B prompts of one length, `inputs_embeds` (B, N, D): one `DecodeOutput` per row, in order.

    Each row gets exactly the 4.28 semantics it gets alone (`decode`): greedy rows that finished are fed pad and
    ignored until every row has finished; beam search keeps one hypothesis set and one `done` flag per row.
    Without sampling row i's ids are those of decoding row i alone (up to the last-bit rounding differences of
    batched matrix products). With sampling the rows draw one after another from the one `generator`, so a
    row's ids depend on the whole batch (as in Hugging Face): a seed reproduces a batch, not a row.
    Unlike SALMONN's own stopping criterion, which looked at row 0 only, no row cuts another short.
    `keep_step_scores=False` skips the per-step score copies (greedy/sample) that only tests and tools read.
    """
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[0] < 1:
        raise UsageError(f"inputs_embeds must be (B, N, D) with B >= 1, got {tuple(inputs_embeds.shape)}")
    limits = DecodeLimits(1 + options.max_new_tokens, eos_token_id, bos_token_id, pad_token_id)  # placeholder + new
    processors = build_logits_processors(options, eos_token_id, inputs_embeds.device)
    warpers = build_logits_warpers(options) if options.do_sample else None
    engine = engine_for(lm) if isinstance(lm, torch.nn.Module) else lm
    with torch.inference_mode():
        if options.num_beams == 1:
            return _greedy_or_sample(
                engine, inputs_embeds, options, processors, warpers, limits, generator, keep_step_scores
            )
        best = beam_decode(engine, inputs_embeds, options, processors, warpers, limits, generator)
    return [DecodeOutput(token_ids=tuple(hyp[1:]), sequence_score=float(score)) for score, hyp in best]


def decode(
    lm: torch.nn.Module | DecodeEngine,
    inputs_embeds: torch.Tensor,
    options: DecodeOptions,
    *,
    eos_token_id: int = LLAMA_EOS,
    bos_token_id: int = LLAMA_BOS,
    pad_token_id: int = LLAMA_PAD,
    generator: torch.Generator | None = None,
) -> DecodeOutput:
    """Generate from `inputs_embeds` (1, N, D) exactly as transformers 4.28's `generate` did for SALMONN.

    `lm` is a Hugging Face LLaMA-family causal LM (optionally wrapped by peft), driven by its one
    `engine.LlamaEngine` (`engine_for`), or any `engine.DecodeEngine`. Greedy / sampling for `num_beams == 1`,
    beam search / beam sampling otherwise; `generator` drives every random draw (None: torch's global RNG,
    as in 4.28). The bos placeholder is part of the ids the processors and the beam scorer see, never of the
    model input. Several prompts at once: `decode_batch`.
    """
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[0] != 1:
        raise UsageError(
            f"decode takes one prompt: inputs_embeds of shape (1, N, D), got {tuple(inputs_embeds.shape)}"
            " (decode_batch takes several)"
        )
    return decode_batch(
        lm,
        inputs_embeds,
        options,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
        pad_token_id=pad_token_id,
        generator=generator,
    )[0]


def seeded_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """The generator every random draw of a run comes from, seeded on `device`; None (torch's global RNG) unseeded.

    torch's global RNG is seeded too, so anything drawing outside the generator is reproducible as well.
    """
    if seed is None:
        return None
    torch.manual_seed(seed)
    return torch.Generator(device=device).manual_seed(seed)
