"""The SALMONN recipe's model: the published architecture (Whisper + BEATs + window Q-Former + a causal LLM with
LoRA), so every stage's result is a SALMONN checkpoint (`salmonn.pth`, the original key names) and a model file
in the published format that `load_model` and every command read as they read the released models.

Stage one starts from a fresh checkpoint written here: the Q-Former initialised as BERT (normal, std 0.02, as
transformers and the original do), the query tokens normal(0, 0.02) as the original's `init_speech_Qformer`, the
projection and LayerNorms as PyTorch makes them, and LoRA as peft initialises it (A Kaiming-uniform, B zero).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..atomic import write_atomically
from ..errors import UsageError
from ..loading import BERT_HEAD_WIDTH
from .recipe import TrainRecipe

QFORMER_FFN_RATIO = 4  # BERT's intermediate width: 3072 for the published 768
INIT_STD = 0.02  # BERT's initializer_range, the original's query-token std
_LORA_SHAPES = {  # (in, out) of each attention projection LoRA may wrap, from the LLM's config
    "q_proj": lambda c: (c.hidden_size, c.num_attention_heads * _head_dim(c)),
    "k_proj": lambda c: (c.hidden_size, _kv_heads(c) * _head_dim(c)),
    "v_proj": lambda c: (c.hidden_size, _kv_heads(c) * _head_dim(c)),
    "o_proj": lambda c: (c.num_attention_heads * _head_dim(c), c.hidden_size),
}


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def write_initial_checkpoint(recipe: TrainRecipe, whisper: Path, beats: Path, llm: Path, out: Path) -> Path:
    """A fresh SALMONN checkpoint for the recipe's shapes and these components, seeded by the recipe."""
    import torch
    from transformers import WhisperConfig

    from ..checkpoint import ConnectorShape, read_beats_checkpoint, salmonn_state_dict
    from ..llm import ADAPTER, is_encoder_decoder, read_llm_config
    from ..model.qformer import SpeechConnector, WindowSpec

    if is_encoder_decoder(llm):
        raise UsageError("the SALMONN recipe's result is a SALMONN checkpoint, which needs a decoder-only LLM"
                         " (an encoder-decoder one like T5 trains with the conv connector)")  # fmt: skip
    c, lora = recipe.connector, recipe.lora
    targets = lora.targets_for(False)
    unknown = [t for t in targets if t not in _LORA_SHAPES]
    if unknown:
        raise UsageError(f"the SALMONN recipe's LoRA wraps attention projections ({', '.join(_LORA_SHAPES)}),"
                         f" not {', '.join(unknown)}")  # fmt: skip
    speech_width = WhisperConfig.from_pretrained(str(whisper)).d_model
    audio_width = read_beats_checkpoint(beats)[0]["encoder_embed_dim"]
    config = read_llm_config(llm)
    shape = ConnectorShape(
        query_tokens=c.queries, hidden=c.qformer_hidden, layers=c.qformer_layers,
        intermediate=QFORMER_FFN_RATIO * c.qformer_hidden, encoder_width=speech_width + audio_width,
        cross_attention_every=1, speech_width=speech_width, audio_width=audio_width, llm_hidden=config.hidden_size,
    )  # fmt: skip
    torch.manual_seed(recipe.seed)
    windows = WindowSpec.from_seconds(c.window_seconds, c.window_seconds)
    connector = SpeechConnector(shape, windows, max(1, c.qformer_hidden // BERT_HEAD_WIDTH))
    with torch.no_grad():
        connector.query_tokens.normal_(0.0, INIT_STD)
    adapters = {}
    for layer in range(config.num_hidden_layers):
        for target in targets:
            width_in, width_out = _LORA_SHAPES[target](config)
            a = torch.empty(lora.rank, width_in)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # peft's init of lora_A; lora_B starts at zero
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            adapters[f"{prefix}.lora_A.{ADAPTER}.weight"] = a
            adapters[f"{prefix}.lora_B.{ADAPTER}.weight"] = torch.zeros(width_out, lora.rank)
    state = salmonn_state_dict({k: v.detach().clone() for k, v in connector.state_dict().items()}, adapters)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, lambda tmp: torch.save({"model": state}, tmp))
    return out


def write_salmonn_model_file(folder: Path, name: str, description: str, model, *, whisper: Path, beats: Path,
                             llm: Path, checkpoint: Path, recipe: TrainRecipe) -> Path:  # fmt: skip
    """`folder/model.toml` in the published format: the four components where they are, the settings the
    checkpoint was trained with and the parameter counts of the loaded model."""
    from ..llm import lora_tensors

    lora = set(lora_tensors(model.llm))
    llm_params = sum(p.numel() for n, p in model.llm.named_parameters() if n not in lora)
    settings = {
        "second_per_window": recipe.connector.window_seconds,
        "second_stride": recipe.connector.window_seconds,
        "qformer_heads": max(1, recipe.connector.qformer_hidden // BERT_HEAD_WIDTH),
        "lora_scale": recipe.lora.scale,
        "prompt_template": model.settings.prompt_template,
    }
    sizes = {
        "llm_params": llm_params,
        "whisper_encoder_params": sum(p.numel() for p in model.whisper.parameters()),
        "beats_params": sum(p.numel() for p in model.beats.parameters()),
        "connector_params": sum(p.numel() for p in model.connector.parameters()),
    }
    lines = [
        f"# written by `salmonn train`: run it with `salmonn ask --model {folder / 'model.toml'} clip.wav`",
        f"name = {json.dumps(name)}",
        f"description = {json.dumps(description)}",
        "",
        *(f"{role} = {{ path = {json.dumps(str(path))} }}"
          for role, path in (("whisper", whisper), ("beats", beats), ("llm", llm), ("checkpoint", checkpoint))),
        "",
        "[settings]",
        *(f"{k} = {json.dumps(v)}" for k, v in settings.items()),  # a JSON string/number is valid TOML here
        "",
        "[sizes]",
        *(f"{k} = {v}" for k, v in sizes.items()),
        "",
    ]  # fmt: skip
    path = folder / "model.toml"
    write_atomically(path, lambda tmp: Path(tmp).write_text("\n".join(lines), encoding="utf-8"))
    return path
