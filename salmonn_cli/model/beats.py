"""BEATs audio encoder (Chen et al. 2022), feature extraction only, as SALMONN runs it.

A re-implementation of `BEATs.extract_features(..., feature_only=True)` of the original code
(microsoft/unilm `beats/`, copied into SALMONN as `models/beats/`), in eval mode: no dropout, no
layer drop (both are identities at inference). It loads the published `{'cfg': ..., 'model': ...}`
checkpoints unchanged (same parameter names, weight-normed positional conv stored as weight_g/weight_v).

Input is the normalised Kaldi filter bank of `salmonn_cli.features.beats_fbank`, (B, F, 128).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError, MissingKeyError, ShapeMismatchError, UnexpectedKeyError

_ATTN_ALPHA = 32.0  # the original scales q down by 32 and the max-subtracted logits back up (fp16 range)
_RELATIVE_BIAS_KEY = "encoder.layers.{}.self_attn.relative_attention_bias.weight"
_PREDICTOR_KEYS = frozenset({"predictor.weight", "predictor.bias"})  # the 527-class head: unused


@dataclass(frozen=True)
class BeatsConfig:
    """The BEATsConfig fields that shape the network (dropouts and training-only fields are left out)."""

    input_patch_size: int = -1
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_norm_first: bool = False
    deep_norm: bool = False
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = False
    num_buckets: int = 320
    max_distance: int = 1280
    gru_rel_pos: bool = False
    finetuned_model: bool = False
    predictor_class: int = 527

    @classmethod
    def from_dict(cls, cfg: dict) -> BeatsConfig:
        """Build from a checkpoint's `cfg` dict; unknown keys (dropouts, ...) are ignored, absent ones default
        to the original BEATsConfig defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in cfg.items() if key in known})

    @property
    def head_dim(self) -> int:
        return self.encoder_embed_dim // self.encoder_attention_heads

    @property
    def deep_norm_alpha(self) -> float:
        """Residual multiplier of DeepNet's post-LN blocks: (2 N)^(1/4), or 1 without deep norm."""
        return math.pow(2 * self.encoder_layers, 1 / 4) if self.deep_norm else 1.0


def _gelu_tanh(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": lambda x: F.gelu(x.float()).type_as(x),  # erf GELU, computed in float32 like the original
    "gelu_accurate": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "relu": F.relu,
    "tanh": torch.tanh,
    "linear": lambda x: x,
}


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> Tensor:
    """T5-style bidirectional bucket index of every (query, key) offset: int64 (L, L).

    Same integer/float32 arithmetic as the original `_relative_positions_bucket`: half the buckets per
    direction, exact buckets below half of that, log-spaced ones up to max_distance, clamped.
    """
    position = torch.arange(length, dtype=torch.long)
    relative = position[None, :] - position[:, None]  # key - query, (L, L)
    half = num_buckets // 2
    buckets = (relative > 0).to(torch.long) * half
    distance = torch.abs(relative)
    max_exact = half // 2
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    if_large = max_exact + (log_ratio * (half - max_exact)).to(torch.long)
    if_large = torch.clamp(if_large, max=half - 1)
    return buckets + torch.where(distance < max_exact, distance, if_large)


class _WeightNormConv1d(nn.Module):
    """Conv1d with weight normalisation over dims (0, 1) (`weight_norm(conv, dim=2)`), stored as the original
    state dict stores it: `weight_g` (1, 1, K), `weight_v` (C_out, C_in / groups, K), `bias` (C_out,)."""

    def __init__(self, channels: int, kernel_size: int, groups: int) -> None:
        super().__init__()
        self.weight_g = nn.Parameter(torch.empty(1, 1, kernel_size))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels))
        self.padding = kernel_size // 2
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        # what nn.utils.weight_norm(dim=2) evaluates: v * (g / ||v||), the norm over every dim but 2
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True))
        return F.conv1d(x, weight, self.bias, padding=self.padding, groups=self.groups)


