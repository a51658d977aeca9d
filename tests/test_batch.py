"""Batches: row i of a batch is what clip i gives alone (audio tokens, greedy and beam ids), on tiny components made
by scripts/make_tiny_model.py and on a fake LM whose logits are a fixed function of (prompt, generated ids)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import salmonn_cli
from salmonn_cli.errors import UsageError
from salmonn_cli.generate import DecodeOptions, decode, decode_batch

from .test_generate import TableEngine  # a DecodeEngine stand-in that follows beam reordering

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Please describe the audio."
PAD, EOS = 0, 2


# --------------------------------------------------------------------------------------------------
# a fake LM: row b's prompt id is inputs_embeds[b, 0, 0]; logits = table(prompt id, ids generated so far)


class PromptEngine(TableEngine):
    """Row b starts from its prompt id (inputs_embeds[b, 0, 0]); logits = table(prompt id, ids generated so far)."""

    def __init__(self, table) -> None:
        super().__init__(lambda row: table(row[0], row[1:]))

    def start_row(self, inputs_embeds: torch.Tensor, b: int) -> tuple:
        return (int(inputs_embeds[b, 0, 0]),)

    @property
    def fed(self) -> list[list[int]]:
        """The ids fed at each step, one per row."""
        return [call["tokens"] for call in self.calls[1:]]


def prompts(*ids: int) -> torch.Tensor:
    embeds = torch.zeros(len(ids), 4, 8)
    embeds[:, 0, 0] = torch.tensor(ids, dtype=torch.float)
    return embeds


def _random_table(prompt: int, row: tuple[int, ...]) -> torch.Tensor:
    seed = 1 + (prompt * 104_729 + sum((i + 1) * 7919 * (t + 1) for i, t in enumerate(row))) % 100_000
    logits = torch.randn(12, generator=torch.Generator().manual_seed(seed)) * 2.0
    logits[EOS] += 0.5 * prompt * len(row)  # higher prompt ids tend to end sooner
    return logits


def _eos_after(prompt: int, row: tuple[int, ...]) -> torch.Tensor:
    """Prompt p says 3, 4, 3, 4, ... and eos after p ids; prompt 0 never ends."""
    logits = torch.zeros(6)
    logits[EOS if prompt and len(row) >= prompt else 3 + len(row) % 2] = 5.0
    return logits


def test_greedy_rows_end_at_their_own_eos_and_finished_rows_are_fed_pad():
    lm = PromptEngine(_eos_after)
    outs = decode_batch(lm, prompts(2, 0, 4), DecodeOptions(num_beams=1, max_new_tokens=6))
    assert [o.token_ids for o in outs] == [(3, 4, EOS), (3, 4, 3, 4, 3, 4), (3, 4, 3, 4, EOS)]
    # as in 4.28 a row's eos is still fed once (it was the last id generated), then pad
    assert lm.fed[2] == [EOS, 3, 3] and lm.fed[3] == [PAD, 4, 4] and lm.fed[4] == [PAD, 3, EOS]
    assert [o.step_scores.shape for o in outs] == [(3, 6), (6, 6), (5, 6)]
    for b, out in enumerate(outs):
        alone = decode(PromptEngine(_eos_after), prompts((2, 0, 4)[b]), DecodeOptions(num_beams=1, max_new_tokens=6))
        assert out.token_ids == alone.token_ids
        np.testing.assert_array_equal(out.step_scores, alone.step_scores)


def test_greedy_loop_stops_when_the_last_row_finishes():
    lm = PromptEngine(_eos_after)
    outs = decode_batch(lm, prompts(1, 3), DecodeOptions(num_beams=1, max_new_tokens=50))
    assert [o.token_ids for o in outs] == [(3, EOS), (3, 4, 3, EOS)]
    assert len(lm.fed) == 3  # prefill, then 3 steps: none after the last eos


@pytest.mark.parametrize("num_beams", [2, 3])
@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_beam_rows_equal_each_row_alone(num_beams, length_penalty):
    options = DecodeOptions(num_beams=num_beams, max_new_tokens=10, length_penalty=length_penalty)
    ids = (0, 3, 1, 5)
    outs = decode_batch(PromptEngine(_random_table), prompts(*ids), options)
    alone = [decode(PromptEngine(_random_table), prompts(p), options) for p in ids]
    assert [o.token_ids for o in outs] == [a.token_ids for a in alone]
    assert [o.sequence_score for o in outs] == pytest.approx([a.sequence_score for a in alone], abs=1e-6)
    assert len({len(a.token_ids) for a in alone}) > 1  # rows did end at different steps


def test_sampling_is_reproducible_per_batch_and_batch_of_one_is_decode():
    options = DecodeOptions(num_beams=1, do_sample=True, top_k=8, top_p=0.95, temperature=0.9, max_new_tokens=8)

    def run(embeds, seed):
        return decode_batch(PromptEngine(_random_table), embeds, options, generator=torch.Generator().manual_seed(seed))

    assert [o.token_ids for o in run(prompts(0, 1, 2), 5)] == [o.token_ids for o in run(prompts(0, 1, 2), 5)]
    single = decode(PromptEngine(_random_table), prompts(1), options, generator=torch.Generator().manual_seed(5))
    assert run(prompts(1), 5)[0].token_ids == single.token_ids
    top1 = DecodeOptions(num_beams=1, do_sample=True, top_k=1, max_new_tokens=8)
    sampled = decode_batch(PromptEngine(_random_table), prompts(0, 1, 2), top1, generator=torch.Generator())
    greedy = decode_batch(PromptEngine(_random_table), prompts(0, 1, 2), DecodeOptions(num_beams=1, max_new_tokens=8))
    assert [o.token_ids for o in sampled] == [o.token_ids for o in greedy]


def test_decode_batch_rejects_a_bad_shape():
    with pytest.raises(UsageError):
        decode_batch(PromptEngine(_random_table), torch.zeros(0, 4, 8), DecodeOptions())
    with pytest.raises(UsageError):
        decode_batch(PromptEngine(_random_table), torch.zeros(4, 8), DecodeOptions())


# --------------------------------------------------------------------------------------------------
# tiny components


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    script = ROOT / "scripts" / "make_tiny_model.py"
    subprocess.run([sys.executable, str(script), str(folder)], check=True, capture_output=True)
    return salmonn_cli.load_model(folder / "whisper", folder / "beats.pt", folder / "llm", folder / "salmonn.pth")


def tone(seconds: float, hz: float) -> np.ndarray:
    t = np.arange(int(seconds * 16_000)) / 16_000
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def noise(seconds: float, seed: int, scale: float = 0.1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * 16_000)) * scale).astype(np.float32)


# lengths 0.5-45 s: BEATs frame counts all differ, the last is cut to 30 s, the first padded to 1 s
CLIPS = [tone(1.0, 440), noise(7.0, 1), tone(13.3, 880) + noise(13.3, 2, 0.02), tone(30.0, 300), noise(45.0, 3, 0.2)]


@pytest.fixture(scope="module")
def batch_tokens(model):
    return model.audio_tokens_batch(CLIPS)


def test_audio_tokens_batch_equals_single(model, batch_tokens):
    assert batch_tokens.shape == (len(CLIPS), 88, model.llm.config.hidden_size)
    for row, clip in zip(batch_tokens, CLIPS, strict=True):
        torch.testing.assert_close(row[None], model.audio_tokens(clip), atol=1e-5, rtol=1e-5)
    half_second = model.audio_tokens_batch([tone(0.5, 200), CLIPS[3]])
    torch.testing.assert_close(half_second[:1], model.audio_tokens(tone(0.5, 200)), atol=1e-5, rtol=1e-5)
    with pytest.raises(UsageError):
        model.audio_tokens_batch([])


def _embeds(model, tokens: torch.Tensor) -> torch.Tensor:
    return torch.cat([model.inputs_embeds(tokens[i : i + 1], PROMPT) for i in range(tokens.shape[0])])


def _run(model, embeds, options, eos=None):
    tokenizer = model.tokenizer
    kwargs = dict(eos_token_id=tokenizer.eos_token_id if eos is None else eos, pad_token_id=tokenizer.pad_token_id)
    batch = decode_batch(model.llm, embeds, options, **kwargs)
    alone = [decode(model.llm, embeds[i : i + 1], options, **kwargs) for i in range(embeds.shape[0])]
    return batch, alone


@pytest.mark.parametrize("num_beams", [1, 2, 3])
def test_batched_ids_equal_single_ids(model, batch_tokens, num_beams):
    options = DecodeOptions(num_beams=num_beams, max_new_tokens=12, repetition_penalty=1.3)
    batch, alone = _run(model, _embeds(model, batch_tokens), options)
    assert [o.token_ids for o in batch] == [a.token_ids for a in alone]
    assert len({a.token_ids for a in alone}) > 1  # the clips do lead to different answers
    if num_beams > 1:
        assert [o.sequence_score for o in batch] == pytest.approx([a.sequence_score for a in alone], abs=1e-5)
    results = model.answer_batch(batch_tokens, PROMPT, options)
    assert [r.token_ids for r in results] == [list(a.token_ids) for a in alone]
    assert [r.text for r in results] == [model.tokenizer.decode(list(a.token_ids)) for a in alone]


def test_a_row_that_ends_early_does_not_stop_the_others(model, batch_tokens):
    options = DecodeOptions(num_beams=1, max_new_tokens=10)
    embeds = _embeds(model, batch_tokens)
    plain = [a.token_ids for a in _run(model, embeds, options)[1]]
    # the random tiny LLM rarely says its real eos: call "eos" an id one row says early and another never says
    eos = next(t for i, ids in enumerate(plain) for t in ids[:4] if any(t not in other for other in plain))
    batch, alone = _run(model, embeds, options, eos=eos)
    assert [o.token_ids for o in batch] == [a.token_ids for a in alone]
    lengths = [len(a.token_ids) for a in alone]
    assert min(lengths) <= 4 and max(lengths) == 10
    assert any(a.token_ids[-1] == eos for a in alone)


def test_batch_of_one_is_decode(model, batch_tokens):
    embeds = _embeds(model, batch_tokens[2:3])
    for options in (DecodeOptions(num_beams=1, max_new_tokens=8), DecodeOptions(num_beams=3, max_new_tokens=8)):
        (batch,), (alone,) = _run(model, embeds, options)
        assert batch == alone  # ids and beam score
        if options.num_beams == 1:
            np.testing.assert_array_equal(batch.step_scores, alone.step_scores)


def test_generate_batch_equals_single_generate_calls(model):
    kwargs = dict(max_new_tokens=8, num_beams=2)
    results = model.generate_batch(CLIPS, PROMPT, batch_size=2, **kwargs)
    singles = [model.generate(clip, PROMPT, **kwargs) for clip in CLIPS]
    assert [r.token_ids for r in results] == [s.token_ids for s in singles]
    assert [r.text for r in results] == [s.text for s in singles]
    for result in results:
        assert result.timings.encode_s > 0 and result.timings.decode_s > 0
        assert math.isclose(result.timings.total_s, result.timings.encode_s + result.timings.decode_s)
    assert model.generate_batch([], PROMPT) == []


def test_generate_batch_rejects_bad_arguments(model):
    with pytest.raises(UsageError, match="batch_size"):
        model.generate_batch(CLIPS[:1], PROMPT, batch_size=0)
    with pytest.raises(UsageError, match="num_beam"):
        model.generate_batch(CLIPS[:1], PROMPT, num_beam=2)
    with pytest.raises(UsageError):
        model.answer_embeds(_embeds(model, torch.zeros(2, 88, model.llm.config.hidden_size)))
