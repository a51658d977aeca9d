"""Named model shapes for benchmarks; their parameter counts are counted on the modules built on the meta device.

Speed and memory depend on the shapes, not on the weights' values, so a shape is all a benchmark needs.
The published sizes: Whisper-large-v2 encoder, BEATs iter3, the 2-layer Q-Former of SALMONN, Vicuna 7B / 13B.
Importing this module imports no torch; counting (`params`) builds on the meta device and does.
"""

from __future__ import annotations

from dataclasses import dataclass

from salmonn_cli.window import WHISPER_FRAMES_PER_WINDOW

MEL_BINS = 80  # Whisper's log-mel bins
BEATS_PATCH = 16  # BEATs' 16 x 16 fbank patches


@dataclass(frozen=True)
class WhisperShape:
    """The Whisper encoder (the decoder is never built)."""

    d_model: int
    layers: int
    heads: int
    ffn: int
    positions: int = WHISPER_FRAMES_PER_WINDOW

    def params(self) -> int:
        from .build import meta_whisper, parameters

        return parameters(meta_whisper(self))


@dataclass(frozen=True)
class BeatsShape:
    """BEATs iter3 (deep norm, gated relative position bias); field names follow BEATsConfig."""

    embed_dim: int
    encoder_embed_dim: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_embed_dim: int
    conv_pos: int = 128
    conv_pos_groups: int = 16
    num_buckets: int = 320
    max_distance: int = 800

    def config(self) -> dict:
        """The `cfg` dict of a published BEATs checkpoint with these sizes."""
        return {
            "input_patch_size": BEATS_PATCH,
            "embed_dim": self.embed_dim,
            "conv_bias": False,
            "encoder_layers": self.encoder_layers,
            "encoder_embed_dim": self.encoder_embed_dim,
            "encoder_ffn_embed_dim": self.encoder_ffn_embed_dim,
            "encoder_attention_heads": self.encoder_attention_heads,
            "activation_fn": "gelu",
            "layer_norm_first": False,
            "deep_norm": True,
            "conv_pos": self.conv_pos,
            "conv_pos_groups": self.conv_pos_groups,
            "relative_position_embedding": True,
            "num_buckets": self.num_buckets,
            "max_distance": self.max_distance,
            "gru_rel_pos": True,
            "finetuned_model": True,
        }

    def params(self) -> int:
        from .build import meta_beats, parameters

        return parameters(meta_beats(self))


@dataclass(frozen=True)
class QFormerShape:
    """The window-level Q-Former: BERT layers with cross-attention in every layer, then the projection."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    query_tokens: int = 1



@dataclass(frozen=True)
class LlamaShape:
    """A LLaMA / Vicuna decoder with LoRA of rank `lora_rank` on q_proj and v_proj."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int = 32_000
    lora_rank: int = 8

    def params(self, *, lora: bool = True) -> int:
        from .build import meta_llm, parameters

        return parameters(meta_llm(self, lora=lora))


@dataclass(frozen=True)
class ModelShape:
    """A whole SALMONN of one size."""

    name: str
    whisper: WhisperShape
    beats: BeatsShape
    qformer: QFormerShape
    llm: LlamaShape

    def params(self) -> dict[str, int]:
        """Parameter count of each component (the LLM's includes its LoRA)."""
        from salmonn_cli.model.qformer import WindowSpec

        from .build import meta_connector, parameters

        return {
            "whisper": self.whisper.params(),
            "beats": self.beats.params(),
            "connector": parameters(meta_connector(self, WindowSpec(1, 1))),  # windows hold no parameters
            "llm": self.llm.params(),
        }


WHISPER_LARGE_V2 = WhisperShape(d_model=1280, layers=32, heads=20, ffn=5120)
BEATS_ITER3 = BeatsShape(
    embed_dim=512, encoder_embed_dim=768, encoder_layers=12, encoder_attention_heads=12, encoder_ffn_embed_dim=3072
)
SALMONN_QFORMER = QFormerShape(hidden=768, layers=2, heads=12, intermediate=3072)
VICUNA_7B = LlamaShape(hidden=4096, layers=32, heads=32, intermediate=11008)
VICUNA_13B = LlamaShape(hidden=5120, layers=40, heads=40, intermediate=13824)

# scripts/make_tiny_model.py's TinySizes; vocab 1000 stands for the tiny tokenizer's
TINY = ModelShape(
    "tiny",
    WhisperShape(d_model=64, layers=2, heads=4, ffn=128),
    BeatsShape(
        embed_dim=32, encoder_embed_dim=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_embed_dim=128
    ),
    QFormerShape(hidden=64, layers=2, heads=4, intermediate=128),
    LlamaShape(hidden=64, layers=2, heads=4, intermediate=172, vocab=1000),
)

SHAPES: dict[str, ModelShape] = {
    "tiny": TINY,
    "salmonn-7b": ModelShape("salmonn-7b", WHISPER_LARGE_V2, BEATS_ITER3, SALMONN_QFORMER, VICUNA_7B),
    "salmonn-13b": ModelShape("salmonn-13b", WHISPER_LARGE_V2, BEATS_ITER3, SALMONN_QFORMER, VICUNA_13B),
}

