"""LLM quantisation on CPU with both backends (bitsandbytes and optimum-quanto, 4-bit and 8-bit) on the tiny model,
plus the spec, the transformers configs, the memory estimates and `auto`'s choices."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

import quantize
from quantize import QuantizationError, QuantSpec, llm_dtype, llm_quantization_config
from quantize.memory import AUTO_MARGIN, GIB, choose_placement, estimate_for, estimate_memory, placements
from salmonn_cli.errors import DependencyError, UsageError
from salmonn_cli.llm import lora_scales
from tests.test_model import load, make_tiny

COMBOS = [("bitsandbytes", "4bit"), ("bitsandbytes", "8bit"), ("quanto", "4bit"), ("quanto", "8bit")]
# Bounds on first-step logits vs the unquantised tiny model. Measured: cosine 0.9954 / 0.99996 (bnb nf4 / int8),
# 0.9958 / 0.99997 (quanto int4 / int8, both in bf16); max |diff| / max |logit| 0.087 / 0.009, 0.100 / 0.008.
MIN_COSINE = {"4bit": 0.98, "8bit": 0.999}
MAX_RELATIVE = {"4bit": 0.25, "8bit": 0.03}
PROMPT = "What do you hear?"


def chirp() -> np.ndarray:
    t = np.arange(16_000) / 16_000
    return (0.3 * np.sin(2 * np.pi * (200 + 800 * t) * t)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("quant") / "model")


@pytest.fixture(scope="module")
def reference(tiny):
    return load(tiny)


@pytest.fixture(scope="module", params=COMBOS, ids=[f"{b}-{m}" for b, m in COMBOS])
def quantised(request, tiny):
    backend, mode = request.param
    return backend, mode, load(tiny, quantization=QuantSpec(mode, backend))


def first_logits(model, **kwargs) -> torch.Tensor:
    """Each model embeds its own prompt: the quanto int4 LLM runs in bfloat16."""
    return model.next_token_logits(model.inputs_embeds(model.audio_tokens(chirp()), PROMPT), **kwargs)


def quantised_class(backend: str, mode: str) -> type:
    if backend == "bitsandbytes":
        import bitsandbytes as bnb

        return bnb.nn.Linear4bit if mode == "4bit" else bnb.nn.Linear8bitLt
    from optimum.quanto import QLinear

    return QLinear


# -- the quantised tiny model ------------------------------------------------------------------------------------
def kept_in_bfloat16(backend: str, mode: str, linear: nn.Module) -> bool:
    """quanto int8 in bfloat16 on CPU leaves Linear layers that torch's int8pack kernel mishandles (a dimension
    not a multiple of 16: the tiny model's 172-wide MLP; no published LLaMA shape) unquantised."""
    return backend == "quanto" and mode == "8bit" and (linear.in_features % 16 or linear.out_features % 16) != 0


