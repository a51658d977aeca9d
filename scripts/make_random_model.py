#!/usr/bin/env python
"""Write a SALMONN of a named real shape with random weights, in the ORIGINAL on-disk formats.

    python scripts/make_random_model.py --shape salmonn-7b OUT_DIR [--seed N] [--force]

The shapes are benchmarks.shapes.SHAPES (tiny, salmonn-7b, salmonn-13b). The output has the layout of
scripts/make_tiny_model.py, so `load_model` and `scripts/bench.py --model OUT_DIR/model.toml` read it exactly as
downloaded checkpoints; only the values are random, which changes neither load time nor memory:
  OUT_DIR/whisper/     HF Whisper folder, float16, only the encoder's tensors (`model.encoder.*`)
  OUT_DIR/beats.pt     {'cfg': ..., 'model': ...} like BEATs_iter3_plus_AS2M_*.pt, float32
  OUT_DIR/llm/         float16 LLaMA in safetensors shards (one per decoder layer) + index, config, tokenizer
  OUT_DIR/salmonn.pth  {'model': ...} with the original key names: connector + LoRA (rank 8 on q_proj, v_proj)
  OUT_DIR/model.toml   a model file naming the four above

The LLM is generated and written one decoder layer at a time, so the host never holds the whole LLM.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS.parent))  # run from a checkout without installing, as scripts/bench.py does
sys.path.insert(0, str(SCRIPTS))  # for make_tiny_model, whose formats, BEATs tensors and tokenizer are reused

import make_tiny_model as tiny  # noqa: E402

from benchmarks.build import build_connector, build_whisper, llama_config, materialise  # noqa: E402
from benchmarks.shapes import SHAPES, ModelShape  # noqa: E402
from quantize.memory import release_freed_memory  # noqa: E402
from salmonn_cli.checkpoint import salmonn_state_dict  # noqa: E402

CPU = torch.device("cpu")
COMPONENTS = ("whisper", "beats.pt", "llm", "salmonn.pth", "model.toml")
TOKENIZER_TRAINED_VOCAB = 1000  # what make_tiny_model trains; padded up to the LLM's vocab (see pad_vocabulary)
LORA_TARGETS = ("q_proj", "v_proj")
LORA_B_BOUND = 0.05  # non-zero (peft starts B at 0) so the adapter changes the output, yet small


def progress(name: str, seconds: float, detail: str = "") -> None:
    print(f"{name:12s} {seconds:7.1f} s  {detail}".rstrip(), file=sys.stderr, flush=True)


def human(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------- whisper
def make_whisper(out: Path, shape: ModelShape, seed: int) -> int:
    """HF Whisper folder holding only the encoder (our loader never reads the decoder); returns its params."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    torch.manual_seed(seed)  # materialise() draws from the global generator
    encoder, extractor = build_whisper(shape, CPU, torch.float16)
    config = encoder.config
    w = shape.whisper
    # As whisper-large-v2's config: a decoder as deep and wide as the encoder (its tensors are not written).
    config.decoder_layers, config.decoder_attention_heads, config.decoder_ffn_dim = w.layers, w.heads, w.ffn
    config.architectures = ["WhisperForConditionalGeneration"]  # whose keys are `model.encoder.*`
    config.dtype = torch.float16
    config.save_pretrained(out)
    extractor.save_pretrained(out)
    tensors = {f"model.encoder.{k}": v.contiguous() for k, v in encoder.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return sum(v.numel() for v in tensors.values())


# ---------------------------------------------------------------- BEATs
def make_beats(path: Path, shape: ModelShape, seed: int) -> int:
    # The published cfg's keys and order (make_tiny_model's) with this shape's sizes.
    cfg = tiny.beats_cfg(tiny.TinySizes()) | shape.beats.config()
    state = tiny.beats_state_dict(tiny.Rand(seed), cfg)
    torch.save({"cfg": cfg, "model": state}, path)
    return sum(v.numel() for v in state.values())  # counted as make_tiny_model counts it


# ---------------------------------------------------------------- LLaMA
def pad_vocabulary(model_bytes: bytes, vocab: int) -> bytes:
    """A SentencePiece model with exactly `vocab` pieces: random weights can emit any id, so each needs a piece.

    The added pieces (`▁tok<id>`) are NORMAL pieces scored below every trained one; BPE can only build a piece
    from two pieces already in the vocabulary and `▁tok` is not one, so encoding never produces them and text
    encodes as before. Decoding id N gives " tokN".
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model_bytes)
    have = len(proto.pieces)
    if have > vocab:
        raise SystemExit(f"the trained tokenizer has {have} pieces, more than the LLM's vocabulary of {vocab}.")
    lowest = min(p.score for p in proto.pieces)
    for i in range(have, vocab):
        proto.pieces.add(piece=f"\u2581tok{i}", score=lowest - 1 - (i - have), type=pb.ModelProto.SentencePiece.NORMAL)
    return proto.SerializeToString()


def write_llama_tokenizer(out: Path, vocab: int) -> None:
    """LLaMA's tokenizer files (make_tiny_model's: <unk>=0, <s>=1, </s>=2, byte fallback) with `vocab` pieces."""
    trained = tiny.train_sentencepiece(min(vocab, TOKENIZER_TRAINED_VOCAB))
    tiny.write_tokenizer(out, pad_vocabulary(trained, vocab))


def llm_config(shape: ModelShape):
    """The bench builder's Vicuna config, saved as Vicuna's: float16 LlamaForCausalLM."""
    config = llama_config(shape.llm)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float16  # Vicuna ships float16 weights
    return config


def make_llm(out: Path, shape: ModelShape, seed: int) -> int:
    """float16 LLaMA, sharded: embeddings, then one shard per decoder layer, then final norm + lm_head.

    Built on the meta device; each shard's modules get memory and random values, are written, and go back to meta,
    so the host holds one decoder layer at a time. Returns the parameter count.
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaForCausalLM

    out.mkdir(parents=True)
    config = llm_config(shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shards = [["model.embed_tokens"], *([f"model.layers.{i}"] for i in range(config.num_hidden_layers))]
    shards.append(["model.norm", "lm_head"])
    torch.manual_seed(seed)  # materialise() draws from the global generator
    weight_map, total_bytes, params = {}, 0, 0
    for index, names in enumerate(shards, start=1):
        start = time.perf_counter()
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            module = model.get_submodule(name)
            materialise(module, CPU, torch.float16)  # norms 1, others uniform, std 1/sqrt(fan_in)
            tensors.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total_bytes += sum(v.numel() * v.element_size() for v in tensors.values())
        params += sum(v.numel() for v in tensors.values())
        del tensors
        for name in names:
            model.get_submodule(name).to("meta")  # give the memory back before the next shard
        release_freed_memory()
        progress(f"llm {index}/{len(shards)}", time.perf_counter() - start, ", ".join(names))
    index_json = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")
    config.save_pretrained(out)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(out)
    write_llama_tokenizer(out, config.vocab_size)
    return params


# ---------------------------------------------------------------- SALMONN checkpoint
def make_checkpoint(path: Path, shape: ModelShape, seed: int) -> int:
    """{'model': connector + LoRA} under the original key names; returns the connector's parameter count."""
    from salmonn_cli.model.qformer import WindowSpec
    from salmonn_cli.model_file import ModelSettings

    torch.manual_seed(seed)
    published = ModelSettings()
    windows = WindowSpec.from_seconds(published.second_per_window, published.second_stride)
    connector = build_connector(shape, windows, CPU, torch.float32).state_dict()
    g = torch.Generator().manual_seed(seed + 1)
    h, r = shape.llm.hidden, shape.llm.lora_rank
    a_bound = (3 / h) ** 0.5  # std 1/sqrt(fan_in), as materialise()
    lora = {}
    for i in range(shape.llm.layers):
        for target in LORA_TARGETS:
            prefix = f"base_model.model.model.layers.{i}.self_attn.{target}.lora_"
            lora[f"{prefix}A.default.weight"] = torch.empty(r, h).uniform_(-a_bound, a_bound, generator=g)
            lora[f"{prefix}B.default.weight"] = torch.empty(h, r).uniform_(-LORA_B_BOUND, LORA_B_BOUND, generator=g)
    torch.save({"model": salmonn_state_dict(connector, lora)}, path)
    return sum(v.numel() for v in connector.values() if v.is_floating_point())


# ---------------------------------------------------------------- model file
def write_model_file(out: Path, shape: ModelShape, sizes: dict[str, int]) -> None:
    """OUT/model.toml in make_tiny_model's format (local paths, settings, parameter counts)."""
    description = f"{shape.name} shape with random weights from scripts/make_random_model.py (for benchmarks)"
    tiny.write_model_toml(out, f"{shape.name}-random", description, tiny.model_settings(shape.qformer.heads), sizes)


# ---------------------------------------------------------------- checks before writing
def estimated_bytes(shape: ModelShape) -> int:
    """What the output will take: fp16 Whisper encoder and LLM, fp32 BEATs, connector and LoRA, plus a margin."""
    p = shape.params()
    lora = shape.llm.params() - shape.llm.params(lora=False)
    exact = 2 * p["whisper"] + 4 * p["beats"] + 2 * shape.llm.params(lora=False) + 4 * (p["connector"] + lora)
    return int(exact * 1.02) + 64 * 2**20  # headers, BEATs' classifier, tokenizer, configs


def disk_size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size if path.exists() else 0


def prepare(out: Path, shape: ModelShape, force: bool) -> None:
    """Refuse a non-empty OUT (unless --force: then replace what this script writes) or too little disk space."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"{out} exists and is not a folder.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise SystemExit(f"{out} is not empty: give a new or empty folder, or --force to replace the model in it.")
    existing = [out / name for name in COMPONENTS if (out / name).exists()]
    reclaimed = sum(disk_size(p) for p in existing)
    probe = next(p for p in (out, *out.parents) if p.exists())
    need, free = estimated_bytes(shape), shutil.disk_usage(probe).free + reclaimed
    if need > free:
        raise SystemExit(f"{shape.name} needs about {human(need)} but only {human(free)} is free on {probe}.")
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def build(out: Path, shape: ModelShape, seed: int) -> int:
    """Write every component; returns the bytes written."""
    sizes = {}

    def step(name: str, fn, size_key: str) -> None:
        start = time.perf_counter()
        sizes[size_key] = fn()
        progress(name, time.perf_counter() - start, human(disk_size(out / name)))

    # Separate seeds per component: changing one never shifts another.
    step("whisper", lambda: make_whisper(out / "whisper", shape, seed), "whisper_encoder_params")
    step("beats.pt", lambda: make_beats(out / "beats.pt", shape, seed + 1), "beats_params")
    step("llm", lambda: make_llm(out / "llm", shape, seed + 2), "llm_params")
    step("salmonn.pth", lambda: make_checkpoint(out / "salmonn.pth", shape, seed + 3), "connector_params")
    order = ("llm_params", "whisper_encoder_params", "beats_params", "connector_params")
    write_model_file(out, shape, {k: sizes[k] for k in order})
    return disk_size(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace the model in a non-empty OUT_DIR")
    a = ap.parse_args(argv)
    shape = SHAPES[a.shape]
    prepare(a.out_dir, shape, a.force)
    start = time.perf_counter()
    total = build(a.out_dir, shape, a.seed)
    print(f"{shape.name}-random: {human(total)} in {time.perf_counter() - start:.1f} s  {a.out_dir / 'model.toml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
