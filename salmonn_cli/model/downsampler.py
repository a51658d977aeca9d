"""SpeechVerse's connector: a learned weighted sum over the encoder's hidden states (or the last one), then
convolution blocks (Conv1d, kernel 3, a stride each, LayerNorm) into the LLM's width.

Two blocks of stride 2 take 50 Hz encoder frames to the paper's 12.5 Hz: 375 tokens per 30 s window.
"""

from __future__ import annotations

import torch
from torch import nn


class LayerWeightedSum(nn.Module):
    """`sum_l softmax(w)_l * h_l` over S hidden states: (S, B, T, D) -> (B, T, D). Zero weights start as the mean."""

    def __init__(self, states: int) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(states))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        mix = torch.softmax(self.weights.float(), dim=0).to(states.dtype)
        return torch.einsum("s,sbtd->btd", mix, states)


class ConvBlock(nn.Module):
    """Conv1d over time (padding keeps ceil(T / stride) frames) then LayerNorm over channels."""

    def __init__(self, width_in: int, width_out: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(width_in, width_out, kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(width_out)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        out = self.conv(frames.transpose(1, 2)).transpose(1, 2)  # (B, T, C) -> (B, C, T) -> (B, T', C')
        return self.norm(out)


class Downsampler(nn.Module):
    """Encoder hidden states (S, B, T, D) -> audio tokens (B, T / prod(strides), D_llm)."""

    def __init__(self, states: int, width: int, llm_width: int, *, weighted: bool, kernel: int,
                 strides: tuple[int, ...]) -> None:  # fmt: skip
        super().__init__()
        self.layer_weights = LayerWeightedSum(states) if weighted else None
        widths = [width] + [llm_width] * len(strides)  # every block outputs the LLM width, as the paper's
        self.blocks = nn.ModuleList(
            ConvBlock(widths[i], widths[i + 1], kernel, stride) for i, stride in enumerate(strides)
        )

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        dtype = self.blocks[0].conv.weight.dtype
        frames = self.layer_weights(states.to(dtype)) if self.layer_weights is not None else states[-1].to(dtype)
        for block in self.blocks:
            frames = block(frames)
        return frames

    def conv_parameters(self) -> dict[str, nn.Parameter]:
        """The convolution blocks' parameters (the "connector" part; `layer_weights` is its own part)."""
        return {f"blocks.{name}": p for name, p in self.blocks.named_parameters()}