def test_llm_base_layers_are_quantised_and_the_rest_is_not(quantised):
    backend, mode, model = quantised
    cls = quantised_class(backend, mode)
    llama = model.llm.get_base_model()
    layers = llama.model.layers
    kept = 0
    for layer in layers:
        mlp = layer.mlp
        for linear in (layer.self_attn.k_proj, layer.self_attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            if kept_in_bfloat16(backend, mode, linear):
                assert type(linear) is nn.Linear and linear.weight.dtype == torch.bfloat16
                kept += 1
            else:
                assert isinstance(linear, cls)
        for adapted in (layer.self_attn.q_proj, layer.self_attn.v_proj):  # peft lora.Linear over a quantised base
            assert isinstance(adapted.base_layer, cls)
            assert type(adapted.lora_A["default"]) is nn.Linear and type(adapted.lora_B["default"]) is nn.Linear
    assert kept == (3 * len(layers) if (backend, mode) == ("quanto", "8bit") else 0)  # gate, up: 64->172, down
    assert len(quantize.quantized_layers(model.llm)) == 7 * len(layers) - kept
    assert type(llama.lm_head) is nn.Linear
    for part in (model.whisper, model.beats, model.connector):
        assert quantize.quantized_layers(part) == []
        assert {p.dtype for p in part.parameters()} == {torch.float32}


def test_first_step_logits_stay_close_to_full_precision(quantised, reference):
    _, mode, model = quantised
    full, quant = first_logits(reference), first_logits(model)
    assert torch.isfinite(quant).all()
    cosine = torch.nn.functional.cosine_similarity(full, quant, dim=0).item()
    relative = ((full - quant).abs().max() / full.abs().max()).item()
    assert cosine > MIN_COSINE[mode], cosine
    assert relative < MAX_RELATIVE[mode], relative


def test_quantised_model_generates(quantised):
    _, _, model = quantised
    result = model.generate(chirp(), PROMPT, max_new_tokens=4, num_beams=2)
    assert 1 <= len(result.token_ids) <= 4
    assert all(0 <= i < model.llm.config.vocab_size for i in result.token_ids)


def test_lora_still_applies_and_its_scale_is_restored(quantised):
    _, _, model = quantised
    trained = first_logits(model)
    off, strong = first_logits(model, lora_scale=0.0), first_logits(model, lora_scale=8.0)
    assert (trained - off).abs().max() > 1e-2 and (strong - trained).abs().max() > 1e-2
    assert lora_scales(model.llm) == {4.0}
    assert torch.equal(first_logits(model), trained)


# -- the spec and the configs ------------------------------------------------------------------------------------
def test_spec_parsing_and_validation():
    assert QuantSpec.parse(None) == QuantSpec("none") == QuantSpec.parse("")
    assert QuantSpec.parse("nf4").mode == "4bit" and QuantSpec.parse("int8").mode == "8bit"
    assert QuantSpec.parse("4BIT", backend="quanto") == QuantSpec("4bit", "quanto")
    assert not QuantSpec.parse("none").enabled and QuantSpec("8bit").enabled
    # auto on CUDA: torchao where it is installed and the GPU takes tinygemm, else bitsandbytes
    assert QuantSpec("4bit").backend_for("cuda", torchao_ready=True) == "torchao"
    assert QuantSpec("4bit").backend_for("cuda", torchao_ready=False) == "bitsandbytes"
    assert QuantSpec("4bit", "bitsandbytes").backend_for("cuda", torchao_ready=True) == "bitsandbytes"
    # torchao's int8 layer converts its whole weight each call: faster than float16 only once compiled
    assert QuantSpec("8bit").backend_for("cuda", torchao_ready=True) == "bitsandbytes"
    assert QuantSpec("8bit").backend_for("cuda", torchao_ready=True, compiled=True) == "torchao"
    assert QuantSpec("8bit", "torchao").backend_for("cuda", torchao_ready=True) == "torchao"  # asked for by name
    assert QuantSpec("4bit").backend_for("cpu") == QuantSpec("4bit").backend_for("mps") == "quanto"
    assert QuantSpec("4bit", "bitsandbytes").backend_for("cpu") == "bitsandbytes"
    with pytest.raises(QuantizationError, match="3bit"):
        QuantSpec.parse("3bit")
    with pytest.raises(QuantizationError, match="gptq"):
        QuantSpec("4bit", "gptq")  # type: ignore[arg-type]


def test_bitsandbytes_config_is_the_qlora_standard():
    nf4 = llm_quantization_config("4bit", "cuda")
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_use_double_quant
    assert nf4.bnb_4bit_compute_dtype == torch.float16
    assert (
        llm_quantization_config("4bit", "cuda", compute_dtype=torch.bfloat16).bnb_4bit_compute_dtype == torch.bfloat16
    )
    int8 = llm_quantization_config("8bit", "cuda")
    assert int8.load_in_8bit and not int8.load_in_4bit
    assert llm_quantization_config(QuantSpec("8bit", "bitsandbytes"), "cpu").load_in_8bit
    # quanto is applied after loading (and after LoRA), never through from_pretrained
    assert llm_quantization_config("4bit", "cpu") is None and llm_quantization_config("none", "cuda") is None


def test_llm_dtype_is_bfloat16_only_for_quanto_on_cpu_and_torchao_int4():
    assert llm_dtype("4bit", "cpu", torch.float32) == torch.bfloat16
    assert llm_dtype("8bit", "cpu", torch.float32) == torch.bfloat16
    assert llm_dtype(QuantSpec("8bit", "bitsandbytes"), "cpu", torch.float32) == torch.float32
    assert llm_dtype(QuantSpec("4bit", "bitsandbytes"), "cpu", torch.float32) == torch.float32
    assert llm_dtype(QuantSpec("4bit", "bitsandbytes"), "cuda", torch.float16) == torch.float16
    assert llm_dtype(QuantSpec("4bit", "torchao"), "cuda", torch.float16) == torch.bfloat16  # tinygemm's dtype
    assert llm_dtype(QuantSpec("8bit", "torchao"), "cuda", torch.float16) == torch.float16
    assert llm_dtype("none", "cpu", torch.float32) == torch.float32


@pytest.mark.parametrize(
    ("spec", "package"), [("4bit", "optimum-quanto"), (QuantSpec("8bit", "bitsandbytes"), "bitsandbytes")]
)
def test_missing_backend_is_a_dependency_error_with_the_pip_command(tiny, monkeypatch, spec, package):
    real = importlib.util.find_spec
    hidden = ("bitsandbytes", "optimum.quanto")
    monkeypatch.setattr(
        quantize.backends.importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a)
    )
    with pytest.raises(DependencyError, match=f"pip install {package}"):
        load(tiny, quantization=spec)


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_torchao_on_cpu_is_refused_before_loading_and_names_the_cpu_backend(tiny, mode):
    with pytest.raises(UsageError, match="CUDA only.*--quant-backend quanto"):
        load(tiny, quantization=QuantSpec(mode, "torchao"))


