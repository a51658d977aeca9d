"""The decode engine (engine.py) against transformers' own forward, on the reference components' LLaMA + LoRA.

What it must keep: the logits transformers' dynamic-cache forward gives, to the bit (so ids cannot move); beams
reordered inside the one preallocated cache; a masked step (the arithmetic a CUDA graph records) that reads no
value back to the host; the LoRA scale as data.
"""

from __future__ import annotations

import pytest
import torch

from salmonn_cli.engine import LlamaEngine, cache_keyword, engine_for
from salmonn_cli.llm import lora_scale_tensor, scaled_lora
from tests.reference import case_paths, load_case

from .test_generate import _build_reference_lm

VOCAB_IDS = torch.tensor([5, 17, 3, 29, 11, 8])


@pytest.fixture(scope="module")
def lm():
    return _build_reference_lm(load_case(case_paths()[0]).components)


@pytest.fixture(scope="module")
def embeds(lm) -> torch.Tensor:
    hidden = lm.get_base_model().config.hidden_size
    return torch.randn(2, 7, hidden, generator=torch.Generator().manual_seed(0)) * 0.05


def _transformers_logits(lm, embeds: torch.Tensor, fed: list[torch.Tensor]) -> list[torch.Tensor]:
    """Last-position logits of the prompt, then after each fed id: transformers' forward with its dynamic cache."""
    base = lm.get_base_model()
    keyword = cache_keyword(type(base))  # `cache` from transformers 5.2x, `past_key_values` before
    out = base(inputs_embeds=embeds, use_cache=True)
    logits, cache, position = [out.logits[:, -1]], getattr(out, keyword), embeds.shape[1]
    for tokens in fed:
        positions = torch.full((tokens.shape[0], 1), position)
        out = base(input_ids=tokens[:, None], position_ids=positions, **{keyword: cache})
        logits.append(out.logits[:, -1])
        cache, position = getattr(out, keyword), position + 1
    return logits


def _engine_logits(engine, embeds: torch.Tensor, fed: list[torch.Tensor]) -> list[torch.Tensor]:
    logits = [engine.start(embeds, 1, len(fed) + 1).clone()]
    return logits + [engine.step(tokens).clone() for tokens in fed]


def _fed(rows: int) -> list[torch.Tensor]:
    return [VOCAB_IDS[i : i + rows] for i in range(len(VOCAB_IDS) - rows + 1)]


@torch.inference_mode()
def test_eager_steps_equal_transformers_dynamic_cache_to_the_bit(lm, embeds):
    expected = _transformers_logits(lm, embeds, _fed(2))
    got = _engine_logits(LlamaEngine(lm), embeds, _fed(2))
    assert len(got) == len(expected) == 6
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert torch.equal(a, b), f"step {step}: differs by {float((a - b).abs().max()):.3g}"


