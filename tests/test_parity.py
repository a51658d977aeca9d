"""Parity with the ORIGINAL SALMONN code over every reference case (tests/reference.py picks the folder).

Each stage is fed the reference's own input so errors cannot compound, then the whole model runs from the
wav file: generated ids must be identical. Tolerances are those of the reference README section 7; every
array of every case is compared, and a case that cannot be compared fails.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch

import salmonn_cli
from salmonn_cli.audio import model_window
from salmonn_cli.features import beats_fbank, whisper_log_mel
from salmonn_cli.prompt import target_ids

from .reference import Case, assert_close, case_paths, load_case

FRONT_END_ATOL = 1e-4  # fbank and log-mel
STAGE_ATOL = 1e-4  # encoder outputs, Q-Former, audio tokens, input embeddings
LOGITS_ATOL = 1e-3
LOSS_ATOL = 1e-4

CASES = case_paths()
IDS = [p.stem for p in CASES]


@lru_cache(maxsize=4)
def _model(components: str, second_per_window: float, second_stride: float, heads: int, scale: float):
    return salmonn_cli.load_model(
        f"{components}/whisper",
        f"{components}/beats.pt",
        f"{components}/llm",
        f"{components}/salmonn.pth",
        second_per_window=second_per_window,
        second_stride=second_stride,
        qformer_heads=heads,
        lora_scale=scale,
    )


def model_for(case: Case):
    """The model a case describes: its component set, window settings, Q-Former heads and LoRA scaling."""
    opts = case.meta["model_options"]
    scale = opts["lora_alpha"] / opts["lora_rank"]
    assert scale == case.meta["lora_scale"]
    return _model(
        str(case.components),
        opts["second_per_window"],
        opts["second_stride"],
        opts["qformer"]["num_attention_heads"],
        scale,
    )


@pytest.fixture(params=CASES, ids=IDS)
def case(request) -> Case:
    return load_case(request.param)


def t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


def test_window_length_matches(case):
    window = model_window(salmonn_cli.load_audio(case.audio_path))
    assert window.shape[0] == case.meta["results"]["raw_wav_num_samples"]


def test_front_ends(case):
    model = model_for(case)
    window = model_window(salmonn_cli.load_audio(case.audio_path))
    mel = whisper_log_mel(model.whisper_extractor, window)
    assert_close(mel[None], case.arrays["whisper_input_features"], FRONT_END_ATOL, "whisper log-mel")
    assert_close(beats_fbank(window)[None], case.arrays["beats_fbank"], FRONT_END_ATOL, "beats fbank")


@torch.inference_mode()
def test_encoders(case):
    model = model_for(case)
    speech = model.encode_speech(t(case.arrays["whisper_input_features"]))
    assert_close(speech.numpy(), case.arrays["whisper_encoder_output"], STAGE_ATOL, "whisper encoder")
    audio = model.encode_audio(t(case.arrays["beats_fbank"]))
    assert_close(audio.numpy(), case.arrays["beats_encoder_output"], STAGE_ATOL, "beats encoder")


@torch.inference_mode()
def test_connector(case):
    model = model_for(case)
    opts = case.meta["model_options"]
    assert (model.settings.windows.kernel, model.settings.windows.stride) == (
        opts["window_frames"],
        opts["stride_frames"],
    )
    speech, audio = t(case.arrays["whisper_encoder_output"]), t(case.arrays["beats_encoder_output"])
    states = model.connector.qformer_states(speech, audio)
    assert_close(states.numpy(), case.arrays["qformer_last_hidden_state"], STAGE_ATOL, "Q-Former output")
    tokens = model.connector(speech, audio)
    assert tokens.shape[1] == case.meta["results"]["num_audio_tokens"]
    assert_close(tokens.numpy(), case.arrays["audio_embeds"], STAGE_ATOL, "audio tokens")


@torch.inference_mode()
def test_prompt_ids_and_embeddings(case):
    model = model_for(case)
    assert model.settings.prompt_template == case.meta["model_options"]["prompt_template"]
    ids = model.prompt_ids(case.meta["prompt"])
    assert list(ids.before) == case.arrays["prompt_before_ids"].tolist()
    assert list(ids.after) == case.arrays["prompt_after_ids"].tolist()
    embeds = model.inputs_embeds(t(case.arrays["audio_embeds"]), case.meta["prompt"])
    assert_close(embeds.numpy(), case.arrays["inputs_embeds"], STAGE_ATOL, "LLM input embeddings")


@pytest.mark.parametrize("variant", ["", "_lora_scale_2p0", "_lora_scale_0p0"])
def test_first_logits(case, variant):
    model = model_for(case)
    scale = {"": None, "_lora_scale_2p0": 2.0, "_lora_scale_0p0": 0.0}[variant]
    logits = model.next_token_logits(t(case.arrays["inputs_embeds"]), lora_scale=scale)
    expected = case.arrays["first_logits" + variant][: case.vocab_size]  # drop the random [PAD] column
    assert_close(logits.numpy(), expected, LOGITS_ATOL, f"first logits{variant}")


@torch.inference_mode()
def test_loss_from_reference_inputs(case):
    model = model_for(case)
    tokens = target_ids(
        model.tokenizer, case.meta["training"]["target_text"], case.meta["model_options"]["max_txt_len"]
    )
    assert list(tokens) == case.arrays["loss_target_ids"].tolist()
    loss = model.loss_from_inputs(t(case.arrays["loss_inputs_embeds"]), t(case.arrays["loss_labels"]))
    expected = case.meta["results"]["loss_excluding_pad_column"]  # our softmax has no [PAD] column
    assert abs(float(loss) - expected) <= LOSS_ATOL, f"loss {float(loss)} != {expected}"


def test_end_to_end_audio_tokens_and_loss(case):
    model = model_for(case)
    waveform = salmonn_cli.load_audio(case.audio_path)
    tokens = model.audio_tokens(waveform)
    assert_close(tokens.numpy(), case.arrays["audio_embeds"], STAGE_ATOL, "audio tokens from the wav")
    embeds, labels = model.training_inputs(
        waveform, case.meta["prompt"], case.meta["training"]["target_text"], case.meta["model_options"]["max_txt_len"]
    )
    assert labels.tolist() == case.arrays["loss_labels"].tolist()
    assert_close(embeds.detach().numpy(), case.arrays["loss_inputs_embeds"], STAGE_ATOL, "loss input embeddings")
    loss = model.loss(
        waveform,
        case.meta["prompt"],
        case.meta["training"]["target_text"],
        max_txt_len=case.meta["model_options"]["max_txt_len"],
    )
    assert abs(loss - case.meta["results"]["loss_excluding_pad_column"]) <= LOSS_ATOL


@pytest.mark.parametrize(
    "mode, array, scale",
    [
        ("greedy", "greedy_ids", None),
        ("beam", "beam_ids", None),
        ("greedy", "greedy_ids_lora_scale_2p0", 2.0),
        ("greedy", "greedy_ids_lora_scale_0p0", 0.0),
    ],
    ids=["greedy", "beam", "greedy-lora2", "greedy-lora0"],
)
def test_end_to_end_generation(case, mode, array, scale):
    model = model_for(case)
    waveform = salmonn_cli.load_audio(case.audio_path)
    result = model.generate(waveform, case.meta["prompt"], lora_scale=scale, **case.meta["generation"][mode])
    expected = case.arrays[array].tolist()
    assert expected[0] == 1, "reference ids start with transformers 4.28's BOS placeholder"
    assert result.token_ids == expected[1:]
    assert result.text == model.tokenizer.decode(expected[1:])
    if array == "greedy_ids":
        assert result.text == case.meta["results"]["greedy_text_skip_special_tokens"]
