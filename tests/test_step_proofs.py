"""CPU proofs of what the decode step needs on a GPU (no `gpu` mark: these run in the normal suite).

A recorded step (a CUDA graph) replays its tensor ops at fixed addresses and freezes every Python value it read,
and refuses a host read while it records; a compiled step recompiles when a Python value it read changes. So:
no host sync in the masked step of any backend the project records (LLM.int8 has them, and is refused); a step
recorded with make_fx (the same semantics, on the CPU) follows the LoRA scale, position and tokens as data; a
recording that fails falls back in one line; the compiled step is one graph, compiled once over 20 steps and three
LoRA scales, with the eager step's ids on every reference case; the addresses stay put; and the kernels a layer
launches are counted, so a change that adds some is seen.
"""

from __future__ import annotations

import logging

import pytest
import torch

from salmonn_cli.engine import LlamaEngine
from salmonn_cli.generate import DecodeOptions, decode
from salmonn_cli.llm import lora_layers, lora_scale_tensor, scaled_lora
from salmonn_cli.step_compile import ALWAYS, CompilePlan
from tests.gpu_properties import HostSync, MakeFxRecorder, RefusingRecorder, kernels_in, no_host_sync
from tests.reference import case_paths, load_case

from .test_generate import _build_reference_lm

CASES = case_paths()
FED = [torch.tensor([5, 17]), torch.tensor([3, 29]), torch.tensor([11, 8]), torch.tensor([4, 4])]


@pytest.fixture(scope="module")
def components():
    return load_case(CASES[0]).components


@pytest.fixture
def notices():
    """The engine's one-line notices (the `salmonn` logger, which the CLI keeps from propagating)."""
    lines: list[str] = []

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger, handler = logging.getLogger("salmonn"), Lines(logging.WARNING)
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


@pytest.fixture
def lm(components):
    """A fresh reference LM per test: engines and scale vectors live on the model."""
    return _build_reference_lm(components)


def _embeds(lm, rows: int = 2, length: int = 7) -> torch.Tensor:
    hidden = lm.get_base_model().config.hidden_size
    return torch.randn(rows, length, hidden, generator=torch.Generator().manual_seed(0)) * 0.05


@torch.inference_mode()
def _run(engine, embeds, fed) -> list[torch.Tensor]:
    logits = [engine.start(embeds, 1, len(fed) + 1).clone()]
    return logits + [engine.step(tokens).clone() for tokens in fed]


# -- no host sync in a recordable step -------------------------------------------------------------------------
def _loaded_reference_lm(components, mode: str = "none", backend: str = "auto", dtype=torch.float32):
    """The reference LM through the loaders (as load_model runs them) in `dtype`, quantised under (mode, backend)."""
    from quantize import QuantSpec, llm_quantization_config
    from salmonn_cli.checkpoint import read_salmonn_checkpoint
    from salmonn_cli.llm import LoraSpec, attach_lora, load_language_model, quantize_base_layers

    spec = QuantSpec(mode, backend)
    ckpt = read_salmonn_checkpoint(components / "salmonn.pth")
    lm = load_language_model(components / "llm", dtype=dtype, device="cpu",
                             quantization_config=llm_quantization_config(spec, "cpu", dtype))  # fmt: skip
    lm = attach_lora(lm, LoraSpec(ckpt.lora_shape), ckpt.lora, path=ckpt.path)
    return quantize_base_layers(lm, spec, "cpu")


# bitsandbytes' CPU gemv kernel reads its code table on the host (`code[1] > 0`); its CUDA kernel, the one a graph
# records, does not (bitsandbytes 0.50 backends/cuda/ops.py): everything above the kernel is what is checked here
CPU_ONLY_KERNELS = ("bitsandbytes/backends/cpu/",)


@pytest.mark.parametrize("backend", ["full precision", "bitsandbytes-4bit"])
def test_the_masked_step_reads_nothing_back_to_the_host(components, backend):
    """Every backend the project records on CUDA (full precision, NF4; torchao is pure aten ops) passes the guard."""
    lm = _build_reference_lm(components) if backend == "full precision" else _loaded_reference_lm(
        components, "4bit", "bitsandbytes")  # fmt: skip
    engine = LlamaEngine(lm, masked_steps=True)
    with torch.inference_mode():
        engine.start(_embeds(lm), 1, 4)
        engine.step(FED[0])
        with no_host_sync(allowed_in=CPU_ONLY_KERNELS):
            logits = engine.step(FED[1])
    assert logits.shape == (2, lm.get_base_model().config.vocab_size)