@torch.inference_mode()
def test_masked_steps_over_the_whole_cache_equal_eager_steps(lm, embeds):
    """The recorded step's arithmetic (whole cache, a device-built mask, a position tensor) run eagerly on the CPU."""
    expected = _engine_logits(LlamaEngine(lm), embeds, _fed(2))
    masked = LlamaEngine(lm, masked_steps=True)
    got = _engine_logits(masked, embeds, _fed(2))
    assert masked._cache.capacity == 64 and masked._cache.capacity > embeds.shape[1] + len(_fed(2))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_a_masked_step_reads_nothing_back_to_the_host(lm, embeds, monkeypatch):
    """What CUDA graph capture forbids: a step that waits on a device value (`.item()`, `bool(t)`, `.tolist()`)."""
    engine = LlamaEngine(lm, masked_steps=True)
    with torch.inference_mode():
        engine.start(embeds, 1, 4)
        engine.step(VOCAB_IDS[:2])

    def refuse(*args, **kwargs):
        raise AssertionError("the step read a device value on the host")

    for name in ("item", "tolist", "__bool__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    with torch.inference_mode():
        logits = engine.step(VOCAB_IDS[2:4])
    monkeypatch.undo()
    assert logits.shape == (2, lm.get_base_model().config.vocab_size)


@torch.inference_mode()
def test_beams_are_reordered_inside_the_one_cache(lm, embeds):
    engine = LlamaEngine(lm)
    engine.start(embeds[:1], 3, 8)
    engine.step(VOCAB_IDS[:3])
    engine.step(VOCAB_IDS[3:6])
    cache = engine._cache
    address, before = cache.kv.data_ptr(), cache.kv[:, :, :, :, : cache.length].clone()
    engine.reorder([2, 2, 0])
    assert cache.kv.data_ptr() == address
    torch.testing.assert_close(cache.kv[:, :, :, :, : cache.length], before[:, :, [2, 2, 0]], rtol=0, atol=0)
    # the rows fed [5, 29], [17, 11], [3, 8]; now they hold [3, 8], [3, 8], [5, 29] and go on from there
    after = engine.step(torch.tensor([4, 9, 4]))
    expected = _transformers_logits_after(lm, embeds[:1], [[3, 8], [3, 8], [5, 29]], [4, 9, 4])
    torch.testing.assert_close(after, expected, rtol=0, atol=1e-5)
    assert torch.equal(after.argmax(-1), expected.argmax(-1))


def _transformers_logits_after(lm, prompt: torch.Tensor, histories: list[list[int]], last: list[int]) -> torch.Tensor:
    """Per row: transformers' logits after the prompt, that row's history and its last id (rows run one by one)."""
    rows = []
    for history, token in zip(histories, last, strict=True):
        fed = [torch.tensor([t]) for t in [*history, token]]
        rows.append(_transformers_logits(lm, prompt, fed)[-1][0])
    return torch.stack(rows)


@torch.inference_mode()
def test_one_cache_per_row_count_is_kept_across_calls(lm, embeds):
    engine = LlamaEngine(lm)
    engine.start(embeds, 1, 10)
    first = engine._cache
    engine.start(embeds, 1, 20)  # still fits the same 64 positions
    assert engine._cache is first
    engine.start(embeds, 1, 100)  # grows: a new cache replaces the old one
    assert engine._cache is not first and engine._cache.capacity == 128
    engine.start(embeds, 4, 10)  # another row count: off CUDA one cache in all, so it replaces that one too
    assert list(engine._caches) == [8]
    kept = LlamaEngine(lm)
    kept._keep = 2  # as on CUDA: the two most recently used row counts stay
    for beams in (1, 4, 1, 2):
        kept.start(embeds, beams, 10)
    assert list(kept._caches) == [2, 4]
    assert engine_for(lm) is engine_for(lm) and engine_for(lm) is engine_for(lm.get_base_model())


@torch.inference_mode()
def test_lora_scale_is_data_and_zero_is_the_base_model_to_the_bit(lm, embeds):
    engine = LlamaEngine(lm, masked_steps=True)
    shared = lora_scale_tensor(lm)
    trained = _engine_logits(engine, embeds, _fed(2))
    with scaled_lora(lm, 0.0):
        assert lora_scale_tensor(lm) is shared and shared.tolist() == [0.0] * len(shared)
        off = _engine_logits(engine, embeds, _fed(2))
    with lm.disable_adapter():
        base = _engine_logits(engine, embeds, _fed(2))
    assert shared.tolist() == [4.0] * len(shared) and lora_scale_tensor(lm) is shared
    for a, b, c in zip(off, base, trained, strict=True):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_a_beam_reorder_copies_only_the_rows_that_change():
    """The identity moves nothing; a reorder copies each changed row once, setting aside only the sources it
    overwrites (a swap, a cycle), and matches a gather of the whole cache."""
    from salmonn_cli.kv_cache import Layout, StaticKV
    from tests.gpu_properties import KernelCounter

    cache = StaticKV(Layout(layers=2, kv_heads=2, head_dim=4), rows=5, capacity=16, dtype=torch.float32,
                     device=torch.device("cpu"))  # fmt: skip
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=torch.Generator().manual_seed(0)))
    cache.length = 9
    for sources, kernels in (([0, 1, 2, 3, 4], 0), ([0, 0, 2, 3, 4], 1), ([1, 0, 2, 3, 4], 3), ([2, 2, 3, 1, 4], 5)):
        before = cache.kv.clone()
        with KernelCounter() as counted:
            cache.reorder(sources)
        assert counted.total == kernels, (sources, dict(counted.counts))  # copies (+ one gather to set aside)
        expected = before.clone()
        expected[:, :, :, :, :9] = before[:, :, sources, :, :9]
        assert torch.equal(cache.kv, expected), sources  # past the filled length nothing moved


@torch.inference_mode()
def test_beam_bookkeeping_reads_the_device_once_a_step(lm, embeds, monkeypatch):
    """Three `.tolist()` a step (each a wait on the GPU) became one; the ids are what they were."""
    from salmonn_cli.generate import DecodeOptions, decode

    calls = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(self.shape) or tolist(self))
    options = DecodeOptions(num_beams=3, max_new_tokens=6, min_length=7)  # no eos: no hypothesis finishes early
    out = decode(LlamaEngine(lm), embeds[:1], options)
    monkeypatch.undo()
    assert len(out.token_ids) == 6
    steps = [shape for shape in calls if shape == (3, 1, 6)]  # scores, ids and sources of 2 x 3 candidates
    assert len(steps) == 6 and len(calls) == 6 + 3  # and finalize's three running beams
