"""The window-level Q-Former connector: the one owner of the window size in encoder frames.

Whisper frames (B, 1500, Dw) and BEATs frames (B, Tb, Db) are LayerNormed, zero-padded to one length,
concatenated per frame and cut into windows of K frames every S frames; each window is read by the same
learned queries through a BERT-style Q-Former (cross-attention in every layer), projected to the LLM width.
transformers' Blip2QFormerModel has exactly the original's structure; only key names differ (checkpoint.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import ConnectorShape
from ..errors import UsageError
from ..window import WHISPER_FRAMES_PER_WINDOW, WINDOW_SECONDS


def window_frames(seconds: float) -> int:
    """Encoder frames in `seconds`, rounded as the original does (Python's round: half to even)."""
    return round(WHISPER_FRAMES_PER_WINDOW * seconds / WINDOW_SECONDS)


@dataclass(frozen=True)
class WindowSpec:
    """Window length and hop in encoder frames (17 and 17 for the published third of a second)."""

    kernel: int
    stride: int

    @classmethod
    def from_seconds(cls, second_per_window: float, second_stride: float) -> "WindowSpec":
        spec = cls(window_frames(second_per_window), window_frames(second_stride))
        if spec.kernel < 1 or spec.stride < 1:
            raise UsageError(f"windows of {second_per_window} s every {second_stride} s are under one encoder frame")
        return spec


class SpeechConnector(nn.Module):
    """Encoder frames -> audio tokens for the LLM: `forward(speech, audio) -> (B, L*Q, D_llm)`."""

    def __init__(self, shape: ConnectorShape, windows: WindowSpec, num_heads: int) -> None:
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        if shape.hidden % num_heads:
            raise UsageError(f"Q-Former width {shape.hidden} is not divisible by {num_heads} attention heads")
        self.windows = windows
        self.ln_speech = nn.LayerNorm(shape.speech_width)
        self.ln_audio = nn.LayerNorm(shape.audio_width)
        self.query_tokens = nn.Parameter(torch.zeros(1, shape.query_tokens, shape.hidden))
        config = Blip2QFormerConfig(
            hidden_size=shape.hidden,
            num_hidden_layers=shape.layers,
            num_attention_heads=num_heads,
            intermediate_size=shape.intermediate,
            hidden_act="gelu",  # BERT's erf GELU
            layer_norm_eps=1e-12,  # bert-base-uncased's value, which the original keeps
            cross_attention_frequency=shape.cross_attention_every,
            encoder_hidden_size=shape.encoder_width,
            use_qformer_text_input=False,  # SALMONN deletes the text-side feed-forward
        )
        self.qformer = Blip2QFormerModel(config)
        self.proj = nn.Linear(shape.hidden, shape.llm_hidden)

    def fuse(self, speech: torch.Tensor, audio: torch.Tensor | None) -> torch.Tensor:
        """LayerNorm each stream, zero-pad the shorter, concatenate per frame: (B, T, Dw + Db)."""
        speech = self.ln_speech(speech)  # (B, Ts, Dw)
        if audio is None:
            return speech
        audio = self.ln_audio(audio)  # (B, Tb, Db); normed BEFORE padding, so padded frames are exactly 0
        frames = max(speech.shape[1], audio.shape[1])
        speech = F.pad(speech, (0, 0, 0, frames - speech.shape[1]))
        audio = F.pad(audio, (0, 0, 0, frames - audio.shape[1]))
        return torch.cat([speech, audio], dim=-1)  # (B, T, C)

    def qformer_states(self, speech: torch.Tensor, audio: torch.Tensor | None) -> torch.Tensor:
        """Q-Former output per window: (B*L, Q, H), windows in time order."""
        return self._read_windows(self.fuse(speech, audio))

    def forward(self, speech: torch.Tensor, audio: torch.Tensor | None) -> torch.Tensor:
        """Audio tokens (B, L*Q, D_llm), window-major: all Q tokens of window 0, then window 1, ..."""
        return self._tokens(self.fuse(speech, audio))

    def forward_batch(self, speech: torch.Tensor, audio: list[torch.Tensor]) -> torch.Tensor:
        """`forward` for clips whose BEATs lengths differ: speech (B, Ts, Dw), audio[i] (1, Tb_i, Db) -> (B, N, D).

        `fuse` LayerNorms each stream BEFORE zero-padding it, so padded frames are exactly 0; zero-padding BEATs
        outputs to one length first would LayerNorm the padding into non-zero frames. So each clip is fused on its
        own (to max(1500, Tb) = 1500 frames for <= 30 s), and the windows, Q-Former and projection run on the stack.
        """
        fused = [self.fuse(speech[i : i + 1], frames) for i, frames in enumerate(audio)]
        if len({f.shape[1] for f in fused}) != 1:
            raise ValueError(f"clips fuse to different frame counts {sorted({f.shape[1] for f in fused})}")
        return self._tokens(torch.cat(fused))

    def _tokens(self, fused: torch.Tensor) -> torch.Tensor:
        """Fused frames (B, T, C) -> audio tokens (B, L*Q, D_llm)."""
        tokens = self.proj(self._read_windows(fused))  # (B*L, Q, D)
        return tokens.reshape(fused.shape[0], -1, tokens.shape[-1])

    def _read_windows(self, fused: torch.Tensor) -> torch.Tensor:
        """Fused frames (B, T, C) cut into windows, each read by the queries: (B*L, Q, H)."""
        frames, channels = fused.shape[1], fused.shape[2]
        k, s = self.windows.kernel, self.windows.stride
        if frames < k:
            raise ValueError(f"{frames} encoder frames are fewer than one window of {k}")
        # (B, L, C, K) -> (B, L, K, C) -> (B*L, K, C); trailing frames that do not fill a window are dropped
        windows = fused.unfold(1, k, s).permute(0, 1, 3, 2).reshape(-1, k, channels)
        queries = self.query_tokens.expand(windows.shape[0], -1, -1)  # (B*L, Q, H)
        return self.qformer(query_embeds=queries, encoder_hidden_states=windows).last_hidden_state