def test_llm_int8_reads_its_outliers_on_the_host_so_it_is_never_recorded(components, notices):
    lm = _loaded_reference_lm(components, "8bit", "bitsandbytes")
    masked = LlamaEngine(lm, masked_steps=True)
    with torch.inference_mode():
        masked.start(_embeds(lm), 1, 4)
        with pytest.raises(HostSync, match="__bool__"), no_host_sync(allowed_in=CPU_ONLY_KERNELS):
            masked.step(FED[0])  # `if outliers.any()`, in the code CUDA runs too
    recorder = MakeFxRecorder()
    engine = LlamaEngine(lm, capture=True, recorder=recorder)
    _run(engine, _embeds(lm), FED[:2])
    assert not engine.capture and recorder.recorded == 0
    assert notices == [
        "the decode step is not recorded as a CUDA graph: LLM.int8 (bitsandbytes 8-bit) reads its outliers back to"
        " the host on every matmul; each step runs eagerly, which is slower"
    ]


# -- a recorded step follows its inputs --------------------------------------------------------------------------
def test_a_recorded_step_follows_scale_position_and_tokens(lm):
    """make_fx records as a CUDA graph would; replays after the scale went to 0 and back, at later positions and
    with other tokens equal the eager steps. The engine was made before any scale tensor existed (the old failure:
    a step recorded first froze peft's float 4.0 while the prompt pass ran at the new scale)."""
    assert all(isinstance(layer.scaling["default"], float) for layer in lora_layers(lm))
    recorder = MakeFxRecorder()
    recorded, eager = LlamaEngine(lm, capture=True, recorder=recorder), LlamaEngine(lm, masked_steps=True)
    embeds = _embeds(lm)
    for scale in (None, 0.0, 2.0, 4.0):  # recorded at the trained scale first, as a first decode would be
        with scaled_lora(lm, scale):
            got, expected = _run(recorded, embeds, FED), _run(eager, embeds, FED)
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b), scale
    assert recorder.recorded == 1  # one recording, replayed at every scale
    with scaled_lora(lm, 0.0):
        off = _run(recorded, embeds, FED)
    assert not torch.equal(off[-1], got[-1])  # the scale did act on the replays


def test_peft_replacing_or_multiplying_a_scaling_is_followed_and_never_compounds(lm):
    recorded, eager = LlamaEngine(lm, capture=True, recorder=MakeFxRecorder()), LlamaEngine(lm, masked_steps=True)
    embeds = _embeds(lm)
    _run(recorded, embeds, FED)  # recorded at the trained 4.0
    layers = lora_layers(lm)
    for layer in layers:
        layer.scale_layer(0.5)  # peft's in-place `scaling *= 0.5`, layer by layer
    assert [float(layer.scaling["default"]) for layer in layers] == [2.0] * len(layers)  # not 4 * 0.5^n
    layers[0].set_scale("default", 0.25)  # peft assigns a new float: 0.25 * alpha / r = 1.0 in layer 0 alone
    got, expected = _run(recorded, embeds, FED), _run(eager, embeds, FED)
    assert [float(layer.scaling["default"]) for layer in layers] == [1.0] + [2.0] * (len(layers) - 1)
    assert lora_scale_tensor(lm).tolist() == [1.0] + [2.0] * (len(layers) - 1)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    vector = lora_scale_tensor(lm)
    for layer in layers:  # every view replaced by a float: the same vector takes their values
        layer.set_scale("default", 0.5)
    got, expected = _run(recorded, embeds, FED), _run(eager, embeds, FED)
    assert lora_scale_tensor(lm) is vector and vector.tolist() == [2.0] * len(layers)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_a_changed_adapter_state_records_again(lm):
    recorder = MakeFxRecorder()
    recorded, eager = LlamaEngine(lm, capture=True, recorder=recorder), LlamaEngine(lm, masked_steps=True)
    embeds = _embeds(lm)
    _run(recorded, embeds, FED)
    with lm.disable_adapter():  # a Python branch in peft's forward: the recorded step must not replay the old one
        got, expected = _run(recorded, embeds, FED), _run(eager, embeds, FED)
    assert recorder.recorded == 2
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_a_failed_recording_falls_back_in_one_line_and_is_not_retried(lm, notices):
    recorder = RefusingRecorder()
    engine = LlamaEngine(lm, capture=True, recorder=recorder)
    embeds = _embeds(lm)
    first, second = _run(engine, embeds, FED), _run(engine, embeds, FED)
    expected = _run(LlamaEngine(lm), embeds, FED)
    for a, b, c in zip(first, second, expected, strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=2e-5)  # the exact steps' numbers, as without recording
        assert torch.equal(a, b)
    assert recorder.tries == 1 and not engine.capture
    assert notices == [
        "recording the decode step as a CUDA graph failed (CUDA error: operation not permitted when stream is"
        " capturing): decoding goes on without it, which is slower (SALMONN_CUDA_GRAPHS=0 skips the attempt)"
    ]