class _SelfAttention(nn.Module):
    """Multi-head self-attention with the (gated) relative position bias of BEATs."""

    def __init__(self, cfg: BeatsConfig, has_bias_table: bool) -> None:
        super().__init__()
        dim, self.num_heads, self.head_dim = cfg.encoder_embed_dim, cfg.encoder_attention_heads, cfg.head_dim
        if self.head_dim * self.num_heads != dim:
            raise CheckpointError(f"BEATs encoder_embed_dim {dim} is not divisible by {self.num_heads} heads")
        self.scaling = self.head_dim**-0.5
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        if has_bias_table:  # only layer 0 owns the table; the original ties the other layers to it
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, self.num_heads)
        self.gru_rel_pos = cfg.gru_rel_pos
        if cfg.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, self.num_heads, 1, 1))

    def _heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        # (B, L, C) -> (B, H, L, d) -> (B*H, L, d), the original's row order (batch-major, then head)
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2).reshape(-1, length, self.head_dim)

    def _gated_bias(self, q: Tensor, position_bias: Tensor, batch: int) -> Tensor:
        """Gate the (B*H, L, L) bias per query with the GRU-style gate computed from the unscaled query."""
        length = q.shape[1]
        query = q.view(batch, self.num_heads, length, self.head_dim) * _ATTN_ALPHA / self.scaling  # (B, H, L, d)
        gates = self.grep_linear(query).view(batch, self.num_heads, length, 2, 4).sum(-1)  # (B, H, L, 2)
        gate_a, gate_b = torch.sigmoid(gates).chunk(2, dim=-1)  # (B, H, L, 1) each
        gate = gate_a * (gate_b * self.grep_a - 1.0) + 2.0
        return gate.view(batch * self.num_heads, length, 1) * position_bias

    def forward(self, x: Tensor, position_bias: Tensor | None) -> Tensor:
        """x (B, L, C), position_bias (B*H, L, L) or None -> (B, L, C)."""
        batch, length, dim = x.shape
        q = self.q_proj(x)
        k = self.k_proj(x)
        v = self.v_proj(x)
        q = q * self.scaling
        q = q * (1 / _ATTN_ALPHA)  # same two roundings as the original's in-place `q *=` steps
        q, k, v = self._heads(q), self._heads(k), self._heads(v)  # (B*H, L, d)
        weights = torch.bmm(q, k.transpose(1, 2))  # (B*H, L, L)
        weights = (weights - weights.max(dim=-1, keepdim=True)[0]) * _ATTN_ALPHA
        if position_bias is not None:
            weights = weights + (self._gated_bias(q, position_bias, batch) if self.gru_rel_pos else position_bias)
        probs = F.softmax(weights, dim=-1)
        out = torch.bmm(probs, v)  # (B*H, L, d)
        out = out.view(batch, self.num_heads, length, self.head_dim).transpose(1, 2).reshape(batch, length, dim)
        return self.out_proj(out)


class _EncoderLayer(nn.Module):
    """Transformer block: post-LN with DeepNet residual scaling (or pre-LN when layer_norm_first)."""

    def __init__(self, cfg: BeatsConfig, has_bias_table: bool) -> None:
        super().__init__()
        if cfg.activation_fn not in _ACTIVATIONS:
            raise CheckpointError(f"unsupported BEATs activation_fn {cfg.activation_fn!r}")
        self.activation = _ACTIVATIONS[cfg.activation_fn]
        self.self_attn = _SelfAttention(cfg, has_bias_table)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.encoder_embed_dim)
        self.fc1 = nn.Linear(cfg.encoder_embed_dim, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, cfg.encoder_embed_dim)
        self.final_layer_norm = nn.LayerNorm(cfg.encoder_embed_dim)
        self.layer_norm_first = cfg.layer_norm_first
        self.alpha = cfg.deep_norm_alpha

    def forward(self, x: Tensor, position_bias: Tensor | None) -> Tensor:
        """(B, L, C) -> (B, L, C)."""
        if self.layer_norm_first:
            x = x + self.self_attn(self.self_attn_layer_norm(x), position_bias)
            return x + self.fc2(self.activation(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x * self.alpha + self.self_attn(x, position_bias))
        return self.final_layer_norm(x * self.alpha + self.fc2(self.activation(self.fc1(x))))


class _Encoder(nn.Module):
    """Convolutional positional embedding, then the transformer layers (`TransformerEncoder`)."""

    def __init__(self, cfg: BeatsConfig) -> None:
        super().__init__()
        dim = cfg.encoder_embed_dim
        # A one-element list only so the conv's parameters keep the original name `encoder.pos_conv.0.*`
        # (the original wraps it as Sequential(conv, SamePad, GELU), whose last two have no parameters).
        self.pos_conv = nn.ModuleList([_WeightNormConv1d(dim, cfg.conv_pos, cfg.conv_pos_groups)])
        self.pos_conv_drop_last = cfg.conv_pos % 2 == 0  # SamePad: padding K//2 yields one extra step
        self.layers = nn.ModuleList(
            [
                _EncoderLayer(cfg, has_bias_table=cfg.relative_position_embedding and i == 0)
                for i in range(cfg.encoder_layers)
            ]
        )
        self.layer_norm = nn.LayerNorm(dim)
        self.cfg = cfg

    def _position_bias(self, batch: int, length: int) -> Tensor | None:
        """Layer 0's relative position bias, shared by every layer: (B*H, L, L)."""
        if not self.cfg.relative_position_embedding:
            return None
        table = self.layers[0].self_attn.relative_attention_bias
        buckets = relative_position_buckets(length, self.cfg.num_buckets, self.cfg.max_distance)
        bias = table(buckets.to(table.weight.device)).permute(2, 0, 1)  # (L, L, H) -> (H, L, L)
        return bias.unsqueeze(0).repeat(batch, 1, 1, 1).view(-1, length, length)

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, C) -> (B, L, C)."""
        conv = self.pos_conv[0](x.transpose(1, 2))  # (B, C, L + 1 if K even)
        if self.pos_conv_drop_last:
            conv = conv[:, :, :-1]
        x = x + F.gelu(conv).transpose(1, 2)  # (B, L, C)
        if not self.cfg.layer_norm_first:
            x = self.layer_norm(x)
        # The original computes the bias in layer 0 and passes the same (ungated) tensor on to the others.
        position_bias = self._position_bias(x.shape[0], x.shape[1])
        for layer in self.layers:
            x = layer(x, position_bias)
        if self.cfg.layer_norm_first:
            x = self.layer_norm(x)
        return x


class BEATs(nn.Module):
    """BEATs feature extractor: normalised fbank (B, F, 128) -> tokens (B, 8 * (F // 16), D) for 16x16 patches."""

    def __init__(self, cfg: BeatsConfig) -> None:
        super().__init__()
        self.cfg = cfg
        patch = cfg.input_patch_size
        self.patch_embedding = nn.Conv2d(1, cfg.embed_dim, kernel_size=patch, stride=patch, bias=cfg.conv_bias)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.post_extract_proj = (
            nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim) if cfg.embed_dim != cfg.encoder_embed_dim else None
        )
        self.encoder = _Encoder(cfg)

    def forward(self, fbank: Tensor) -> Tensor:
        """Encode a normalised filter bank (B, F, 128) into (B, Tb, D) tokens, time-patch-major.

        Trailing F % patch frames are dropped by the strided patch convolution. Needs F >= patch size.
        """
        if fbank.dim() != 3 or fbank.shape[1] < self.cfg.input_patch_size:
            raise ValueError(f"expected fbank (B, F >= {self.cfg.input_patch_size}, bins), got {tuple(fbank.shape)}")
        x = self.patch_embedding(fbank.unsqueeze(1))  # (B, 1, F, 128) -> (B, E, F // p, 128 // p)
        x = x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)  # (B, Tb, E)
        x = self.layer_norm(x)
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)  # (B, Tb, D)
        return self.encoder(x)


