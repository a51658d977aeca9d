"""What a training run trains: a `TrainingTarget` says which parameters are trained, sets train / eval modes and
computes a batch's loss; `Trainer` (train.py) owns everything else (optimiser, schedule, steps, state, ranks).

`SalmonnTraining` is the SALMONN model's target: LoRA and/or the Q-Former connector, the encoders frozen and their
outputs computed once per file. salmonn_cli.train has the target of its composed models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from .. import prompt as prompts
from ..audio import load_audio
from ..checkpoint import original_lora_key
from ..errors import UsageError
from ..llm import decoding_lora_dtype, input_embeddings, scaled_lora, set_lora_dtype
from .data import FewShotExample


class TrainingTarget(Protocol):
    """The model side of a run."""

    device: torch.device
    float16: bool  # the trained math runs in float16 (CUDA): the loss needs scaling

    def prepare(self) -> dict[str, nn.Parameter]:
        """Freeze everything, un-freeze what is trained and return it by a stable name (the state's keys)."""

    def train_mode(self) -> None:
        """Training mode (dropout) on the trained parts only."""

    def eval_mode(self) -> None:
        """Everything in eval mode (for validation losses)."""

    def release(self) -> None:
        """Hand the model back as it was loaded: eval mode, nothing requiring grad."""

    def batch_loss(self, examples: list[FewShotExample]) -> tuple[torch.Tensor, int, int]:
        """(mean loss over the answers' tokens, positions run, answer tokens the mean is over)."""


def padded_causal_loss(llm: nn.Module, rows, lora_scale: float | None) -> tuple[torch.Tensor, int, int]:
    """A causal LM's mean next-token loss over rows of (inputs_embeds (1, T_i, D), labels (1, T_i)), right-padded
    to the longest; one row runs unpadded (exactly a single example's computation)."""
    if len(rows) == 1:
        embeds, labels = rows[0]
        mask = None
    else:
        length = max(e.shape[1] for e, _ in rows)
        embeds = torch.cat([nn.functional.pad(e, (0, 0, 0, length - e.shape[1])) for e, _ in rows])
        ignored = prompts.IGNORE_INDEX
        labels = torch.cat([nn.functional.pad(lab, (0, length - lab.shape[1]), value=ignored) for _, lab in rows])
        mask = torch.cat([(torch.arange(length) < e.shape[1])[None] for e, _ in rows]).long().to(embeds.device)
    with scaled_lora(llm, lora_scale):
        out = llm(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False)
    answered = int((labels[:, 1:] != prompts.IGNORE_INDEX).sum())  # the positions the shifted loss averages
    return out.loss, int(embeds.shape[0] * embeds.shape[1]), answered


def enable_checkpointing(llm: nn.Module, on: bool) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them (memory for time).
    Non-reentrant checkpointing needs no `enable_input_require_grads` and keeps dropout masks (it restores RNG)."""
    if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.x; the old names warn
        if on:
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            llm.activation_checkpointing_disable()
    elif on:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        llm.gradient_checkpointing_disable()


class SalmonnTraining:
    """A `SalmonnModel`'s target: the LoRA matrices (`lora`) and/or the connector (`connector`: Q-Former, query
    tokens, LayerNorms, projection), with the encoders frozen in eval mode and gradient checkpointing on the LLM."""

    def __init__(
        self,
        model,
        *,
        connector: bool,
        lora: bool = True,
        lora_dropout: float = 0.1,
        lora_scale: float | None = None,
        max_text_tokens: int = prompts.MAX_TARGET_TOKENS,
    ) -> None:
        if not (connector or lora):
            raise UsageError("nothing to train: name the connector, LoRA or both")
        self.model, self.connector, self.lora = model, connector, lora
        self.lora_dropout, self.lora_scale, self.max_text_tokens = lora_dropout, lora_scale, max_text_tokens
        self.device = model.device
        # fp16 LLM math on CUDA needs loss scaling for its gradients; float32 (CPU) and bfloat16 do not
        self.float16 = self.device.type == "cuda" and input_embeddings(model.llm).weight.dtype == torch.float16
        self._connector_dtype = model.connector.query_tokens.dtype
        self._cache: dict[Path, object] = {}  # audio file -> encoder outputs, or audio tokens

    def prepare(self) -> dict[str, nn.Parameter]:
        model = self.model
        model.requires_grad_(False)
        params: dict[str, nn.Parameter] = {}
        if self.lora:
            set_lora_dtype(model.llm, torch.float32)  # float32 master weights, as peft trains them
            params = {f"llm.{n}": p for n, p in model.llm.named_parameters() if original_lora_key(n)}
            if not params:
                raise UsageError("the model has no LoRA weights to train")
        if self.connector:
            model.connector.float()  # float32 master weights: Adam updates vanish in float16
            params.update({f"connector.{n}": p for n, p in model.connector.named_parameters()})
        for p in params.values():
            p.requires_grad_(True)
        for module in model.llm.modules():  # LLaMA has no dropout modules of its own: these are LoRA's
            if isinstance(module, nn.Dropout):
                module.p = self.lora_dropout
        enable_checkpointing(model.llm, True)
        return params

    def train_mode(self) -> None:
        """Only the trained parts in training mode (dropout); encoders, and a frozen connector, stay eval."""
        self.model.eval()
        self.model.llm.train(self.lora)
        self.model.connector.train(self.connector)

    def eval_mode(self) -> None:
        self.model.eval()

    def release(self) -> None:
        """The connector goes back to the encoders' dtype (SalmonnModel feeds the encoders in the connector's)."""
        self.model.requires_grad_(False)
        self.model.connector.to(self._connector_dtype)
        decoding_lora_dtype(self.model.llm)
        enable_checkpointing(self.model.llm, False)
        self.model.eval()

    def _audio_tokens(self, example: FewShotExample) -> torch.Tensor:
        """Audio tokens (1, N, D) of an example. The encoders are frozen, so their outputs are computed once per
        file and kept in host memory (a few MB each); so are the tokens themselves while the connector is frozen."""
        key, device = example.audio, self.model.device
        if key not in self._cache:
            waveform = load_audio(example.audio)
            with torch.no_grad():
                speech, audio = self.model.encode(waveform)  # (1, 1500, Dw), (1, Tb, Db)
                if self.connector:
                    self._cache[key] = (speech.cpu(), audio.cpu())
                else:
                    self._cache[key] = self.model.connector(speech, audio).cpu()  # (1, N, D)
        cached = self._cache[key]
        if not self.connector:
            return cached.to(device)
        dtype = self.model.connector.query_tokens.dtype  # float32 master weights, maybe float16 encoders
        return self.model.connector(cached[0].to(device, dtype), cached[1].to(device, dtype))

    def inputs(self, example: FewShotExample) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_embeds (1, T, D), labels (1, T)) of one example, as `SalmonnModel.training_inputs` builds them."""
        tokens = self._audio_tokens(example)
        targets = prompts.target_ids(self.model.tokenizer, example.response, self.max_text_tokens)
        table = input_embeddings(self.model.llm)
        ids = self.model.prompt_ids(example.instruction)
        return prompts.assemble_training(table, ids, tokens, self.model.tokenizer.bos_token_id, targets)

    def batch_loss(self, examples) -> tuple[torch.Tensor, int, int]:
        return padded_causal_loss(self.model.llm, [self.inputs(ex) for ex in examples], self.lora_scale)
