"""scripts/make_tiny_model.py writes tiny random SALMONN components in the original formats."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.reference import reference_dir

pytestmark = pytest.mark.slow  # three ~5 s subprocess runs

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_tiny_model.py"
COMPONENTS = ("whisper", "beats.pt", "llm", "salmonn.pth")
FILES = (
    "whisper/config.json",
    "whisper/preprocessor_config.json",
    "whisper/model.safetensors",
    "beats.pt",
    "salmonn.pth",
    "llm/config.json",
    "llm/generation_config.json",
    "llm/model.safetensors",
    "llm/tokenizer.model",
    "llm/tokenizer_config.json",
    "llm/special_tokens_map.json",
)


def run_script(out: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def load_pt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def all_tensors(root: Path) -> dict[str, torch.Tensor]:
    """Every tensor the script writes, keyed by file and name."""
    out = {}
    for sub in ("whisper", "llm"):
        out.update({f"{sub}/{k}": v for k, v in load_file(root / sub / "model.safetensors").items()})
    out.update({f"beats/{k}": v for k, v in load_pt(root / "beats.pt")["model"].items()})
    out.update({f"salmonn/{k}": v for k, v in load_pt(root / "salmonn.pth")["model"].items()})
    return out


def layerless(keys) -> set[str]:
    return {re.sub(r"\.\d+\.", ".N.", k) for k in keys}


@pytest.fixture(scope="module")
def ref() -> Path:
    return reference_dir() / "components" / "tiny_a"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("tiny") / "tiny"
    return out, run_script(out)


@pytest.fixture(scope="module")
def tiny(made) -> Path:
    return made[0]


def test_writes_every_file_and_one_summary_line_per_component(made):
    out, stdout = made
    missing = [f for f in FILES if not (out / f).is_file()]
    assert not missing
    lines = stdout.strip().splitlines()
    assert len(lines) == len(COMPONENTS)
    for line, name in zip(lines, COMPONENTS, strict=True):
        assert line.split()[0] == name and "KiB" in line


def test_whisper_loads_and_encodes_30s_to_1500_frames(tiny):
    from transformers import WhisperFeatureExtractor, WhisperModel

    model = WhisperModel.from_pretrained(tiny / "whisper").eval()
    assert model.config.d_model == 64 and model.config.max_source_positions == 1500
    with torch.no_grad():
        h = model.get_encoder()(torch.randn(1, 80, 3000)).last_hidden_state
    assert h.shape == (1, 1500, 64)
    assert torch.isfinite(h).all()
    fe = WhisperFeatureExtractor.from_pretrained(tiny / "whisper")
    assert fe.feature_size == 80 and fe.nb_max_frames == 3000


def test_llm_loads_in_float16_with_matching_vocab(tiny):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny / "llm").eval()
    tok = AutoTokenizer.from_pretrained(tiny / "llm")
    assert model.dtype == torch.float16
    assert model.config.vocab_size == len(tok)
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (1, 2, 0)
    assert (model.generation_config.bos_token_id, model.generation_config.eos_token_id) == (1, 2)
    ids = tok("USER: <Speech>", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids.to(model.device)).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("cls_name", ["AutoTokenizer", "LlamaTokenizer"])
def test_tokenizer_round_trips_and_matches_sentencepiece(tiny, cls_name):
    import sentencepiece as spm
    import transformers

    tok = getattr(transformers, cls_name).from_pretrained(tiny / "llm")
    sp = spm.SentencePieceProcessor(model_file=str(tiny / "llm" / "tokenizer.model"))
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert 900 <= len(tok) <= 1100
    for text in [
        "USER: <Speech><SpeechHere></Speech> Please transcribe the speech.\nASSISTANT:",
        "Hello  world 2023, ünïcödé 你好",
    ]:
        ids = tok(text).input_ids
        assert ids[0] == 1 and ids[-1] != 2
        assert ids[1:] == sp.encode(text)
        assert tok.decode(ids, skip_special_tokens=True) == text
    # Byte fallback + split digits, as in LLaMA's tokenizer.
    assert "<0xE4>" in tok.convert_ids_to_tokens(tok("你", add_special_tokens=False).input_ids)
    assert sp.encode("123", out_type=str)[-3:] == ["1", "2", "3"]


def test_tokenizer_uses_llama_trainer_settings(tiny):
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString((tiny / "llm" / "tokenizer.model").read_bytes())
    t, n = m.trainer_spec, m.normalizer_spec
    assert t.model_type == pb.TrainerSpec.BPE
    assert t.byte_fallback and t.split_digits and t.allow_whitespace_only_pieces
    assert (t.unk_id, t.bos_id, t.eos_id, t.pad_id) == (0, 1, 2, -1)
    assert [p.piece for p in m.pieces[:3]] == ["<unk>", "<s>", "</s>"]
    assert n.name == "identity" and n.add_dummy_prefix and not n.remove_extra_whitespaces


def test_beats_checkpoint_matches_reference_layout(tiny, ref):
    got, want = load_pt(tiny / "beats.pt"), load_pt(ref / "beats.pt")
    assert set(got) == {"cfg", "model"}
    assert list(got["cfg"]) == list(want["cfg"])
    assert list(got["model"]) == list(want["model"])  # same keys, same order
    cfg, sd = got["cfg"], got["model"]
    d, h, k = cfg["encoder_embed_dim"], cfg["encoder_attention_heads"], cfg["conv_pos"]
    assert sd["patch_embedding.weight"].shape == (cfg["embed_dim"], 1, 16, 16)
    assert sd["encoder.pos_conv.0.weight_g"].shape == (1, 1, k)
    assert sd["encoder.pos_conv.0.weight_v"].shape == (d, d // cfg["conv_pos_groups"], k)
    assert sd["predictor.weight"].shape == (cfg["predictor_class"], d)
    table = sd["encoder.layers.0.self_attn.relative_attention_bias.weight"]
    assert table.shape == (cfg["num_buckets"], h)
    for i in range(cfg["encoder_layers"]):
        assert sd[f"encoder.layers.{i}.self_attn.grep_linear.weight"].shape == (8, d // h)
        assert sd[f"encoder.layers.{i}.self_attn.grep_a"].shape == (1, h, 1, 1)
        assert torch.equal(sd[f"encoder.layers.{i}.self_attn.relative_attention_bias.weight"], table)
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in sd.values())


def test_salmonn_checkpoint_matches_reference_key_structure(tiny, ref):
    got = load_pt(tiny / "salmonn.pth")
    want = load_pt(ref / "salmonn.pth")
    assert set(got) == {"model"}
    sd = got["model"]
    assert layerless(sd) == layerless(want["model"])
    enc_width = 64 + load_pt(tiny / "beats.pt")["cfg"]["encoder_embed_dim"]
    assert sd["speech_query_tokens"].shape == (1, 1, 64)
    assert sd["speech_Qformer.bert.encoder.layer.1.crossattention.self.key.weight"].shape == (64, enc_width)
    assert sd["speech_llama_proj.weight"].shape == (64, 64)
    assert sd["speech_Qformer.bert.embeddings.position_ids"].dtype == torch.int64


def test_salmonn_lora_b_is_nonzero_and_beats_copies_match(tiny):
    sd = load_pt(tiny / "salmonn.pth")["model"]
    beats = load_pt(tiny / "beats.pt")["model"]
    lora_b = [k for k in sd if ".lora_B." in k]
    assert len(lora_b) == 4  # 2 LLM layers x (q_proj, v_proj)
    for k in lora_b:
        assert sd[k].shape == (64, 8) and sd[k].abs().min() > 0, k
    copies = [k for k in sd if k.startswith("beats.")]
    assert copies
    for k in copies:
        assert torch.equal(sd[k], beats[k.removeprefix("beats.")]), k
    floats = [v for v in sd.values() if v.is_floating_point()]
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in floats)


def test_same_seed_gives_identical_tensors(tiny, tmp_path):
    again = tmp_path / "again"
    run_script(again, "--seed", "0")
    a, b = all_tensors(tiny), all_tensors(again)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different
    assert (tiny / "llm" / "tokenizer.model").read_bytes() == (again / "llm" / "tokenizer.model").read_bytes()


def test_options_change_sizes_and_seed_changes_values(tiny, tmp_path):
    out = tmp_path / "variant"
    run_script(out, "--seed", "7", "--qformer-layers", "1", "--query-tokens", "3", "--lora-rank", "4")
    sd = load_pt(out / "salmonn.pth")["model"]
    assert sd["speech_query_tokens"].shape == (1, 3, 64)
    assert not any(k.startswith("speech_Qformer.bert.encoder.layer.1.") for k in sd)
    assert "speech_Qformer.bert.encoder.layer.0.output_query.dense.weight" in sd
    lora_a = "llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert sd[lora_a].shape == (4, 64)
    base, variant = all_tensors(tiny), all_tensors(out)
    for key in (
        "whisper/encoder.conv1.weight",
        "beats/predictor.weight",
        "llm/lm_head.weight",
        "salmonn/speech_llama_proj.weight",
    ):
        assert base[key].shape == variant[key].shape and not torch.equal(base[key], variant[key]), key


def test_model_file_names_the_components_with_matching_settings_and_sizes(tiny):
    from salmonn_cli.hub import resolve_components
    from salmonn_cli.model_file import load_model_spec

    spec = load_model_spec(str(tiny / "model.toml"))
    assert spec.name == "tiny" and spec.file == (tiny / "model.toml").resolve()
    paths = resolve_components(spec, offline=True)  # local paths only: no cache, no network
    assert (paths.whisper, paths.beats, paths.llm, paths.checkpoint) == tuple(
        (tiny / name).resolve() for name in COMPONENTS
    )
    sd = load_pt(tiny / "salmonn.pth")["model"]
    hidden = sd["speech_query_tokens"].shape[-1]
    assert spec.settings.qformer_heads == 4 and hidden % spec.settings.qformer_heads == 0
    assert spec.settings.lora_scale == 4.0 and spec.settings.prompt_template == "USER: {}\nASSISTANT:"
    tensors = all_tensors(tiny)

    def count(prefix) -> int:
        return sum(v.numel() for k, v in tensors.items() if k.startswith(prefix))

    assert spec.sizes.llm_params == count("llm/")
    assert spec.sizes.whisper_encoder_params == count("whisper/encoder.")
    assert spec.sizes.beats_params == count("beats/")
    connector = ("salmonn/speech_", "salmonn/ln_")
    assert spec.sizes.connector_params == count(connector) - sd["speech_Qformer.bert.embeddings.position_ids"].numel()
