"""CUDA: parity, half precision, every 4/8-bit backend, the captured step, QLoRA and the CLI (`pytest -m gpu`).

Collected always; without a CUDA device (or without the backend a test needs) each test is skipped with its reason,
which `-ra` prints. `scripts/gpu_check.sh` runs this file first on a GPU machine.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

NO_CUDA = "needs a CUDA device (torch.cuda.is_available() is False)"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]

ROOT = Path(__file__).resolve().parents[1]
CUDA = "cuda"


def needs(module: str):
    """Skip (with the reason) unless `module` is importable."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"needs the {module} package")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


# -- reference parity on CUDA ------------------------------------------------------------------------------------
def _reference_cases():
    from tests.reference import case_paths

    return case_paths()


@pytest.mark.parametrize("json_path", _reference_cases(), ids=[p.stem for p in _reference_cases()])
def test_reference_ids_on_cuda_in_float32_through_the_captured_step(json_path):
    """The reference LM on the GPU in fp32: greedy, beam and LoRA 2/0 ids identical to the original's."""
    from salmonn_cli.engine import engine_for
    from salmonn_cli.generate import DecodeOptions, decode
    from salmonn_cli.llm import scaled_lora
    from tests.reference import load_case
    from tests.test_generate import _build_reference_lm

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    case = load_case(json_path)
    lm = _build_reference_lm(case.components).to(CUDA)
    assert engine_for(lm).capture, "on CUDA the step is captured by default"
    embeds = torch.from_numpy(case.arrays["inputs_embeds"]).to(CUDA)
    generation = case.meta["generation"]
    greedy = decode(lm, embeds, DecodeOptions(**generation["greedy"]))
    assert list(greedy.token_ids) == case.arrays["greedy_ids"][1:].tolist()
    beam = decode(lm, embeds, DecodeOptions(**generation["beam"]))
    assert list(beam.token_ids) == case.arrays["beam_ids"][1:].tolist()
    for scale, key in ((2.0, "greedy_ids_lora_scale_2p0"), (0.0, "greedy_ids_lora_scale_0p0")):
        with scaled_lora(lm, scale):  # the same captured graph reads the new scale
            out = decode(lm, embeds, DecodeOptions(**generation["greedy"]))
        assert list(out.token_ids) == case.arrays[key][1:].tolist(), scale


@pytest.mark.parametrize("json_path", _reference_cases(), ids=[p.stem for p in _reference_cases()])
def test_reference_ids_on_cuda_in_float32_through_the_compiled_captured_step(json_path):
    """The same through the compiled step, recorded as a CUDA graph: every id the original's."""
    from salmonn_cli.engine import LlamaEngine
    from salmonn_cli.generate import DecodeOptions, decode
    from salmonn_cli.llm import scaled_lora
    from salmonn_cli.step_compile import ALWAYS, CompilePlan
    from tests.reference import load_case
    from tests.test_generate import _build_reference_lm

    torch.backends.cuda.matmul.allow_tf32 = False
    case = load_case(json_path)
    lm = _build_reference_lm(case.components).to(CUDA)
    engine = LlamaEngine(lm, compile=CompilePlan(ALWAYS))
    embeds = torch.from_numpy(case.arrays["inputs_embeds"]).to(CUDA)
    generation = case.meta["generation"]
    for how, scale, key in (
        ("greedy", None, "greedy_ids"),
        ("beam", None, "beam_ids"),
        ("greedy", 2.0, "greedy_ids_lora_scale_2p0"),
        ("greedy", 0.0, "greedy_ids_lora_scale_0p0"),
    ):
        with scaled_lora(lm, scale):
            out = decode(engine, embeds, DecodeOptions(**generation[how]))
        assert list(out.token_ids) == case.arrays[key][1:].tolist(), (how, scale)
    assert engine.capture and engine.compile_seconds, "compiled and recorded"


# -- the captured step ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def test_captured_step_equals_the_eager_step():
    from salmonn_cli.engine import LlamaEngine
    from tests.reference import case_paths, load_case
    from tests.test_generate import _build_reference_lm

    lm = _build_reference_lm(load_case(case_paths()[0]).components).to(CUDA)
    embeds = torch.randn(2, 9, lm.get_base_model().config.hidden_size, device=CUDA) * 0.05
    fed = [torch.tensor([5, 17], device=CUDA), torch.tensor([3, 29], device=CUDA), torch.tensor([11, 8], device=CUDA)]
    runs = {}
    for name, engine in {"eager": LlamaEngine(lm, capture=False), "captured": LlamaEngine(lm, capture=True)}.items():
        logits = [engine.start(embeds, 1, 8).clone()] + [engine.step(t).clone() for t in fed]
        runs[name] = torch.stack(logits)
    torch.testing.assert_close(runs["captured"], runs["eager"], rtol=1e-4, atol=1e-4)
    assert torch.equal(runs["captured"].argmax(-1), runs["eager"].argmax(-1))


