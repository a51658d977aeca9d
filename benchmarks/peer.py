"""The peer, measured in the same bench run: Qwen2-Audio-7B, the model a user would most likely pick instead.

Built from its published configuration (Qwen/Qwen2-Audio-7B's config.json, below) with random weights on the
device, through transformers' `Qwen2AudioForConditionalGeneration`, and run by its own `generate()`: the same
synthetic 30 s clip as SALMONN's time-to-first-token, greedy decoding with eos held off, and the same
quantisation (bitsandbytes NF4 on CUDA; bfloat16 on CPU, where SALMONN's 4-bit path is optimum-quanto's).
Its 30 s clip is 750 audio tokens in the LLM's prompt, where SALMONN's is 88.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from .build import materialise, to_bitsandbytes
from .measure import synthetic_audio

NAME = "qwen2-audio-7b"
AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS = 151646, 151647, 151648  # Qwen2-Audio's <|AUDIO|>, <|audio_bos|>, <|audio_eos|>
EOS, PAD = 151645, 151643
# Qwen/Qwen2-Audio-7B config.json (what differs from transformers' Qwen2 / Qwen2-Audio encoder defaults is given)
PUBLISHED = {
    "audio_token_index": AUDIO_TOKEN,
    "audio_config": {"num_mel_bins": 128, "encoder_layers": 32, "encoder_attention_heads": 20,
                     "encoder_ffn_dim": 5120, "d_model": 1280, "max_source_positions": 1500},
    "text_config": {"model_type": "qwen2", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 156032,
                    "max_position_embeddings": 8192, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
                    "bos_token_id": PAD, "eos_token_id": EOS},
}  # fmt: skip
# the same architecture at test size: the bench's `tiny` shape measures its code path, not a speed
TINY = {
    "audio_token_index": AUDIO_TOKEN,
    "audio_config": {"num_mel_bins": 128, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 128,
                     "d_model": 64, "max_source_positions": 1500},
    "text_config": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 156032,
                    "max_position_embeddings": 2048, "bos_token_id": PAD, "eos_token_id": EOS},
}  # fmt: skip
PROMPT_TOKENS = 24  # "<|audio_bos|> ... <|audio_eos|>Describe the audio." in Qwen2-Audio's template, roughly


def config_for(shape: str):
    from transformers import Qwen2AudioConfig

    return Qwen2AudioConfig(**(TINY if shape == "tiny" else PUBLISHED))


def build(config, quant: str, device: torch.device):
    """Random weights on `device`, decoder layer by decoder layer; NF4 (bitsandbytes) on CUDA when `quant` is 4-bit."""
    from transformers import Qwen2AudioForConditionalGeneration

    from quantize import QuantSpec

    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    with torch.device("meta"):
        model = Qwen2AudioForConditionalGeneration(config)
    model.to(dtype)  # on meta: only the recorded dtype changes
    four_bit = quant == "4bit" and device.type == "cuda"
    for layer in model.model.language_model.layers:
        materialise(layer, device, dtype)
        if four_bit:  # as from_pretrained with BitsAndBytesConfig(load_in_4bit) makes them
            to_bitsandbytes(layer, QuantSpec("4bit", "bitsandbytes"), device, dtype)
    materialise(model, device, dtype)  # audio tower, projector, embeddings, head
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = EOS, PAD
    model.requires_grad_(False)
    return model.eval()


def inputs(config, device: torch.device) -> dict[str, torch.Tensor]:
    """The 30 s clip as Qwen2-Audio's processor gives it: 128-bin log-mel features and 750 audio placeholders."""
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=config.audio_config.num_mel_bins)
    features = extractor(synthetic_audio(30.0, seed=2), sampling_rate=16000, return_tensors="pt").input_features
    frames = features.shape[-1]
    audio_tokens = ((frames - 1) // 2 + 1 - 2) // 2 + 1  # the encoder's stride-2 conv, then its stride-2 pooling
    text = np.random.default_rng(0).integers(1000, 100000, size=PROMPT_TOKENS).tolist()
    ids = [AUDIO_BOS] + [AUDIO_TOKEN] * audio_tokens + [AUDIO_EOS] + text
    input_ids = torch.tensor([ids], device=device)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "input_features": features.to(device),
        "feature_attention_mask": torch.ones((1, frames), dtype=torch.long, device=device),
    }


class _TokenClock:
    """A `generate()` streamer that only notes when each token arrives (the GPU synchronised first)."""

    def __init__(self, sync) -> None:
        self.sync, self.times = sync, []

    def put(self, value) -> None:
        self.sync()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run(request: dict, device: torch.device, sync) -> dict:
    """Load, then `warmup` untimed and `repeat` timed greedy calls of `new_tokens` tokens: time to the first token,
    and seconds per token after it (from when each token reached the streamer)."""
    options = request["options"]
    start = time.perf_counter()
    config = config_for(request["peer_shape"])
    model = build(config, request["quant"], device)
    load_s = time.perf_counter() - start
    batch = inputs(config, device)
    batch["input_features"] = batch["input_features"].to(model.model.audio_tower.conv1.weight.dtype)
    n = options["new_tokens"]
    firsts, steps = [], []
    for attempt in range(options["warmup"] + options["repeat"]):
        clock = _TokenClock(sync)
        sync()
        began = time.perf_counter()
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1, streamer=clock)
        if attempt >= options["warmup"]:
            firsts.append(clock.times[1] - began)  # times[0]: the prompt, handed over before any work
            steps.append((clock.times[-1] - clock.times[1]) / (n - 1))
    step = statistics.median(steps)
    return {
        "peer": NAME if request["peer_shape"] != "tiny" else f"{NAME} (tiny shape)",
        "config": request["config"],
        "load_s": load_s,
        "prompt_tokens": int(batch["input_ids"].shape[1]),
        "first_token_s": statistics.median(firsts),
        "tokens": n,
        "tokens_per_s": 1 / step,
        "llm_dtype": str(next(model.model.language_model.parameters()).dtype).removeprefix("torch."),
    }