# -- memory ------------------------------------------------------------------------------------------------------
VICUNA_13B, VICUNA_7B = 13_015_864_320, 6_738_415_616
ENCODERS = 637_000_000 + 91_000_000 + 23_000_000  # Whisper-large-v2 encoder, BEATs, Q-Former


@pytest.mark.parametrize(
    ("params", "mode", "gb"),
    [
        (VICUNA_13B, "none", 26.0),
        (VICUNA_13B, "8bit", 13.3),
        (VICUNA_13B, "4bit", 7.2),
        (VICUNA_7B, "none", 13.5),
        (VICUNA_7B, "8bit", 7.0),
        (VICUNA_7B, "4bit", 3.9),
    ],
)
def test_llm_weights_match_the_published_sizes(params, mode, gb):
    assert estimate_memory(params, ENCODERS, mode).weights_bytes / 1e9 == pytest.approx(gb, rel=0.05)


def test_estimate_adds_fp16_encoders_cache_and_overhead():
    est = estimate_memory(VICUNA_13B, 637_000_000, "4bit")
    assert est.encoders_bytes / 1e9 == pytest.approx(1.27, rel=0.01)  # Whisper-large-v2 encoder in fp16
    assert est.kv_cache_bytes == 2 * 40 * 5120 * 2048 * 2  # Vicuna-13B: 40 layers x 5120 wide, fp16
    assert est.total_bytes == est.weights_bytes + est.encoders_bytes + est.kv_cache_bytes + est.overhead_bytes
    assert est.total_gib == est.total_bytes / GIB
    assert 10 < est.total_gib < 12  # "13B fits a 12-16 GB card in 4-bit"
    assert estimate_memory(VICUNA_13B, 0, "4bit", hidden=4096, layers=32).kv_cache_bytes == 2 * 32 * 4096 * 2048 * 2
    with pytest.raises(QuantizationError):
        estimate_memory(VICUNA_7B, 0, "2bit")


@pytest.mark.parametrize("expected", ["none", "8bit", "4bit"])
def test_auto_takes_the_first_placement_that_fits_with_its_margin(expected):
    gpu = placements("cuda", backend="bitsandbytes")
    needed = estimate_for(VICUNA_13B, ENCODERS, next(p for p in gpu if p.mode == expected)).total_bytes
    exact = int(needed * (1 + AUTO_MARGIN)) + 1
    assert choose_placement(exact, VICUNA_13B, ENCODERS, gpu).mode == expected
    less = {"none": "8bit", "8bit": "4bit", "4bit": "4bit"}[expected]  # nothing fits -> 4bit; the caller warns
    assert choose_placement(int(needed * 1.09), VICUNA_13B, ENCODERS, gpu).mode == less