# -- half precision ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_audio_tokens_and_first_logits(dtype):
    import salmonn_cli
    from tests.reference import case_paths, load_case
    from tests.test_parity import model_for

    case = load_case(case_paths()[0])
    waveform = salmonn_cli.load_audio(case.audio_path)
    full = copy.deepcopy(model_for(case)).to(CUDA)  # copies: model_for's models are shared with test_parity
    half = copy.deepcopy(model_for(case)).to(device=CUDA, dtype=dtype)
    tokens_full, tokens_half = full.audio_tokens(waveform), half.audio_tokens(waveform)
    tolerance = 2e-2 if dtype == torch.float16 else 6e-2
    torch.testing.assert_close(tokens_half.float(), tokens_full, rtol=tolerance, atol=tolerance)
    prompt = "Please describe the audio."
    first_full = full.next_token_logits(full.inputs_embeds(tokens_full, prompt))
    first_half = half.next_token_logits(half.inputs_embeds(tokens_half, prompt))
    assert cosine(first_half, first_full) >= 0.999


# -- 4-bit and 8-bit backends --------------------------------------------------------------------------------------
BACKENDS = [("bitsandbytes", "4bit"), ("bitsandbytes", "8bit"), ("torchao", "4bit"), ("torchao", "8bit")]


@pytest.fixture(scope="module")
def small_llm(tmp_path_factory) -> Path:
    """A random 2-layer LLaMA whose every Linear is a shape each kernel takes (multiples of 128)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=1024, max_position_embeddings=512)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("small") / "llm"
    model.save_pretrained(folder)
    return folder


def _small_with_lora(folder: Path, backend: str | None, mode: str):
    from quantize import QuantSpec, llm_dtype, llm_quantization_config
    from salmonn_cli.checkpoint import LoraShape
    from salmonn_cli.llm import LoraSpec, attach_lora, load_language_model, quantize_base_layers

    spec = QuantSpec.parse(mode if backend else "none", backend=backend or "auto")
    dtype = llm_dtype(spec, CUDA, torch.bfloat16)  # one dtype for every backend, so only quantisation differs
    lm = load_language_model(
        folder, dtype=dtype, device=CUDA, quantization_config=llm_quantization_config(spec, CUDA, dtype)
    )
    shape = LoraShape(rank=8, layers=2, targets=("q_proj", "v_proj"))
    lm = attach_lora(lm, LoraSpec(shape), _random_lora(lm, shape), path=folder)
    return quantize_base_layers(lm, spec, CUDA), dtype


def _random_lora(lm, shape) -> dict[str, torch.Tensor]:
    """LoRA tensors for every adapted layer, keyed as peft names them: small, as trained adapters are."""
    from peft import LoraConfig, get_peft_model

    with torch.device("meta"):
        probe = get_peft_model(type(lm)(lm.config), LoraConfig(r=shape.rank, target_modules=list(shape.targets)))
    generator = torch.Generator().manual_seed(1)
    return {k: torch.randn(v.shape, generator=generator) * 0.02 for k, v in probe.state_dict().items() if ".lora_" in k}


@pytest.mark.parametrize("backend, mode", BACKENDS, ids=[f"{b}-{m}" for b, m in BACKENDS])
@torch.inference_mode()
def test_quantised_first_logits_follow_full_precision_and_lora_scale_still_acts(small_llm, backend, mode):
    needs(backend)
    from quantize import quantized_layers
    from salmonn_cli.engine import LlamaEngine
    from salmonn_cli.llm import scaled_lora

    full, full_dtype = _small_with_lora(small_llm, None, mode)
    quantised, dtype = _small_with_lora(small_llm, backend, mode)
    assert quantized_layers(quantised), "nothing was quantised"
    # prompt vectors of RMS 1, as a trained LLM's residual stream carries: random 2-layer weights then add ~15 % to
    # it, so the cosine judges the quantised layers (one that computed garbage would bring it to ~0.99)
    embeds = torch.randn(1, 16, 512, generator=torch.Generator().manual_seed(2)).to(CUDA)
    reference = LlamaEngine(full).start(embeds.to(full_dtype), 1, 4)
    engine = LlamaEngine(quantised)
    first = engine.start(embeds.to(dtype), 1, 4).clone()
    assert cosine(first, reference) >= 0.995
    step = engine.step(torch.tensor([7], device=CUDA)).clone()  # the captured step runs over this backend
    with scaled_lora(quantised, 0.0):
        off = engine.start(embeds.to(dtype), 1, 4).clone()
        step_off = engine.step(torch.tensor([7], device=CUDA)).clone()
    assert not torch.allclose(first, off) and not torch.allclose(step, step_off)


@pytest.mark.parametrize("backend, mode", [(None, "none"), *BACKENDS], ids=["fp16", *[f"{b}-{m}" for b, m in BACKENDS]])
@torch.inference_mode()
def test_one_masked_step_per_backend_under_sync_debug_mode(small_llm, backend, mode):
    """What a graph may record: a masked step that never waits on the GPU (torch raises on any sync in "error"
    mode). LLM.int8 does wait (its outlier check), which is why it is never recorded."""
    if backend:
        needs(backend)
    from salmonn_cli.engine import LlamaEngine

    lm, dtype = _small_with_lora(small_llm, backend, mode)
    engine = LlamaEngine(lm, capture=False, masked_steps=True)
    embeds = torch.randn(1, 16, 512, generator=torch.Generator().manual_seed(2)).to(CUDA, dtype)
    engine.start(embeds, 1, 4)
    tokens = torch.tensor([7], device=CUDA)
    engine.step(tokens)  # kernels loaded, lazy state made, outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        if (backend, mode) == ("bitsandbytes", "8bit"):
            with pytest.raises(RuntimeError, match="synchroniz"):
                engine.step(tokens)
        else:
            engine.step(tokens)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend, mode", [(None, "none"), *BACKENDS], ids=["fp16", *[f"{b}-{m}" for b, m in BACKENDS]])
@torch.inference_mode()
def test_the_compiled_recorded_step_follows_the_eager_one_per_backend(small_llm, backend, mode):
    if backend:
        needs(backend)
    from quantize import uncompilable_reason
    from salmonn_cli.engine import LlamaEngine
    from salmonn_cli.llm import scaled_lora
    from salmonn_cli.step_compile import ALWAYS, CompilePlan

    lm, dtype = _small_with_lora(small_llm, backend, mode)
    if uncompilable_reason(lm):
        assert (backend, mode) == ("bitsandbytes", "8bit"), uncompilable_reason(lm)
        return
    embeds = torch.randn(1, 16, 512, generator=torch.Generator().manual_seed(2)).to(CUDA, dtype)
    fed = [torch.tensor([t], device=CUDA) for t in (7, 3, 11)]
    runs = {}
    for name, engine in {"eager": LlamaEngine(lm, capture=False),
                         "compiled": LlamaEngine(lm, compile=CompilePlan(ALWAYS))}.items():  # fmt: skip
        with scaled_lora(lm, 2.0):
            runs[name] = torch.stack([engine.start(embeds, 1, 8).clone()] + [engine.step(t).clone() for t in fed])
        if name == "compiled":
            assert engine.compile_seconds and engine.capture
    assert cosine(runs["compiled"].float(), runs["eager"].float()) >= 0.999


# -- QLoRA finetuning and the CLI ----------------------------------------------------------------------------------
def tone(i: int) -> np.ndarray:
    """2 s of a tone, a different pitch per clip: sound for the GPU machine, which has no espeak-ng."""
    t = np.arange(32000) / 16000
    return (0.3 * np.sin(2 * np.pi * (220 + 110 * i) * t)).astype(np.float32)


def test_qlora_finetune_on_cuda_lowers_the_loss(tmp_path):
    needs("bitsandbytes")
    import salmonn_cli
    from quantize import QuantSpec
    from salmonn_cli.finetune import FinetuneConfig, load_data, run_finetune
    from tests.conftest import make_tiny
    from tests.test_finetune import base_of, write_data

    folder = make_tiny(tmp_path / "model")
    model = salmonn_cli.load_model(folder / "whisper", folder / "beats.pt", folder / "llm", folder / "salmonn.pth",
                                   device=CUDA, quantization=QuantSpec("4bit", "bitsandbytes"))  # fmt: skip
    data = load_data(write_data(tmp_path / "data", sound=tone) / "data.jsonl", tokenizer=model.tokenizer)
    config = FinetuneConfig(lr=3e-2, steps=6, grad_accum=2, quant="4bit", quant_backend="bitsandbytes")
    run = run_finetune(model, data, config, tmp_path / "out", base=base_of(folder))
    assert run.result.final_loss < run.result.first_loss, run.result.losses


def test_ask_through_the_cli_on_cuda(tiny):
    """`salmonn ask --device cuda` on tiny components: an answer, and no line on stderr that is not ours."""
    import soundfile as sf

    clip = tiny.parent / "gpu-ask.wav"
    sf.write(clip, tone(0), 16000)
    exe = shutil.which("salmonn")
    assert exe, "the salmonn console script is not installed (pip install -e .)"
    done = subprocess.run(
        [exe, "ask", str(clip), "What is said?", "--model", str(tiny / "model.toml"), "--device", "cuda",
         "--max-new-tokens", "6"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()
    assert "Warning" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