# -- static addresses ----------------------------------------------------------------------------------------------
def test_what_a_recorded_step_reads_stays_at_one_address_across_steps_and_calls(lm):
    engine = LlamaEngine(lm, capture=True, recorder=MakeFxRecorder())
    embeds = _embeds(lm)

    def addresses() -> tuple[int, ...]:
        cache, recorded = engine._cache, engine._recorded[engine._cache.rows]
        return (cache.kv.data_ptr(), cache.position.data_ptr(), recorded.tokens.data_ptr(),
                lora_scale_tensor(lm).data_ptr())  # fmt: skip

    _run(engine, embeds, FED[:1])
    seen = {addresses()}
    for scale in (0.0, 2.0):
        with scaled_lora(lm, scale), torch.inference_mode():
            engine.start(embeds, 1, 8)
            for tokens in FED:
                engine.step(tokens)
                seen.add(addresses())
    assert len(seen) == 1


# -- the compiled step -----------------------------------------------------------------------------------------
def test_the_compiled_step_is_one_graph_compiled_once_over_20_steps_and_three_scales(lm):
    from torch._dynamo.utils import counters

    engine = LlamaEngine(lm, masked_steps=True)
    embeds = _embeds(lm)
    with torch.inference_mode():
        engine.start(embeds, 1, 24)
        engine._cache.phase, engine._cache.position[0] = "masked", engine._cache.length
        explained = torch._dynamo.explain(engine._masked_step)(FED[0], engine._cache)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons

    torch._dynamo.reset()
    compiled = LlamaEngine(lm, compile=CompilePlan(ALWAYS))
    before = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        for scale in (4.0, 0.0, 2.0):
            with scaled_lora(lm, scale):
                compiled.start(embeds, 1, 24)
                for step in range(20):
                    compiled.step(FED[step % len(FED)])
    assert counters["stats"]["unique_graphs"] - before == 1  # no recompile: position, tokens and scale are data
    assert len(compiled.compile_seconds) == 1 and compiled._compiled_shapes == {(2, 64): True}


@pytest.mark.parametrize("json_path", CASES, ids=[p.stem for p in CASES])
def test_compiled_steps_give_the_original_ids_in_float32(json_path, reference_compiled):
    """Greedy, beam search and LoRA 2.0 / 0.0 through the compiled step: the reference's ids, every one."""
    case = load_case(json_path)
    lm, engine = reference_compiled(case)
    embeds = torch.from_numpy(case.arrays["inputs_embeds"])
    generation = case.meta["generation"]
    runs = [("greedy", None, "greedy_ids"), ("beam", None, "beam_ids"), ("greedy", 2.0, "greedy_ids_lora_scale_2p0"),
            ("greedy", 0.0, "greedy_ids_lora_scale_0p0")]  # fmt: skip
    for how, scale, key in runs:
        with scaled_lora(lm, scale):
            out = decode(engine, embeds, DecodeOptions(**generation[how]))
        assert list(out.token_ids) == case.arrays[key][1:].tolist(), (how, scale)
    assert engine.compile_seconds  # it did compile (one per row count: greedy's 1, beams' 4)


@pytest.fixture(scope="module")
def reference_compiled():
    built: dict = {}

    def get(case):
        key = case.components.resolve()
        if key not in built:
            lm = _build_reference_lm(case.components)
            built[key] = (lm, LlamaEngine(lm, compile=CompilePlan(ALWAYS)))
        return built[key]

    return get


# -- the kernel budget -------------------------------------------------------------------------------------------
# Kernels one decoder layer launches in the recorded (uncompiled) masked step, counted on the CPU by a dispatch mode
# (views, allocations and ops returning their input are free). Per layer with LoRA on q and v: LLaMA's RMSNorm
# (pow, mean, add, rsqrt, mul, mul: twice; in half precision a cast in and out each time, +4), rotary on q and k
# (mul, neg, cat, mul, add: twice), the 7 projections, the cache writes (2), SDPA over the whole cache, the MLP's
# silu and mul, the residual adds (2), and LoRA on q and v (2 linears, a scale multiply and an add, each). LoRA kept
# in float32 under a half-precision model (peft's default) would add 4 casts (52). A 13B step is ~40 x this.
# A budget, not a measurement: a change that adds kernels fails here.
KERNELS_PER_LAYER = {torch.float32: 44, torch.bfloat16: 48}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_kernels_per_decoder_layer_in_the_recorded_step(components, dtype):
    lm = _loaded_reference_lm(components, dtype=dtype)  # loading puts LoRA in the LLM's dtype, not peft's float32
    assert {layer.lora_A["default"].weight.dtype for layer in lora_layers(lm)} == {dtype}
    engine = LlamaEngine(lm, masked_steps=True)
    embeds = _embeds(lm).to(dtype)
    with torch.inference_mode():
        engine.start(embeds, 1, 4)
        engine.step(FED[0])
        with kernels_in(lm.get_base_model().model.layers[0]) as counted:
            engine.step(FED[1])
    assert counted.total == KERNELS_PER_LAYER[dtype], dict(counted.counts)
