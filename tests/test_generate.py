"""Decoding: transformers 4.28 generate() semantics, checked on the reference cases and on hand-made score tables."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from salmonn_cli.errors import UsageError
from salmonn_cli.generate import DecodeOptions, DecodeOutput, GenerationResult, Timings, decode
from salmonn_cli.llm import lora_scales
from salmonn_cli.llm import scaled_lora as lora_scale
from tests.reference import case_paths, load_case

CASES = case_paths()
CASE_IDS = [path.stem for path in CASES]
EOS = 2


# --------------------------------------------------------------------------------------------------
# reference cases


def _build_reference_lm(components: Path):
    """LLaMA + SALMONN's LoRA matrices through the package's own loaders (llm.py, checkpoint.py)."""
    from salmonn_cli.checkpoint import read_salmonn_checkpoint
    from salmonn_cli.llm import LoraSpec, attach_lora, load_language_model

    ckpt = read_salmonn_checkpoint(components / "salmonn.pth")
    lm = load_language_model(components / "llm", dtype=torch.float32, device="cpu")
    lm = attach_lora(lm, LoraSpec(ckpt.lora_shape), ckpt.lora, path=ckpt.path)
    # the names line up: every LoRA tensor of the file is now the model's, and the model has no other LoRA tensor
    state = lm.state_dict()
    model_lora = {key for key in state if ".lora_" in key}
    assert ckpt.lora and model_lora == set(ckpt.lora), (sorted(model_lora ^ set(ckpt.lora)))[:4]
    for key, value in ckpt.lora.items():
        assert torch.equal(state[key], value.to(state[key].dtype)), key
    return lm


@pytest.fixture(scope="session")
def reference_lm():
    """`reference_lm(case)` -> the case's LM (LoRA scale lora_alpha / r), built once per component set."""
    built: dict[Path, object] = {}

    def get(case):
        key = case.components.resolve()
        if key not in built:
            built[key] = _build_reference_lm(case.components)
        return built[key]

    return get


def _embeds(case) -> torch.Tensor:
    embeds = torch.from_numpy(case.arrays["inputs_embeds"])
    assert embeds.dim() == 3 and embeds.shape[0] == 1
    return embeds


@pytest.mark.parametrize("json_path", CASES, ids=CASE_IDS)
def test_reference_lora_scale_is_alpha_over_rank(json_path, reference_lm):
    case = load_case(json_path)
    assert lora_scales(reference_lm(case)) == {case.meta["lora_scale"]}


@pytest.mark.parametrize("json_path", CASES, ids=CASE_IDS)
def test_reference_greedy(json_path, reference_lm):
    case = load_case(json_path)
    out = decode(reference_lm(case), _embeds(case), DecodeOptions(**case.meta["generation"]["greedy"]))
    expected = case.arrays["greedy_ids"]
    assert expected[0] == 1  # the 4.28 placeholder, not a generated id
    assert list(out.token_ids) == expected[1:].tolist()
    reference_scores = case.arrays["greedy_scores"][:, : case.vocab_size]  # drop the [PAD] column
    assert out.step_scores.shape == reference_scores.shape
    assert out.step_scores.dtype == np.float32
    worst = float(np.abs(out.step_scores - reference_scores).max())
    assert worst <= 1e-3, f"greedy scores differ by {worst:.3g}"


@pytest.mark.parametrize("json_path", CASES, ids=CASE_IDS)
def test_reference_beam(json_path, reference_lm):
    case = load_case(json_path)
    out = decode(reference_lm(case), _embeds(case), DecodeOptions(**case.meta["generation"]["beam"]))
    assert list(out.token_ids) == case.arrays["beam_ids"][1:].tolist()
    # the reference's log-softmax had one more ([PAD]) column: scores agree only to ~1e-5 here
    assert out.sequence_score == pytest.approx(float(case.arrays["beam_sequence_score"]), abs=1e-3)


@pytest.mark.parametrize("scale, key", [(2.0, "greedy_ids_lora_scale_2p0"), (0.0, "greedy_ids_lora_scale_0p0")])
@pytest.mark.parametrize("json_path", CASES, ids=CASE_IDS)
def test_reference_greedy_lora_scale_variants(json_path, scale, key, reference_lm):
    case = load_case(json_path)
    assert scale in case.meta["lora_scale_variants"]
    lm = reference_lm(case)
    with lora_scale(lm, scale):
        out = decode(lm, _embeds(case), DecodeOptions(**case.meta["generation"]["greedy"]))
    assert list(out.token_ids) == case.arrays[key][1:].tolist()


# --------------------------------------------------------------------------------------------------
# 4.28 semantics on a fake LM whose next-token logits are a fixed function of the row's generated ids


