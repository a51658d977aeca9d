"""Token decoding that reproduces transformers 4.28's `generate()` exactly, as SALMONN's reference used it.

SALMONN calls `PeftModel.generate(inputs_embeds=..., ...)` under transformers 4.28. That version starts
inputs_embeds-only generation from `input_ids = [[bos]]`: a placeholder that is never fed to the model but
counts for `min_length`, for the repetition penalty (id 1 is penalised from step 1) and for beam-search
length normalisation. Current transformers starts from an empty id tensor and its vectorised beam search
normalises and early-stops differently, so its ids differ. This module re-implements 4.28's `greedy_search`,
`sample`, `beam_search` and `beam_sample` on top of the real parts: the causal LM's forward with its KV cache
and transformers' own logits processors, applied to an id tensor that includes the placeholder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import UsageError


@dataclass(frozen=True)
class DecodeOptions:
    """Decoding settings, named as in SALMONN's generate_cfg / transformers 4.28's GenerationConfig."""

    max_new_tokens: int = 200
    num_beams: int = 4
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 50  # 4.28's GenerationConfig default; only used when sampling
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    min_length: int = 1  # counts the bos placeholder, as in 4.28

    def __post_init__(self) -> None:
        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_real(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        problems = []
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not is_int(self.num_beams) or self.num_beams < 1:
            problems.append(f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        if not isinstance(self.do_sample, bool):
            problems.append(f"do_sample must be true or false, got {self.do_sample!r}")
        if not is_real(self.temperature) or (self.do_sample and self.temperature <= 0):
            problems.append(f"temperature must be > 0 when sampling, got {self.temperature!r}")
        if not is_real(self.top_p) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        if not is_real(self.length_penalty):
            problems.append(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if not is_int(self.min_length) or self.min_length < 0:
            problems.append(f"min_length must be an integer >= 0, got {self.min_length!r}")
        if problems:
            raise UsageError("; ".join(problems))


@dataclass(frozen=True)
class DecodeOutput:
    """What `decode` produced.

    `token_ids`: the new ids without the bos placeholder, ending with eos when generation ended with eos.
    `sequence_score`: beam search only: the winning hypothesis' normalised score (HF `sequences_scores`).
    `step_scores`: without beams: float32 (n, V), the scores 4.28 returned per step (after processors and,
    when sampling, warpers).
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


