"""The whole pipeline on tiny components made by scripts/make_tiny_model.py, including sizes other than the
published ones (query tokens, Q-Former depth, LoRA rank are read from the tensors), and the API contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import salmonn_cli
from salmonn_cli.llm import lora_layers, lora_scales

from .conftest import make_tiny


def load(folder: Path, **kwargs):
    return salmonn_cli.load_model(
        folder / "whisper", folder / "beats.pt", folder / "llm", folder / "salmonn.pth", **kwargs
    )


@pytest.fixture(scope="module")
def model(tiny):
    return load(tiny)


def tone(seconds: float, rate: int = 16_000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def test_audio_tokens_shape_and_window(model):
    tokens = model.audio_tokens(tone(3.0))
    assert tokens.shape == (1, 88, model.llm.config.hidden_size)  # 1500 frames // 17 = 88 windows
    assert tokens.dtype == torch.float32 and torch.isfinite(tokens).all()


def test_only_the_first_30_seconds_are_heard(model):
    rng = np.random.default_rng(0)
    head = rng.standard_normal(30 * 16_000).astype(np.float32) * 0.1
    longer = np.concatenate([head, rng.standard_normal(5 * 16_000).astype(np.float32)])
    assert torch.equal(model.audio_tokens(head), model.audio_tokens(longer))


def test_generate_returns_text_ids_and_timings(model):
    result = model.generate(tone(2.0), "  Please describe the audio.  ", max_new_tokens=5, num_beams=2)
    assert 1 <= len(result.token_ids) <= 5
    assert result.text == model.tokenizer.decode(result.token_ids)
    assert result.timings.total_s >= result.timings.encode_s > 0
    stripped = model.generate(tone(2.0), "Please describe the audio.", max_new_tokens=5, num_beams=2)
    assert stripped.token_ids == result.token_ids  # the instruction is stripped, as the original CLI does


def test_lora_scale_applies_to_one_call_and_is_restored(model):
    embeds = model.inputs_embeds(model.audio_tokens(tone(1.0)), "What do you hear?")
    trained = model.next_token_logits(embeds)
    assert lora_scales(model.llm) == {4.0}
    off = model.next_token_logits(embeds, lora_scale=0.0)
    assert not torch.allclose(trained, off)
    assert lora_scales(model.llm) == {4.0}
    assert torch.equal(model.next_token_logits(embeds), trained)
    with torch.no_grad(), model.llm.disable_adapter():  # scale 0 is exactly the base LLaMA
        base = model.llm(inputs_embeds=embeds).logits[0, -1]
    assert torch.allclose(off, base, atol=1e-6)


def test_trained_scale_from_load_model_is_the_default(tiny):
    half = load(tiny, lora_scale=2.0)
    assert lora_scales(half.llm) == {2.0}


def test_loss_is_finite_and_depends_on_the_target(model):
    audio = tone(1.5)
    a = model.loss(audio, "Please describe the audio.", "A steady tone.")
    b = model.loss(audio, "Please describe the audio.", "Completely different words here, many of them.")
    assert np.isfinite(a) and np.isfinite(b) and a != b


def test_sizes_other_than_the_published_ones(tmp_path):
    folder = make_tiny(
        tmp_path / "variant", "--seed", "3", "--query-tokens", "3", "--qformer-layers", "1", "--lora-rank", "4"
    )
    model = load(folder, second_per_window=0.5, second_stride=0.25)
    assert model.settings.windows.kernel == 25 and model.settings.windows.stride == 12  # round(12.5) = 12
    tokens = model.audio_tokens(tone(1.0))
    windows = (1500 - 25) // 12 + 1
    assert tokens.shape[1] == windows * 3
    assert model.connector.qformer.config.num_hidden_layers == 1
    assert {layer.r["default"] for layer in lora_layers(model.llm)} == {4}
    assert len(model.generate(tone(1.0), "Hi", max_new_tokens=3, num_beams=1).token_ids) <= 3


def test_qformer_heads_default_to_64_wide(tiny):
    model = load(tiny)
    assert model.connector.qformer.config.num_attention_heads == 1  # 64 wide / 64
    four = load(tiny, qformer_heads=4)
    assert four.connector.qformer.config.num_attention_heads == 4
    audio = tone(1.0)
    assert not torch.allclose(model.audio_tokens(audio), four.audio_tokens(audio))


def test_a_short_clip_skips_the_vad_unless_its_subtitles_follow_the_speech(model, monkeypatch):
    from salmonn_cli import segment
    from salmonn_cli.longform import LongformSettings, answer_file

    heard = []  # one entry per silero-vad pass over a waveform
    monkeypatch.setattr(segment, "speech_probabilities", lambda w: heard.append(len(w)) or np.zeros(len(w) // 512 + 1))
    options = salmonn_cli.DecodeOptions(max_new_tokens=2, num_beams=1)
    asked = answer_file(model, tone(3.0), "What do you hear?", options, LongformSettings())
    assert heard == [] and asked.answered == 1  # nothing reads a single segment's speech spans
    answer_file(model, tone(3.0), "Transcribe.", options, LongformSettings(speech_only=True))
    assert len(heard) == 1  # transcription's cues follow the speech, so the VAD runs
    answer_file(model, tone(31.0), "What do you hear?", options, LongformSettings())
    assert len(heard) == 2  # longer than one window: cut at pauses


def test_load_model_takes_one_model_settings_and_its_fields_by_keyword(tiny):
    from salmonn_cli.errors import UsageError

    with pytest.raises(UsageError, match="unknown model setting"):
        load(tiny, window_seconds=1.0)  # refused before anything is read
    with pytest.raises(UsageError, match="exactly one"):
        load(tiny, prompt_template="USER: no slot\nASSISTANT:")
    settings = salmonn_cli.ModelSettings(lora_scale=2.0, qformer_heads=4)
    model = load(tiny, settings=settings, lora_scale=3.0)  # a keyword changes one field of `settings`
    assert model.settings.trained_lora_scale == 3.0 and model.connector.qformer.config.num_attention_heads == 4
    assert lora_scales(model.llm) == {3.0}