class TableEngine:
    """A `DecodeEngine` whose next-token logits are `table(ids fed so far in that row)`; records every call.

    `start_row(b)` is what a row of prompt b starts from (here: nothing); beam reordering moves the rows' ids along.
    """

    def __init__(self, table) -> None:
        self.table = table
        self.calls: list[dict] = []
        self.rows: list[tuple] = []

    def start_row(self, inputs_embeds: torch.Tensor, b: int) -> tuple:
        return ()

    def start(self, inputs_embeds: torch.Tensor, beams: int, max_new_tokens: int) -> torch.Tensor:
        self.calls.append({"prompt_shape": tuple(inputs_embeds.shape), "beams": beams})
        batch = inputs_embeds.shape[0]
        self.rows = [self.start_row(inputs_embeds, b) for b in range(batch) for _ in range(beams)]
        return self._logits()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls.append({"tokens": tokens.tolist()})
        self.rows = [row + (token,) for row, token in zip(self.rows, tokens.tolist(), strict=True)]
        return self._logits()

    def reorder(self, sources: list[int]) -> None:
        self.rows = [self.rows[i] for i in sources]

    def _logits(self) -> torch.Tensor:
        return torch.stack([self.table(row) for row in self.rows])


def raw_logits(vocab: int, values: dict[int, float], rest: float = 0.0) -> torch.Tensor:
    out = torch.full((vocab,), rest)
    for token, value in values.items():
        out[token] = value
    return out


def log_probs(vocab: int, probs: dict[int, float]) -> torch.Tensor:
    """Log of a distribution: the named probabilities, the remaining mass spread evenly over the other ids."""
    rest = (1.0 - sum(probs.values())) / (vocab - len(probs))
    return torch.tensor([math.log(probs.get(i, rest)) for i in range(vocab)], dtype=torch.float32)


EMBEDS = torch.zeros(1, 5, 8)
GREEDY = dict(num_beams=1, max_new_tokens=4)


def test_placeholder_is_never_fed_and_the_last_id_is_not_either():
    lm = TableEngine(lambda row: raw_logits(6, {3: 1.0}))  # always 3: runs to max_new_tokens
    out = decode(lm, EMBEDS, DecodeOptions(**GREEDY))
    assert out.token_ids == (3, 3, 3, 3)  # no eos appended when max_new_tokens ends generation
    assert lm.calls[0] == {"prompt_shape": (1, 5, 8), "beams": 1}
    assert lm.calls[1:] == [{"tokens": [3]}] * 3  # (positions are the engine's: tests/test_engine.py)


def test_repetition_penalty_hits_the_placeholder_id_from_the_first_step():
    lm = TableEngine(lambda row: raw_logits(6, {1: 2.0, 3: 1.5, EOS: -5.0} if not row else {1: 0.5, 3: 1.5, EOS: 1.2}))
    plain = decode(lm, EMBEDS, DecodeOptions(**GREEDY, repetition_penalty=1.0))
    assert plain.token_ids[0] == 1
    penalised = decode(lm, EMBEDS, DecodeOptions(**GREEDY, repetition_penalty=1.5))
    # id 1 is in the ids (the placeholder) before anything was generated: 2.0 / 1.5 < 1.5
    assert penalised.step_scores[0, 1] == pytest.approx(2.0 / 1.5)
    assert penalised.token_ids[0] == 3
    # step 2: the generated 3 is penalised too (1.5 / 1.5 = 1.0 < eos 1.2)
    assert penalised.step_scores[1, 3] == pytest.approx(1.0)
    assert penalised.token_ids == (3, EOS)


def test_eos_at_the_first_step_is_allowed_with_min_length_1():
    lm = TableEngine(lambda row: raw_logits(6, {EOS: 3.0, 4: 2.0}))
    assert decode(lm, EMBEDS, DecodeOptions(**GREEDY, min_length=1)).token_ids == (EOS,)
    # min_length counts the placeholder: 2 blocks eos at the first step only
    blocked = decode(lm, EMBEDS, DecodeOptions(**GREEDY, min_length=2))
    assert blocked.token_ids == (4, EOS)
    assert blocked.step_scores[0, EOS] == -math.inf
    beam = decode(lm, EMBEDS, DecodeOptions(num_beams=2, max_new_tokens=4, min_length=1))
    assert beam.token_ids == (EOS,)


