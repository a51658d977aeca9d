#!/usr/bin/env python
"""Write the tiny random parts `salmonn train` needs beyond make_tiny_model.py's: a WavLM and a T5.

    python scripts/make_tiny_train_parts.py TINY_DIR [--seed N]

TINY_DIR is a folder make_tiny_model.py wrote (its llm/ tokenizer is reused, so the T5 shares the LLaMA's
vocabulary). Adds, from configs, in a second or two and with no download:
  TINY_DIR/wavlm/   Hugging Face WavLMModel folder + preprocessor_config.json (50 Hz, like WavLM-Large)
  TINY_DIR/t5/      Hugging Face T5ForConditionalGeneration folder + the tiny SentencePiece tokenizer
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch


def make_wavlm(out: Path, seed: int) -> None:
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel

    config = WavLMConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(32,) * 7,  # WavLM-Large's seven conv layers and strides (320 samples per frame), narrower
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, num_buckets=32, max_bucket_distance=64,
        feat_extract_norm="layer", do_stable_layer_norm=True, apply_spec_augment=False,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    WavLMModel(config).eval().save_pretrained(out)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(out)  # fmt: skip


def make_t5(out: Path, tokenizer_model: Path, seed: int) -> None:
    import sentencepiece as spm
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer_model)).get_piece_size()
    # the LLaMA tokenizer's ids: <unk> 0 (T5's pad and decoder start), <s> 1, </s> 2
    config = T5Config(
        vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False,  # Flan-T5's (T5 v1.1) layout
        dropout_rate=0.1, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(decoder_start_token_id=0, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(out)
    shutil.copy(tokenizer_model, out / "tokenizer.model")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tiny_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tokenizer = args.tiny_dir / "llm" / "tokenizer.model"
    if not tokenizer.is_file():
        parser.error(f"{args.tiny_dir} holds no llm/tokenizer.model: run scripts/make_tiny_model.py first")
    make_wavlm(args.tiny_dir / "wavlm", args.seed)
    make_t5(args.tiny_dir / "t5", tokenizer, args.seed + 1)
    print(f"wrote {args.tiny_dir / 'wavlm'} and {args.tiny_dir / 't5'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
