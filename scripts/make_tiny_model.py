#!/usr/bin/env python
"""Write tiny random SALMONN components in the ORIGINAL on-disk formats.

    python scripts/make_tiny_model.py OUT_DIR [--seed N]

Produces, in a few seconds on a CPU and with no download:
  OUT_DIR/whisper/     Hugging Face WhisperModel folder + preprocessor_config.json
  OUT_DIR/beats.pt     {'cfg': ..., 'model': ...} like BEATs_iter3_plus_AS2M_*.pt
  OUT_DIR/llm/         float16 LlamaForCausalLM + LLaMA-style SentencePiece tokenizer
  OUT_DIR/salmonn.pth  {'model': ...} with the keys a SALMONN training checkpoint keeps
  OUT_DIR/model.toml   a model file naming the four above (usable as `salmonn ... --model OUT_DIR/model.toml`)

Every random tensor comes from a generator seeded by --seed, so the same seed
gives identical tensors. The tokenizer is trained on a fixed corpus (independent
of --seed) so that all variants share one vocabulary.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the model file's settings are salmonn_cli's


@dataclass(frozen=True)
class TinySizes:
    # Whisper encoder (the decoder is only kept so WhisperModel round-trips).
    whisper_d: int = 64
    whisper_layers: int = 2
    whisper_heads: int = 4
    whisper_ffn: int = 128
    whisper_vocab: int = 128
    # BEATs; the remaining cfg fields are the released checkpoint's values.
    beats_embed: int = 32  # patch embedding width ('embed_dim')
    beats_d: int = 64  # transformer width ('encoder_embed_dim')
    beats_layers: int = 2
    beats_heads: int = 4
    beats_ffn: int = 128
    beats_conv_pos: int = 128
    beats_conv_groups: int = 16
    beats_buckets: int = 320
    beats_max_distance: int = 800
    beats_classes: int = 527
    # LLaMA; vocab_size is whatever the trained tokenizer ends up with.
    llm_hidden: int = 64
    llm_layers: int = 2
    llm_heads: int = 4
    llm_inter: int = 172
    sp_vocab: int = 1000
    # Q-Former / SALMONN glue.
    qformer_hidden: int = 64
    qformer_heads: int = 4
    qformer_inter: int = 128
    qformer_layers: int = 2
    qformer_max_pos: int = 512
    query_tokens: int = 1
    lora_rank: int = 8


# ---------------------------------------------------------------- random tensors
class Rand:
    """Seeded tensor factory; one generator for everything keeps runs reproducible."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def normal(self, *shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=self.g) * std + mean

    def linear(self, out_f, in_f):
        # 1/sqrt(fan_in) keeps activations O(1) so every weight visibly matters
        # (std 0.02 would make the tiny nets collapse onto their biases).
        return self.normal(out_f, in_f, std=in_f**-0.5), self.normal(out_f, std=0.05)

    def norm(self, n):
        # LayerNorm weight near 1, small non-zero bias.
        return self.normal(n, std=0.1, mean=1.0), self.normal(n, std=0.05)


def put(sd, prefix, pair, names=("weight", "bias")):
    for name, t in zip(names, pair, strict=True):
        sd[f"{prefix}.{name}"] = t


# ---------------------------------------------------------------- whisper
def make_whisper(out: Path, s: TinySizes, seed: int):
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    v = s.whisper_vocab
    cfg = WhisperConfig(
        vocab_size=v,
        num_mel_bins=80,
        d_model=s.whisper_d,
        encoder_layers=s.whisper_layers,
        encoder_attention_heads=s.whisper_heads,
        encoder_ffn_dim=s.whisper_ffn,
        decoder_layers=1,
        decoder_attention_heads=s.whisper_heads,
        decoder_ffn_dim=s.whisper_ffn,
        # SALMONN's windowing assumes 1500 encoder frames per 30 s of audio.
        max_source_positions=1500,
        max_target_positions=32,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        # Special ids must exist in the tiny vocab (defaults point past 50k).
        bos_token_id=v - 2,
        decoder_start_token_id=v - 2,
        eos_token_id=v - 1,
        pad_token_id=v - 1,
        suppress_tokens=[],
        begin_suppress_tokens=[v - 1],
    )
    torch.manual_seed(seed)  # transformers initialises from the global RNG
    WhisperModel(cfg).eval().save_pretrained(out)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(out)