def _placeholder_table(row: tuple[int, ...]) -> torch.Tensor:
    # A = [3, </s>] with sum log-prob -1.0, B = [4, 5, </s>] with -1.8:
    # 4.28 (placeholder counted): A -1.0/2 = -0.50 beats B -1.8/3 = -0.60;
    # counting new ids only:     A -1.0/1 = -1.00 loses to B -1.8/2 = -0.90.
    vocab = 6
    if row == ():
        return log_probs(vocab, {3: 0.5, 4: 0.49})
    if row == (3,):
        return log_probs(vocab, {EOS: math.exp(-1.0) / 0.5, 5: 0.25})
    if row == (4,):
        return log_probs(vocab, {5: 0.95})
    if row == (4, 5):
        return log_probs(vocab, {EOS: math.exp(-1.8) / (0.49 * 0.95)})
    return log_probs(vocab, {})


def test_beam_length_normalisation_counts_the_placeholder():
    out = decode(TableEngine(_placeholder_table), EMBEDS, DecodeOptions(num_beams=2, max_new_tokens=3))
    assert out.token_ids == (3, EOS)
    assert out.sequence_score == pytest.approx(-1.0 / 2, abs=1e-5)


def test_beam_unfinished_hypotheses_are_normalised_by_placeholder_plus_new_ids():
    table = {(): {3: 0.6, 4: 0.3}, (3,): {4: 0.7}, (4,): {3: 0.5}}
    out = decode(
        TableEngine(lambda row: log_probs(6, table.get(row, {5: 0.9}))),
        EMBEDS,
        DecodeOptions(num_beams=2, max_new_tokens=2),
    )
    assert out.token_ids == (3, 4)  # ran out of length: no eos
    assert out.sequence_score == pytest.approx((math.log(0.6) + math.log(0.7)) / 3, abs=1e-5)


def _random_table(row: tuple[int, ...]) -> torch.Tensor:
    seed = 1 + sum((i + 1) * 7919 * (t + 1) for i, t in enumerate(row)) % 100_000
    return torch.randn(40, generator=torch.Generator().manual_seed(seed)) * 2.0


@pytest.mark.parametrize("num_beams", [1, 3])
def test_sampling_with_a_seeded_generator_is_reproducible(num_beams):
    options = DecodeOptions(
        num_beams=num_beams, do_sample=True, temperature=0.8, top_k=20, top_p=0.95, max_new_tokens=12
    )
    lm = TableEngine(_random_table)

    def run(seed: int) -> DecodeOutput:
        return decode(lm, EMBEDS, options, generator=torch.Generator().manual_seed(seed))

    first = run(123)
    assert run(123).token_ids == first.token_ids
    assert len({run(seed).token_ids for seed in range(8)}) > 1  # it does sample


def test_beam_sample_starts_every_beam_at_score_zero():
    # 4.28 beam_sample (unlike beam_search) does not set beams 1.. to -1e9: the identical initial beams are all
    # sampled from, so a near-certain first token fills both running beams
    lm = TableEngine(lambda row: log_probs(6, {3: 0.999}))
    options = DecodeOptions(num_beams=2, do_sample=True, max_new_tokens=2)
    decode(lm, EMBEDS, options, generator=torch.Generator().manual_seed(0))
    assert lm.calls[1]["tokens"] == [3, 3]
    beam_search = TableEngine(lambda row: log_probs(6, {3: 0.999}))
    decode(beam_search, EMBEDS, DecodeOptions(num_beams=2, max_new_tokens=2))
    assert beam_search.calls[1]["tokens"][0] == 3 and beam_search.calls[1]["tokens"][1] != 3


def test_sampling_with_top_k_1_is_greedy():
    lm = TableEngine(_random_table)
    greedy = decode(lm, EMBEDS, DecodeOptions(num_beams=1, max_new_tokens=12))
    sampled = decode(
        lm,
        EMBEDS,
        DecodeOptions(num_beams=1, max_new_tokens=12, do_sample=True, top_k=1),
        generator=torch.Generator().manual_seed(0),
    )
    assert sampled.token_ids == greedy.token_ids


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_new_tokens=0),
        dict(num_beams=0),
        dict(do_sample=True, temperature=0.0),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(repetition_penalty=0.0),
        dict(top_k=-1),
        dict(min_length=-1),
        dict(length_penalty=float("nan")),
    ],
)
def test_options_reject_nonsense(bad):
    with pytest.raises(UsageError):
        DecodeOptions(**bad)


def test_result_types():
    assert DecodeOptions(temperature=0.0).temperature == 0.0  # ignored without sampling, as in 4.28
    result = GenerationResult(text="hi", token_ids=[5, EOS])
    assert result.timings == Timings() and result.timings.total_s == 0.0
    with pytest.raises(UsageError):
        decode(TableEngine(_random_table), torch.zeros(2, 3, 8), DecodeOptions())