def test_the_estimate_knows_the_dtype_each_mode_runs_in_on_each_device():
    cpu = {p.mode: p for p in placements("cpu")}
    assert {m: p.llm_dtype for m, p in cpu.items()} == {"none": "float32", "8bit": "bfloat16", "4bit": "bfloat16"}
    assert {p.dtype for p in cpu.values()} == {"float32"} and {p.backend for p in cpu.values()} == {"none", "quanto"}
    assert {p.llm_dtype for p in placements("cuda", backend="bitsandbytes")} == {"float16"}
    assert placements("cuda", backend="torchao")[2].llm_dtype == "bfloat16"  # tinygemm packs bf16
    fp32 = estimate_for(VICUNA_7B, ENCODERS, cpu["none"])
    bf16 = estimate_for(VICUNA_7B, ENCODERS, next(p for p in placements("cpu", "bfloat16") if p.mode == "none"))
    assert fp32.weights_bytes / 1e9 == pytest.approx(27.0, rel=0.05)  # Vicuna-7B in float32
    assert bf16.weights_bytes / 1e9 == pytest.approx(13.5, rel=0.05) and bf16.encoders_bytes * 2 == fp32.encoders_bytes
    with pytest.raises(QuantizationError):
        placements("cpu", "float8")


@pytest.mark.parametrize("budget_gib", [6, 9, 12, 20, 22.9, 40, 64])
def test_doctor_auto_the_refusal_and_the_benchmark_agree_on_one_machine(budget_gib, monkeypatch):
    """One CPU machine with `budget_gib` of available memory, fed to all four: doctor's "fits" line, `--quant
    auto`'s choice, the refusal of an explicit mode, and the benchmark's skip of a configuration."""
    import torch

    from benchmarks.runner import BenchConfig, host_estimate_bytes, parse_args
    from salmonn_cli.cli import info, quant
    from salmonn_cli.errors import OutOfMemoryError
    from salmonn_cli.model_file import load_model_spec

    budget = int(budget_gib * GIB)
    monkeypatch.setattr(quant, "memory_budget", lambda device_type: quant.MemoryBudget(budget, "available host memory"))
    spec, cpu = load_model_spec("salmonn-7b"), torch.device("cpu")
    fits = info.fits_here(budget, "cpu")["salmonn-7b"]  # what doctor prints
    auto = quant.pick_quantization("auto", "auto", spec, cpu).spec.mode
    assert fits[auto] or not any(fits.values()), (fits, auto)
    for mode in ("none", "8bit", "4bit"):
        try:
            quant.pick_quantization(mode, "auto", spec, cpu)
            refused = False
        except OutOfMemoryError as exc:
            refused = True
            assert "needs ~" in str(exc) and ("fits" in str(exc) or "no mode fits" in str(exc))
        assert refused == (not fits[mode]), (mode, fits)
        bench = host_estimate_bytes(
            parse_args(["--shape", "salmonn-7b"]), BenchConfig(mode, "quanto" if mode != "none" else "none", "cpu")
        )
        assert (bench <= budget) == fits[mode], (mode, bench / GIB, fits)


def test_auto_on_a_cpu_follows_the_readme_rule_and_says_when_quanto_is_missing(monkeypatch, capsys):
    """int8 (the fastest mode within the cosine bound) wherever it fits, else int4; without optimum-quanto the
    unquantised LLM, with a line saying what is missing."""
    import torch

    import quantize.backends
    from quantize import MissingBackendError
    from salmonn_cli.cli import quant
    from salmonn_cli.model_file import load_model_spec

    spec, cpu = load_model_spec("salmonn-7b"), torch.device("cpu")

    def machine(gib: float) -> None:
        monkeypatch.setattr(quant, "memory_budget", lambda device_type: quant.MemoryBudget(int(gib * GIB), "host"))

    machine(256)
    assert quant.pick_quantization("auto", "auto", spec, cpu).describe() == "8bit (quanto)"  # not float32
    machine(10)
    assert quant.pick_quantization("auto", "auto", spec, cpu).describe() == "4bit (quanto)"
    assert capsys.readouterr().err == ""

    def no_quanto(backend: str) -> None:
        raise MissingBackendError(f"{backend} quantisation needs the optimum package: pip install optimum-quanto")

    monkeypatch.setattr(quantize.backends, "_require", no_quanto)
    machine(256)
    chosen = quant.pick_quantization("auto", "auto", spec, cpu)
    assert chosen.describe() == "none" and chosen.dtype == "float32"
    said = capsys.readouterr().err
    assert "--quant auto would run --quant 8bit (quanto)" in said and "pip install optimum-quanto" in said, said
    with pytest.raises(UsageError, match="CUDA only"):  # a backend that cannot run on a CPU: refused, not skipped
        quant.pick_quantization("auto", "torchao", spec, cpu)