# ---------------------------------------------------------------- BEATs
def beats_cfg(s: TinySizes) -> dict:
    # Same keys and order as the released checkpoint's 'cfg'.
    return {
        "input_patch_size": 16,
        "embed_dim": s.beats_embed,
        "conv_bias": False,
        "encoder_layers": s.beats_layers,
        "encoder_embed_dim": s.beats_d,
        "encoder_ffn_embed_dim": s.beats_ffn,
        "encoder_attention_heads": s.beats_heads,
        "activation_fn": "gelu",
        "layer_wise_gradient_decay_ratio": 0.6,
        "layer_norm_first": False,
        "deep_norm": True,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "encoder_layerdrop": 0.05,
        "dropout_input": 0.0,
        "conv_pos": s.beats_conv_pos,
        "conv_pos_groups": s.beats_conv_groups,
        "relative_position_embedding": True,
        "num_buckets": s.beats_buckets,
        "max_distance": s.beats_max_distance,
        "gru_rel_pos": True,
        "finetuned_model": True,
        "predictor_dropout": 0.0,
        "predictor_class": s.beats_classes,
    }


def beats_layer(r: Rand, sd: dict, i: int, cfg: dict, rel_bias: torch.Tensor):
    d, h, ffn = cfg["encoder_embed_dim"], cfg["encoder_attention_heads"], cfg["encoder_ffn_embed_dim"]
    p = f"encoder.layers.{i}"
    sd[f"{p}.self_attn.grep_a"] = r.normal(1, h, 1, 1, std=0.1, mean=1.0)
    # BEATs builds the table in every layer, then deletes it in layers >= 1 and
    # re-attaches layer 0's module: the key moves after grep_linear there, and
    # every layer stores the SAME table.
    if i == 0:
        sd[f"{p}.self_attn.relative_attention_bias.weight"] = rel_bias
    for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
        put(sd, f"{p}.self_attn.{name}", r.linear(d, d))
    put(sd, f"{p}.self_attn.grep_linear", r.linear(8, d // h))
    if i > 0:
        sd[f"{p}.self_attn.relative_attention_bias.weight"] = rel_bias
    put(sd, f"{p}.self_attn_layer_norm", r.norm(d))
    put(sd, f"{p}.fc1", r.linear(ffn, d))
    put(sd, f"{p}.fc2", r.linear(d, ffn))
    put(sd, f"{p}.final_layer_norm", r.norm(d))


def beats_state_dict(r: Rand, cfg: dict) -> dict:
    d, e, k = cfg["encoder_embed_dim"], cfg["embed_dim"], cfg["conv_pos"]
    p = cfg["input_patch_size"]
    sd: dict = {}
    put(sd, "post_extract_proj", r.linear(d, e))
    sd["patch_embedding.weight"] = r.normal(e, 1, p, p, std=1.0 / p)
    # pos_conv is weight-normed over dim 2: weight = g * v / ||v||_(0,1).
    # g ~ 0.7 gives per-element weights ~ 1/sqrt(fan_in) for fan_in = d/groups*k.
    sd["encoder.pos_conv.0.bias"] = r.normal(d, std=0.05)
    sd["encoder.pos_conv.0.weight_g"] = r.normal(1, 1, k, std=0.1, mean=0.7)
    sd["encoder.pos_conv.0.weight_v"] = r.normal(d, d // cfg["conv_pos_groups"], k)
    rel_bias = r.normal(cfg["num_buckets"], cfg["encoder_attention_heads"], std=0.5)
    for i in range(cfg["encoder_layers"]):
        beats_layer(r, sd, i, cfg, rel_bias)
    put(sd, "encoder.layer_norm", r.norm(d))
    put(sd, "layer_norm", r.norm(e))
    put(sd, "predictor", r.linear(cfg["predictor_class"], d))
    return sd


# ---------------------------------------------------------------- tokenizer
_WORDS = {
    "subj": "the speaker|a woman|a man|the child|my friend|the teacher|our team|the dog|"
    "a bird|the crowd|the engine|the radio|an old clock|the orchestra|someone",
    "verb": "says|sings|plays|hears|describes|explains|repeats|whispers|shouts|"
    "records|laughs about|talks about|listens to|asks about|answers",
    "obj": "the weather|a short story|the news|a piano melody|the recipe|the music|"
    "a question|the answer|the lesson|the meeting|a loud noise|the rain|"
    "the traffic|a guitar song|the football match|the history of science",
    "where": "in the kitchen|at the station|near the river|in a quiet room|on the radio|"
    "outside the house|in the morning|during the concert|after dinner|"
    "at the airport|in the park|over the phone|before the lecture",
    "adv": "quickly|slowly|clearly|softly|loudly|happily|carefully|again|today|"
    "yesterday|tomorrow|twice|suddenly|calmly",
}
_FIXED = [
    "USER: <Speech><SpeechHere></Speech> Please transcribe the speech.",
    "ASSISTANT: The speaker says hello and thanks everyone for coming.",
    "Please describe the audio in detail. What sounds can you hear?",
    "Recognize the speech and give me the transcription.",
    "Listen to the audio clip and write a caption for it.",
    "Can you translate the speech into English? Answer the question briefly.",
    "What is the emotion of the speaker? Is the speaker male or female?",
    "Music plays in the background while people talk and dogs bark.",
    "It's 10:45 am on June 3rd, 2023; the price is $19.99 (tax included).",
    'She said "yes", then he asked: why not? #1 & #2 - 50% off!',
]


def tokenizer_corpus() -> list[str]:
    # Fixed-seed generator: the vocabulary must not change with --seed.
    rng = random.Random(1234)
    pick = {k: v.split("|") for k, v in _WORDS.items()}
    lines = list(_FIXED)
    for n in range(1500):
        s = f"{rng.choice(pick['subj'])} {rng.choice(pick['verb'])} {rng.choice(pick['obj'])}"
        s = f"{s} {rng.choice(pick['where'])} {rng.choice(pick['adv'])}"
        s = s[0].upper() + s[1:] + rng.choice([".", "!", "?", ","]) + f" {n * 37 % 1000}"
        lines.append(s.upper() if n % 7 == 0 else s)
    return lines


def train_sentencepiece(vocab_size: int) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    # LLaMA's trainer settings (see the released tokenizer.model trainer_spec).
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus()),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        split_by_unicode_script=True,
        split_by_whitespace=True,
        split_by_number=True,
        max_sentencepiece_length=16,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return buf.getvalue()


def _token(content: str, typed: bool) -> dict:
    t = {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **t} if typed else t


def write_tokenizer(out: Path, model_bytes: bytes):
    # Same three files as the original LLaMA/Vicuna (4.28-era slow tokenizer).
    (out / "tokenizer.model").write_bytes(model_bytes)
    names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    special = {k: _token(v, False) for k, v in names.items()}
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        **{k: _token(v, True) for k, v in names.items()},
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(1e30),
        "pad_token": None,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- LLaMA
def make_llm(out: Path, s: TinySizes, seed: int):
    import sentencepiece as spm
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    model_bytes = train_sentencepiece(s.sp_vocab)
    vocab = spm.SentencePieceProcessor(model_proto=model_bytes).get_piece_size()
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=s.llm_hidden,
        intermediate_size=s.llm_inter,
        num_hidden_layers=s.llm_layers,
        num_attention_heads=s.llm_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval().half()  # Vicuna ships float16 weights
    model.config.dtype = torch.float16
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(out)
    write_tokenizer(out, model_bytes)


# ---------------------------------------------------------------- SALMONN checkpoint
def qformer_layer(r: Rand, sd: dict, i: int, s: TinySizes, enc_width: int):
    h, inter = s.qformer_hidden, s.qformer_inter
    p = f"speech_Qformer.bert.encoder.layer.{i}"
    for att, kv_in in (("attention", h), ("crossattention", enc_width)):
        put(sd, f"{p}.{att}.self.query", r.linear(h, h))
        put(sd, f"{p}.{att}.self.key", r.linear(h, kv_in))
        put(sd, f"{p}.{att}.self.value", r.linear(h, kv_in))
        put(sd, f"{p}.{att}.output.dense", r.linear(h, h))
        put(sd, f"{p}.{att}.output.LayerNorm", r.norm(h))
    put(sd, f"{p}.intermediate_query.dense", r.linear(inter, h))
    put(sd, f"{p}.output_query.dense", r.linear(h, inter))
    put(sd, f"{p}.output_query.LayerNorm", r.norm(h))


def lora_and_rotary(r: Rand, sd: dict, s: TinySizes):
    d, rank = s.llm_hidden, s.lora_rank
    head_dim = d // s.llm_heads
    # 4.28-era LLaMA keeps a per-layer rotary buffer; SALMONN saves buffers too.
    # The reference holds float16-rounded values stored as float32 (the model
    # had been .half()-ed), so mirror that.
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    inv_freq = inv_freq.half().float()
    for i in range(s.llm_layers):
        p = f"llama_model.base_model.model.model.layers.{i}.self_attn"
        for proj in ("q_proj", "v_proj"):
            # B is random too (PEFT inits it to zero) so LoRA wiring is testable.
            sd[f"{p}.{proj}.lora_A.default.weight"] = r.normal(rank, d, std=d**-0.5)
            sd[f"{p}.{proj}.lora_B.default.weight"] = r.normal(d, rank, std=0.05)
        sd[f"{p}.rotary_emb.inv_freq"] = inv_freq.clone()


def salmonn_state_dict(r: Rand, s: TinySizes, beats_sd: dict) -> dict:
    h = s.qformer_hidden
    sd: dict = {"speech_query_tokens": r.normal(1, s.query_tokens, h, std=0.02)}
    lora_and_rotary(r, sd, s)
    put(sd, "ln_speech", r.norm(s.whisper_d))
    # BEATs' shared relative-position table is de-duplicated in named_parameters(),
    # so SALMONN's "drop frozen params" filter misses the copies in layers >= 1.
    for i in range(1, s.beats_layers):
        key = f"encoder.layers.{i}.self_attn.relative_attention_bias.weight"
        sd[f"beats.{key}"] = beats_sd[key].clone()
    put(sd, "ln_audio", r.norm(s.beats_d))
    sd["speech_Qformer.bert.embeddings.position_ids"] = torch.arange(s.qformer_max_pos).unsqueeze(0)
    put(sd, "speech_Qformer.bert.embeddings.LayerNorm", r.norm(h))
    for i in range(s.qformer_layers):
        qformer_layer(r, sd, i, s, s.whisper_d + s.beats_d)
    put(sd, "speech_llama_proj", r.linear(s.llm_hidden, h))
    return sd


# ---------------------------------------------------------------- CLI
def disk_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def build(out: Path, s: TinySizes, seed: int):
    out.mkdir(parents=True, exist_ok=True)
    steps = []

    def step(name, fn):
        t = time.perf_counter()
        fn()
        steps.append((name, disk_size(out / name), time.perf_counter() - t))

    step("whisper", lambda: make_whisper(out / "whisper", s, seed))
    # Separate generators per file: changing one component never shifts another.
    beats = beats_state_dict(Rand(seed + 1), beats_cfg(s))
    step("beats.pt", lambda: torch.save({"cfg": beats_cfg(s), "model": beats}, out / "beats.pt"))
    step("llm", lambda: make_llm(out / "llm", s, seed + 2))
    salmonn = salmonn_state_dict(Rand(seed + 3), s, beats)
    step("salmonn.pth", lambda: torch.save({"model": salmonn}, out / "salmonn.pth"))
    write_model_file(out, s, beats, salmonn)
    for name, size, secs in steps:
        print(f"{name:12s} {size / 1024:8.1f} KiB  ({secs:.2f}s)  {out / name}")


# ---------------------------------------------------------------- model file
CONNECTOR_PREFIXES = ("speech_Qformer.", "speech_query_tokens", "ln_speech.", "ln_audio.", "speech_llama_proj.")


def write_model_file(out: Path, s: TinySizes, beats_sd: dict, salmonn_sd: dict):
    """OUT/model.toml: local paths to the four components, their settings, and parameter counts read from them."""
    from safetensors import safe_open

    def numel(path: Path, prefix: str = "") -> int:
        with safe_open(str(path), framework="pt") as f:
            return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(prefix))

    # float tensors only: position_ids is a buffer, not a parameter
    connector = sum(
        v.numel() for k, v in salmonn_sd.items() if k.startswith(CONNECTOR_PREFIXES) and v.is_floating_point()
    )
    sizes = {
        "llm_params": numel(out / "llm" / "model.safetensors"),
        "whisper_encoder_params": numel(out / "whisper" / "model.safetensors", "encoder."),
        "beats_params": sum(v.numel() for v in beats_sd.values()),
        "connector_params": connector,
    }
    settings = model_settings(s.qformer_heads)  # in no tensor: the tiny Q-Former is built with this many heads
    description = "tiny random SALMONN components from scripts/make_tiny_model.py (for tests)"
    write_model_toml(out, "tiny", description, settings, sizes)


def model_settings(qformer_heads: int) -> dict:
    """The [settings] of a model file: the published models' (the original's windows and prompt, LoRA scale 4.0;
    these LoRA weights are random) with the tiny Q-Former's heads."""
    from dataclasses import asdict, replace

    from salmonn_cli.model_file import ModelSettings

    return asdict(replace(ModelSettings(), qformer_heads=qformer_heads))


def write_model_toml(out: Path, name: str, description: str, settings: dict, sizes: dict) -> None:
    """OUT/model.toml naming the four components in OUT by their standard local paths."""
    lines = [
        f"name = {json.dumps(name)}",
        f"description = {json.dumps(description)}",
        "",
        'whisper = { path = "whisper" }',
        'beats = { path = "beats.pt" }',
        'llm = { path = "llm" }',
        'checkpoint = { path = "salmonn.pth" }',
        "",
        "[settings]",
        *(f"{k} = {json.dumps(v)}" for k, v in settings.items()),  # a JSON string/number is valid TOML here
        "",
        "[sizes]",
        *(f"{k} = {v}" for k, v in sizes.items()),
    ]
    (out / "model.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _numel(shape) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def main(argv=None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stdout to one line per component
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--qformer-layers", type=int, default=2)
    ap.add_argument("--query-tokens", type=int, default=1)
    ap.add_argument("--lora-rank", type=int, default=8)
    a = ap.parse_args(argv)
    s = TinySizes(qformer_layers=a.qformer_layers, query_tokens=a.query_tokens, lora_rank=a.lora_rank)
    build(a.out_dir, s, a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