class _Stepper:
    """Feeds the LM as 4.28 did: the embeddings once (never the placeholder), then one id per row + KV cache."""

    def __init__(self, lm: Any, inputs_embeds: torch.Tensor) -> None:
        self.lm = lm
        self.embeds = inputs_embeds
        self.next_position = inputs_embeds.shape[1]  # first generated id sits at position N
        self.cache: Any = None

    def prefill(self, rows: int) -> torch.Tensor:
        """Last-position logits of the prompt, repeated for `rows` rows (beams share one prompt pass)."""
        n, device = self.embeds.shape[1], self.embeds.device
        out = self.lm(
            inputs_embeds=self.embeds,
            attention_mask=torch.ones((1, n), dtype=torch.long, device=device),
            position_ids=torch.arange(n, device=device)[None],
            use_cache=True,
        )
        self.cache = out.past_key_values
        if rows > 1:
            self.cache.batch_repeat_interleave(rows)
        return out.logits[:, -1, :].expand(rows, -1).clone()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits after feeding one id per row (`tokens` (rows,)) at the next position."""
        rows, position, device = tokens.shape[0], self.next_position, tokens.device
        out = self.lm(
            input_ids=tokens[:, None],
            attention_mask=torch.ones((rows, position + 1), dtype=torch.long, device=device),
            position_ids=torch.full((rows, 1), position, dtype=torch.long, device=device),
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = out.past_key_values
        self.next_position += 1
        return out.logits[:, -1, :]

    def reorder(self, beam_idx: torch.Tensor) -> None:
        self.cache.reorder_cache(beam_idx)


def _greedy_or_sample(stepper, options, processors, warpers, max_length, eos, bos, generator) -> DecodeOutput:
    """4.28 `greedy_search` / `sample` for one row: stop at eos or when ids (placeholder included) hit max_length."""
    ids = torch.full((1, 1), bos, dtype=torch.long, device=stepper.embeds.device)
    logits = stepper.prefill(1)
    step_scores = []
    while True:
        scores = processors(ids, logits)
        if options.do_sample:
            scores = warpers(ids, scores)
            probs = torch.softmax(scores, dim=-1)
            next_tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
        else:
            next_tokens = torch.argmax(scores, dim=-1)
        step_scores.append(scores[0].float().cpu().numpy())
        ids = torch.cat([ids, next_tokens[:, None]], dim=-1)
        # SALMONN's stopping criterion (last id of row 0 is eos) and 4.28's MaxLengthCriteria
        if next_tokens[0].item() == eos or ids.shape[-1] >= max_length:
            break
        logits = stepper.step(next_tokens)
    return DecodeOutput(token_ids=tuple(ids[0, 1:].tolist()), step_scores=np.stack(step_scores))


class _BeamHypotheses:
    """4.28 `BeamHypotheses` (early_stopping=False): the best `num_beams` finished hypotheses of one row."""

    def __init__(self, num_beams: int, length_penalty: float) -> None:
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.beams: list[tuple[float, tuple[int, ...]]] = []
        self.worst_score = 1e9

    def add(self, hyp: tuple[int, ...], sum_logprobs: float) -> None:
        # the length includes the bos placeholder (and, for finished hypotheses, excludes the eos)
        score = sum_logprobs / (len(hyp) ** self.length_penalty)
        if len(self.beams) < self.num_beams or score > self.worst_score:
            self.beams.append((score, hyp))
            if len(self.beams) > self.num_beams:
                ranked = sorted((s, idx) for idx, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        # 4.28 heuristic: the best candidate of this step, normalised by the current length
        if len(self.beams) < self.num_beams:
            return False
        return self.worst_score >= best_sum_logprobs / cur_len**self.length_penalty

    def best(self) -> tuple[float, tuple[int, ...]]:
        # stable sort + pop(): among equal scores the hypothesis added last wins, as in 4.28 `finalize`
        return sorted(self.beams, key=lambda item: item[0]).pop()


class _BeamScorer:
    """4.28 `BeamSearchScorer.process` / `finalize` for (batch, beams) candidates, one hypothesis returned per row."""

    def __init__(self, batch_size: int, num_beams: int, length_penalty: float) -> None:
        self.num_beams = num_beams
        self.hyps = [_BeamHypotheses(num_beams, length_penalty) for _ in range(batch_size)]
        self.done = [False] * batch_size

    def process(self, ids, next_scores, next_tokens, next_indices, eos: int, pad: int):
        """Split the 2*beams ranked candidates of each row into finished hypotheses and the next running beams."""
        batch, k = len(self.hyps), self.num_beams
        beam_scores = torch.zeros((batch, k), dtype=next_scores.dtype, device=ids.device)
        beam_tokens = torch.full((batch, k), pad, dtype=next_tokens.dtype, device=ids.device)
        beam_rows = torch.zeros((batch, k), dtype=next_indices.dtype, device=ids.device)
        for b, hyps in enumerate(self.hyps):
            if self.done[b]:
                continue  # 4.28 pads a finished row: score 0, token pad, source row 0
            taken = 0
            for rank, (token, score, source) in enumerate(
                zip(next_tokens[b].tolist(), next_scores[b].tolist(), next_indices[b].tolist(), strict=True)
            ):
                row = b * k + source
                if token == eos:
                    if rank >= k:  # an eos outside the top `beams` candidates is dropped
                        continue
                    hyps.add(tuple(ids[row].tolist()), score)
                else:
                    beam_scores[b, taken], beam_tokens[b, taken], beam_rows[b, taken] = score, token, row
                    taken += 1
                if taken == k:
                    break
            self.done[b] = self.done[b] or hyps.is_done(next_scores[b].max().item(), ids.shape[-1])
        return beam_scores.view(-1), beam_tokens.view(-1), beam_rows.view(-1)

    def finalize(self, ids, beam_scores, max_length: int, eos: int) -> list[tuple[float, tuple[int, ...]]]:
        """Best (score, ids) per row; unfinished rows first admit their running beams with their running score."""
        results = []
        for b, hyps in enumerate(self.hyps):
            if not self.done[b]:
                for j in range(self.num_beams):
                    row = b * self.num_beams + j
                    hyps.add(tuple(ids[row].tolist()), beam_scores[row].item())
            score, hyp = hyps.best()
            if len(hyp) < max_length:  # a finished hypothesis gets its eos back
                hyp = hyp + (eos,)
            results.append((score, hyp))
        return results


def _beam_candidates(scores, num_beams: int, do_sample: bool, generator):
    """Top 2*beams candidates of (batch, beams*V) scores: topk (beam_search) or sampled then sorted (beam_sample)."""
    if not do_sample:
        return torch.topk(scores, 2 * num_beams, dim=1, largest=True, sorted=True)
    probs = torch.softmax(scores, dim=-1)
    tokens = torch.multinomial(probs, num_samples=2 * num_beams, generator=generator)
    picked = torch.gather(scores, -1, tokens)
    picked, order = torch.sort(picked, descending=True, dim=1)
    return picked, torch.gather(tokens, -1, order)


def _beam_decode(stepper, options, processors, warpers, max_length, eos, bos, pad, generator) -> DecodeOutput:
    """4.28 `beam_search` / `beam_sample` for one prompt (batch 1, shaped (batch, beams) throughout)."""
    batch, k = 1, options.num_beams
    device = stepper.embeds.device
    ids = torch.full((batch * k, 1), bos, dtype=torch.long, device=device)
    beam_scores = torch.zeros((batch, k), dtype=torch.float, device=device)
    if not options.do_sample:
        beam_scores[:, 1:] = -1e9  # beam_search only: identical beams must not all pick the same token
    beam_scores = beam_scores.view(-1)
    scorer = _BeamScorer(batch, k, options.length_penalty)
    logits = stepper.prefill(batch * k)
    while True:
        scores = processors(ids, torch.log_softmax(logits, dim=-1))
        scores = scores + beam_scores[:, None].expand_as(scores)
        if options.do_sample:
            scores = warpers(ids, scores)  # 4.28 warps after adding the running beam scores
        vocab = scores.shape[-1]
        top_scores, top_ids = _beam_candidates(scores.view(batch, k * vocab), k, options.do_sample, generator)
        sources = torch.div(top_ids, vocab, rounding_mode="floor")
        beam_scores, tokens, rows = scorer.process(ids, top_scores, top_ids % vocab, sources, eos, pad)
        ids = torch.cat([ids[rows, :], tokens[:, None]], dim=-1)
        # running beams never end in eos, so SALMONN's stop-at-eos criterion cannot fire here
        if all(scorer.done) or ids.shape[-1] >= max_length:
            break
        stepper.reorder(rows)
        logits = stepper.step(tokens)
    score, hyp = scorer.finalize(ids, beam_scores, max_length, eos)[0]
    return DecodeOutput(token_ids=tuple(hyp[1:]), sequence_score=float(score))


def decode(
    lm: Any,
    inputs_embeds: torch.Tensor,
    options: DecodeOptions,
    *,
    eos_token_id: int = 2,
    bos_token_id: int = 1,
    pad_token_id: int = 0,
    generator: torch.Generator | None = None,
) -> DecodeOutput:
    """Generate from `inputs_embeds` (1, N, D) exactly as transformers 4.28's `generate` did for SALMONN.

    `lm` is a Hugging Face causal LM (optionally wrapped by peft). Greedy / sampling for `num_beams == 1`,
    beam search / beam sampling otherwise; `generator` drives every random draw (None: torch's global RNG,
    as in 4.28). The bos placeholder is part of the ids the processors and the beam scorer see, never of the
    model input.
    """
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[0] != 1:
        raise UsageError(f"decode takes one prompt: inputs_embeds of shape (1, N, D), got {tuple(inputs_embeds.shape)}")
    max_length = 1 + options.max_new_tokens  # 4.28: input_ids length (the placeholder) + max_new_tokens
    processors = build_logits_processors(options, eos_token_id, inputs_embeds.device)
    warpers = build_logits_warpers(options) if options.do_sample else None
    with torch.inference_mode():
        stepper = _Stepper(lm, inputs_embeds)
        if options.num_beams == 1:
            return _greedy_or_sample(
                stepper, options, processors, warpers, max_length, eos_token_id, bos_token_id, generator
            )
        return _beam_decode(
            stepper, options, processors, warpers, max_length, eos_token_id, bos_token_id, pad_token_id, generator
        )
