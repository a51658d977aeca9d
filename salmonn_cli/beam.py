"""transformers 4.28's beam search (`beam_search` / `beam_sample` with `BeamSearchScorer`), for (batch, beams).

The loop drives an `engine.DecodeEngine` (the LM and its KV cache); this module keeps the 4.28 bookkeeping:
one `BeamHypotheses` per prompt, its `_done` flag, the rank-based eos rule and `finalize`. A prompt that is done
is padded (score 0, token pad, source row 0) and never changes again, so every prompt of a batch ends exactly
as it would alone; the loop ends when every prompt is done or the ids reach `max_length`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .decode_watch import checkpoint

Hypothesis = tuple[float, tuple[int, ...]]  # (normalised score, ids including the bos placeholder)


class BeamHypotheses:
    """4.28 `BeamHypotheses` (early_stopping=False): the best `num_beams` finished hypotheses of one row."""

    def __init__(self, num_beams: int, length_penalty: float) -> None:
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.beams: list[Hypothesis] = []
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

    def best(self) -> Hypothesis:
        # stable sort + pop(): among equal scores the hypothesis added last wins, as in 4.28 `finalize`
        return sorted(self.beams, key=lambda item: item[0]).pop()


@dataclass(frozen=True)
class BeamStep:
    """The running beams after one step, on the device (`scores`, `tokens`, `rows`: (batch * beams,)) and on the
    host (`sources`, `host_scores`): built in host lists and sent as one tensor, not written number by number."""

    scores: torch.Tensor
    tokens: torch.Tensor
    rows: torch.Tensor
    sources: list[int]
    host_scores: list[float]

    @classmethod
    def of(cls, scores: list[float], tokens: list[int], rows: list[int], dtype, device) -> "BeamStep":
        # one host-to-device copy; float64 holds the scores (float32 or half) and every id and row exactly
        packed = torch.tensor([scores, tokens, rows], dtype=torch.float64).to(device)
        return cls(packed[0].to(dtype), packed[1].long(), packed[2].long(), rows, scores)


class BeamScorer:
    """4.28 `BeamSearchScorer.process` / `finalize` for (batch, beams) candidates, one hypothesis returned per row."""

    def __init__(self, batch_size: int, num_beams: int, length_penalty: float) -> None:
        self.num_beams = num_beams
        self.hyps = [BeamHypotheses(num_beams, length_penalty) for _ in range(batch_size)]
        self.done = [False] * batch_size

    def process(self, ids, next_scores, next_tokens, next_indices, eos: int, pad: int) -> "BeamStep":
        """Split the 2*beams ranked candidates of each row into finished hypotheses and the next running beams."""
        batch, k = len(self.hyps), self.num_beams
        # one read of the step's candidates (one wait on the device) instead of one per kind; float64 holds the
        # float32 scores and every id and row index exactly
        scores_all, tokens_all, sources_all = torch.stack(
            [next_scores.double(), next_tokens.double(), next_indices.double()]
        ).tolist()
        scores, tokens, rows = [0.0] * (batch * k), [pad] * (batch * k), [0] * (batch * k)
        for b, hyps in enumerate(self.hyps):
            if self.done[b]:
                continue  # 4.28 pads a finished row: score 0, token pad, source row 0
            taken = 0
            for rank, (token, score, source) in enumerate(
                zip(tokens_all[b], scores_all[b], sources_all[b], strict=True)
            ):
                token, row = int(token), b * k + int(source)
                if token == eos:
                    if rank >= k:  # an eos outside the top `beams` candidates is dropped
                        continue
                    hyps.add(tuple(ids[row].tolist()), score)
                else:
                    scores[b * k + taken], tokens[b * k + taken], rows[b * k + taken] = score, token, row
                    taken += 1
                if taken == k:
                    break
            self.done[b] = self.done[b] or hyps.is_done(max(scores_all[b]), ids.shape[-1])
        return BeamStep.of(scores, tokens, rows, next_scores.dtype, ids.device)

    def finalize(self, ids, beam_scores: list[float], max_length: int, eos: int) -> list[Hypothesis]:
        """Best (score, ids) per row; unfinished rows first admit their running beams with their running score
        (`beam_scores`: the last step's, on the host)."""
        results = []
        for b, hyps in enumerate(self.hyps):
            if not self.done[b]:
                for j in range(self.num_beams):
                    row = b * self.num_beams + j
                    hyps.add(tuple(ids[row].tolist()), beam_scores[row])
            score, hyp = hyps.best()
            # a finished hypothesis gets its eos back (4.28 pads to min(longest + 1, max_length): the same test)
            if len(hyp) < max_length:
                hyp = hyp + (eos,)
            results.append((score, hyp))
        return results


def beam_candidates(scores, num_beams: int, do_sample: bool, generator):
    """Top 2*beams candidates of (batch, beams*V) scores: topk (beam_search) or sampled then sorted (beam_sample).

    Sampling draws row by row from the one generator, so a row's draws depend on the rows before it.
    """
    if not do_sample:
        return torch.topk(scores, 2 * num_beams, dim=1, largest=True, sorted=True)
    probs = torch.softmax(scores, dim=-1)
    tokens = torch.multinomial(probs, num_samples=2 * num_beams, generator=generator)
    picked = torch.gather(scores, -1, tokens)
    picked, order = torch.sort(picked, descending=True, dim=1)
    return picked, torch.gather(tokens, -1, order)


def beam_decode(engine: Any, embeds, options: Any, processors, warpers, limits: Any, generator):
    """4.28 `beam_search` / `beam_sample` over every prompt of `embeds` (B, N, D): the best `Hypothesis` per prompt.

    `engine` is an `engine.DecodeEngine`, `limits` a `generate.DecodeLimits`; ids and scores are shaped
    (batch * beams, ...), prompt-major.
    """
    max_length, eos, bos, pad = limits.max_length, limits.eos, limits.bos, limits.pad
    batch, k = embeds.shape[0], options.num_beams
    device = embeds.device
    ids = torch.full((batch * k, 1), bos, dtype=torch.long, device=device)
    beam_scores = torch.zeros((batch, k), dtype=torch.float, device=device)
    if not options.do_sample:
        beam_scores[:, 1:] = -1e9  # beam_search only: identical beams must not all pick the same token
    beam_scores = beam_scores.view(-1)
    scorer = BeamScorer(batch, k, options.length_penalty)
    logits = engine.start(embeds, k, options.max_new_tokens)
    while True:
        scores = processors(ids, torch.log_softmax(logits, dim=-1))
        scores = scores + beam_scores[:, None].expand_as(scores)
        if options.do_sample:
            scores = warpers(ids, scores)  # 4.28 warps after adding the running beam scores
        vocab = scores.shape[-1]
        top_scores, top_ids = beam_candidates(scores.view(batch, k * vocab), k, options.do_sample, generator)
        sources = torch.div(top_ids, vocab, rounding_mode="floor")
        beams = scorer.process(ids, top_scores, top_ids % vocab, sources, eos, pad)
        beam_scores = beams.scores
        ids = torch.cat([ids[beams.rows, :], beams.tokens[:, None]], dim=-1)
        checkpoint()  # a watcher's stop flag (running beams have no settled ids to stream)
        # running beams never end in eos, so SALMONN's stop-at-eos criterion cannot fire here
        if all(scorer.done) or ids.shape[-1] >= max_length:
            break
        engine.reorder(beams.sources)
        logits = engine.step(beams.tokens)
    return scorer.finalize(ids, beams.host_scores, max_length, eos)
