"""BEATs parity with the original SALMONN code: Kaldi filter bank and encoder, over every reference case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from salmonn_cli.audio import model_window
from salmonn_cli.errors import CheckpointError, MissingKeyError, ShapeMismatchError, UnexpectedKeyError
from salmonn_cli.features import beats_fbank
from salmonn_cli.model.beats import BEATs, build_beats

from .reference import assert_close, case_paths, load_case

CASES = case_paths()
IDS = [path.stem for path in CASES]


def _checkpoint(components: Path) -> dict:
    return torch.load(components / "beats.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("case_path", CASES, ids=IDS)
def test_fbank_matches_reference(case_path: Path) -> None:
    case = load_case(case_path)
    samples, rate = sf.read(str(case.audio_path), dtype="float32")
    assert rate == 16_000 and samples.ndim == 1
    waveform = model_window(samples)
    assert waveform.shape[0] == case.meta["results"]["raw_wav_num_samples"]
    fbank = beats_fbank(waveform)
    assert fbank.dtype == np.float32
    assert fbank.shape[0] == 1 + (waveform.shape[0] - 400) // 160
    assert_close(fbank, case.arrays["beats_fbank"][0], atol=1e-4, what=f"{case.name} beats_fbank")


@pytest.mark.parametrize("case_path", CASES, ids=IDS)
def test_encoder_matches_reference(case_path: Path) -> None:
    case = load_case(case_path)
    checkpoint = _checkpoint(case.components)
    model = build_beats(checkpoint["cfg"], checkpoint["model"])
    assert isinstance(model, BEATs) and not model.training
    fbank = torch.from_numpy(case.arrays["beats_fbank"])  # (1, F, 128): the reference input of this stage
    with torch.no_grad():
        tokens = model(fbank)
    assert tokens.shape[1] == 8 * (fbank.shape[1] // 16)
    assert_close(tokens.numpy(), case.arrays["beats_encoder_output"], atol=1e-4, what=f"{case.name} BEATs output")


@pytest.fixture(scope="module")
def checkpoint() -> dict:
    return _checkpoint(load_case(CASES[0]).components)


def test_renamed_key_is_refused(checkpoint: dict) -> None:
    state = dict(checkpoint["model"])
    state["encoder.layer_norm.scale"] = state.pop("encoder.layer_norm.weight")
    with pytest.raises(UnexpectedKeyError) as info:
        build_beats(checkpoint["cfg"], state)
    assert info.value.key == "encoder.layer_norm.scale"
    assert "encoder.layer_norm.scale" in str(info.value)


def test_missing_key_is_refused(checkpoint: dict) -> None:
    state = dict(checkpoint["model"])
    del state["encoder.pos_conv.0.weight_g"]
    with pytest.raises(MissingKeyError) as info:
        build_beats(checkpoint["cfg"], state)
    assert info.value.key == "encoder.pos_conv.0.weight_g"


def test_wrong_shape_is_refused(checkpoint: dict) -> None:
    state = dict(checkpoint["model"])
    state["encoder.layers.0.fc1.weight"] = state["encoder.layers.0.fc1.weight"][:, :-1]
    with pytest.raises(ShapeMismatchError) as info:
        build_beats(checkpoint["cfg"], state)
    assert info.value.key == "encoder.layers.0.fc1.weight"


def test_untied_relative_position_table_is_refused(checkpoint: dict) -> None:
    key = "encoder.layers.1.self_attn.relative_attention_bias.weight"
    state = dict(checkpoint["model"])
    state[key] = state[key] + 1.0
    with pytest.raises(CheckpointError) as info:
        build_beats(checkpoint["cfg"], state)
    assert info.value.key == key


def test_unknown_predictor_key_is_refused(checkpoint: dict) -> None:
    state = dict(checkpoint["model"])
    state["predictor.extra"] = torch.zeros(1)
    with pytest.raises(UnexpectedKeyError) as info:
        build_beats(checkpoint["cfg"], state)
    assert info.value.key == "predictor.extra"
