#!/usr/bin/env python
"""Write the tiny random parts `salmonn train` needs beyond make_tiny_model.py's: a WavLM and a T5.

    python scripts/make_tiny_train_parts.py TINY_DIR [--corpus SENTENCES.txt] [--seed N]

TINY_DIR is a folder make_tiny_model.py wrote (its llm/ tokenizer is reused, so the T5 shares the LLaMA's
vocabulary). Adds, from configs, in seconds and with no download:
  TINY_DIR/wavlm/    Hugging Face WavLMModel folder + preprocessor_config.json (50 Hz, like WavLM-Large)
  TINY_DIR/t5/       Hugging Face T5ForConditionalGeneration folder + the tiny SentencePiece tokenizer
  TINY_DIR/llm_text/ (with --corpus) the tiny LLaMA after a few hundred steps of language modelling on the corpus

With --corpus the T5 learns to write back each sentence its encoder reads. A random LLM is no language model:
its answer hardly depends on its input (a random LLaMA's logits are near uniform, a random T5's wildly peaked), so
no connector can teach it anything. Trained on text, it knows the sentences and the audio tokens must pick one,
which is what aligning an encoder with a real pre-trained LLM is.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tokenizer is salmonn_cli's


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


def train_on_text(model, sequences: list[list[int]], *, seq2seq: bool, steps: int = 150, lr: float = 3e-3) -> float:
    """Full-batch AdamW on the sentences (each `[bos] ids </s>`; T5 reads a sentence and writes it back, so its
    decoder listens to its encoder as Flan-T5's does); returns the last loss. Deterministic on a CPU for a seed."""
    length = max(map(len, sequences))
    ids = torch.tensor([s + [0] * (length - len(s)) for s in sequences])
    labels = torch.tensor([s + [-100] * (length - len(s)) for s in sequences])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        if seq2seq:  # T5 has no bos; it learns to write back what its encoder read
            source = ids[:, 1:].contiguous()
            loss = model(input_ids=source, attention_mask=(source != 0).long(), labels=labels[:, 1:].contiguous()).loss
        else:
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return float(loss.detach())


def pretrain(tiny_dir: Path, corpus: Path, seed: int) -> None:
    """llm_text/ (the LLaMA trained on the corpus, float16 as Vicuna ships) and t5/ trained on it in place."""
    import shutil as sh

    from transformers import AutoModelForCausalLM, T5ForConditionalGeneration

    from salmonn_cli.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_dir / "llm")
    lines = [line.strip().lower() for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    sequences = [[1, *tokenizer.encode(line), 2] for line in lines]
    torch.manual_seed(seed)
    llm = AutoModelForCausalLM.from_pretrained(str(tiny_dir / "llm"), dtype=torch.float32)
    train_on_text(llm, sequences, seq2seq=False)
    llm.half().save_pretrained(tiny_dir / "llm_text")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        sh.copy(tiny_dir / "llm" / name, tiny_dir / "llm_text" / name)
    t5 = T5ForConditionalGeneration.from_pretrained(str(tiny_dir / "t5"))
    train_on_text(t5, sequences, seq2seq=True)
    t5.save_pretrained(tiny_dir / "t5")


def main(argv=None) -> int:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tiny_dir", type=Path)
    parser.add_argument("--corpus", type=Path, help="sentences, one per line, for the LLMs to learn")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tokenizer = args.tiny_dir / "llm" / "tokenizer.model"
    if not tokenizer.is_file():
        parser.error(f"{args.tiny_dir} holds no llm/tokenizer.model: run scripts/make_tiny_model.py first")
    make_wavlm(args.tiny_dir / "wavlm", args.seed)
    make_t5(args.tiny_dir / "t5", tokenizer, args.seed + 1)
    if args.corpus is not None:
        pretrain(args.tiny_dir, args.corpus, args.seed)
    print(f"wrote {args.tiny_dir / 'wavlm'} and {args.tiny_dir / 't5'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
