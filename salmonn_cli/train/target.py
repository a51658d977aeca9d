"""The `TrainingTarget` of a composed model: any of the conv blocks (`connector`), the layer weights
(`layer_weights`) and LoRA (`lora`); the encoder and the LLM's own weights frozen.

The encoder is frozen, so its hidden states are computed once per audio file and kept in host memory, up to a
budget (past it they are recomputed: the same numbers, more time).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import prompt as prompts
from ..audio import load_audio
from ..errors import UsageError
from ..finetune.data import FewShotExample
from ..finetune.target import enable_checkpointing, padded_causal_loss
from ..llm import decoding_lora_dtype, input_embeddings, lora_tensors, scaled_lora, set_lora_dtype

CACHE_BYTES = 2 * 1024**3  # encoder states kept in host memory (a 30 s window of WavLM-Large, 25 layers: 150 MB)


class ComposedTraining:
    def __init__(self, model, parts: tuple[str, ...], *, lora_dropout: float, max_text_tokens: int) -> None:
        if "layer_weights" in parts and model.connector.layer_weights is None:
            raise UsageError("layer_weights are trained only with a weighted sum of layers")
        self.model, self.parts = model, tuple(parts)
        self.lora_dropout, self.max_text_tokens = lora_dropout, max_text_tokens
        self.device = model.device
        self.float16 = self.device.type == "cuda" and input_embeddings(model.llm).weight.dtype == torch.float16
        self._cache: dict[Path, torch.Tensor] = {}
        self._cached_bytes = 0

    def prepare(self) -> dict[str, nn.Parameter]:
        model = self.model
        model.requires_grad_(False)
        params: dict[str, nn.Parameter] = {}
        if "connector" in self.parts:
            params.update({f"connector.{k}": p for k, p in model.connector.conv_parameters().items()})
        if "layer_weights" in self.parts:
            params["connector.layer_weights.weights"] = model.connector.layer_weights.weights
        if "lora" in self.parts:
            set_lora_dtype(model.llm, torch.float32)  # float32 master weights, as peft trains them
            lora = set(lora_tensors(model.llm))
            params.update({f"llm.{k}": p for k, p in model.llm.named_parameters() if k in lora})
        for p in params.values():
            p.requires_grad_(True)
        for name, module in model.llm.named_modules():
            if isinstance(module, nn.Dropout) and ".lora_dropout." in f".{name}.":
                module.p = self.lora_dropout
        if "lora" in self.parts:
            enable_checkpointing(model.llm, True)
        return params

    def train_mode(self) -> None:
        """Dropout only where something is trained: LoRA's (the base LLM's own dropout stays off: it is frozen)."""
        self.model.eval()
        self.model.connector.train()
        if "lora" in self.parts:
            for name, module in self.model.llm.named_modules():
                if ".lora_dropout." in f".{name}.":
                    module.train()

    def eval_mode(self) -> None:
        self.model.eval()

    def release(self) -> None:
        self.model.requires_grad_(False)
        if "lora" in self.parts:
            enable_checkpointing(self.model.llm, False)
            decoding_lora_dtype(self.model.llm)
        self.model.eval()

    def _states(self, example: FewShotExample) -> torch.Tensor:
        """The encoder's hidden states of an example's audio (S, 1, T, D), on the device."""
        cached = self._cache.get(example.audio)
        if cached is None:
            states = self.model.encode(load_audio(example.audio))
            size = states.numel() * states.element_size()
            if self._cached_bytes + size > CACHE_BYTES:
                return states
            cached = self._cache[example.audio] = states.cpu()
            self._cached_bytes += size
        return cached.to(self.device)

    def batch_loss(self, examples) -> tuple[torch.Tensor, int, int]:
        model = self.model
        table = input_embeddings(model.llm)
        rows = []
        for ex in examples:
            tokens = model.connector(self._states(ex))  # (1, N, D): grad flows into what is trained
            ids = model.prompt_ids(ex.instruction)
            pieces = [prompts.embed_ids(table, ids.before, self.device), tokens,
                      prompts.embed_ids(table, ids.after, self.device)]  # fmt: skip
            answer = tuple(model.tokenizer.encode(ex.response))[: self.max_text_tokens - 1]
            answer += (model.tokenizer.eos_token_id,)
            rows.append((model.assemble(pieces), answer))
        if model.settings.seq2seq:
            return self._seq2seq_loss(rows)
        return padded_causal_loss(model.llm, [self._causal_row(table, p, a) for p, a in rows], None)

    def _causal_row(self, table, prompt: torch.Tensor, answer: tuple[int, ...]):
        """(prompt + answer embeddings (1, T, D), labels (1, T) with the prompt masked)."""
        embeds = torch.cat([prompt, prompts.embed_ids(table, answer, self.device)], dim=1)
        labels = torch.full((1, embeds.shape[1]), prompts.IGNORE_INDEX, dtype=torch.long, device=self.device)
        labels[0, prompt.shape[1] :] = torch.tensor(answer, dtype=torch.long)
        return embeds, labels

    def _seq2seq_loss(self, rows) -> tuple[torch.Tensor, int, int]:
        """T5: the prompts (right-padded, masked) into the encoder; the answers, as labels, teach the decoder."""
        length = max(p.shape[1] for p, _ in rows)
        answer_length = max(len(a) for _, a in rows)
        embeds = torch.cat([nn.functional.pad(p, (0, 0, 0, length - p.shape[1])) for p, _ in rows])
        mask = torch.cat([(torch.arange(length) < p.shape[1])[None] for p, _ in rows]).long().to(self.device)
        labels = torch.tensor([list(a) + [prompts.IGNORE_INDEX] * (answer_length - len(a)) for _, a in rows],
                              dtype=torch.long, device=self.device)  # fmt: skip
        with scaled_lora(self.model.llm, None):
            out = self.model.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False)
        answered = int((labels != prompts.IGNORE_INDEX).sum())
        return out.loss, int(embeds.shape[0] * (length + answer_length)), answered