def _checked_state_dict(model: BEATs, state_dict: dict) -> dict[str, Tensor]:
    """The entries of `state_dict` that `model` loads, after validating every key and shape.

    Ignored: `predictor.weight/bias` (the unused classifier head) and the copies of the shared relative
    position table under layers >= 1, which must equal layer 0's (the original ties them; loading unequal
    copies there would silently keep the last one, so we refuse).
    """
    expected = model.state_dict()
    tables = {_RELATIVE_BIAS_KEY.format(i) for i in range(1, model.cfg.encoder_layers)}
    if not model.cfg.relative_position_embedding:
        tables = set()
    kept: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key in _PREDICTOR_KEYS or key in tables:
            continue
        if key not in expected:
            raise UnexpectedKeyError("BEATs checkpoint has a key the model does not have", key=key)
        if not isinstance(value, Tensor):
            raise CheckpointError(f"BEATs checkpoint entry is a {type(value).__name__}, not a tensor", key=key)
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ShapeMismatchError(
                f"BEATs checkpoint shape {tuple(value.shape)} != expected {tuple(expected[key].shape)}", key=key
            )
        kept[key] = value
    for key in expected:
        if key not in kept:
            raise MissingKeyError("BEATs checkpoint lacks a key the model needs", key=key)
    table0 = kept.get(_RELATIVE_BIAS_KEY.format(0))
    for key in sorted(tables & state_dict.keys()):
        copy = state_dict[key]
        if not isinstance(copy, Tensor) or tuple(copy.shape) != tuple(table0.shape):
            raise ShapeMismatchError("BEATs relative position table copy differs in shape from layer 0's", key=key)
        if not torch.equal(copy.to(table0.dtype), table0):
            raise CheckpointError("BEATs relative position table copy differs from layer 0's (they are tied)", key=key)
    return kept


def build_beats(cfg: dict, state_dict: dict) -> BEATs:
    """Build BEATs from a checkpoint's `cfg` and `model` entries and load the weights strictly, in eval mode.

    Raises MissingKeyError / UnexpectedKeyError / ShapeMismatchError naming the offending key.
    """
    if not isinstance(cfg, dict) or not isinstance(state_dict, dict):
        raise CheckpointError("BEATs checkpoint must hold a 'cfg' dict and a 'model' state dict")
    model = BEATs(BeatsConfig.from_dict(cfg))
    model.load_state_dict(_checked_state_dict(model, state_dict), strict=True)
    return model.eval()
