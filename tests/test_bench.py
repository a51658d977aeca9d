"""scripts/bench.py on the tiny shape runs end to end and reports every field (a test of the script, not of speed);
the layer-by-layer builder builds the shape it is asked for, and never holds much more than the finished model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_report
from benchmarks.report import markdown
from benchmarks.runner import BenchConfig, configurations
from benchmarks.shapes import SHAPES, TINY, BeatsShape, LlamaShape, ModelShape, QFormerShape, WhisperShape

ROOT = Path(__file__).resolve().parents[1]
STAT_FIELDS = {"median", "min", "max", "runs"}


def _positive_stat(stat: dict, repeat: int) -> None:
    assert set(stat) == STAT_FIELDS
    assert len(stat["runs"]) == repeat and all(run > 0 for run in stat["runs"])
    assert 0 < stat["min"] <= stat["median"] <= stat["max"]


def test_bench_tiny_writes_every_field(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--shape", "tiny", "--device", "cpu"]
    command += ["--json", str(out), "--repeat", "1", "--warmup", "0", "--long-seconds", "60", "--batch-size", "2"]
    command += ["--new-tokens", "4", "--markdown", "--peer", "qwen2-audio", "--live-seconds", "10"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "long_audio.batch_speedup" in done.stdout  # the detailed table
    assert "| none/none/cpu |" in done.stdout  # the markdown summary
    assert "| qwen2-audio-7b (tiny shape) qwen2-audio/none/none/cpu | 776 |" in done.stdout  # the peer's table

    report = json.loads(out.read_text())
    assert report["target"] == "tiny" and report["options"]["repeat"] == 1
    _positive_stat(report["cli_help_s"], 1)
    (run,) = report["runs"]
    assert run["model"] == "tiny" and run["device"] == "cpu" and run["config"]["label"] == "none/none/cpu"
    assert run["load_s"] > 0
    memory = run["memory"]
    for key in ("rss_before_load_bytes", "load_peak_rss_bytes", "model_bytes", "llm_bytes", "peak_rss_bytes"):
        assert memory[key] > 0, key
    assert memory["load_peak_rss_bytes"] <= memory["peak_rss_bytes"] and memory["gpu_peak"] is None
    for name in ("whisper_s", "beats_s", "connector_s"):
        _positive_stat(run["stages"][name], 1)
    _positive_stat(run["first_token"]["first_token_s"], 1)
    for key, beams in (("decode", 1), ("decode_beams", 4)):
        decode = run[key]
        assert decode["tokens"] == 4 and decode["num_beams"] == beams and decode["tokens_per_s"] > 0
        for stat in ("one_token_s", "all_tokens_s", "step_s"):
            _positive_stat(decode[stat], 1)
        # each way a CPU steps, in one run: compiled (with its start cost) and eager, which `auto` takes on a CPU
        assert set(decode["by_step"]) == {"compiled", "eager"} and decode["step_way"] == "eager"
        assert decode["tokens_per_s"] == decode["eager_tokens_per_s"] == decode["by_step"]["eager"]["tokens_per_s"]
        assert decode["compile_s"] > 0 and decode["compiled_tokens_per_s"] > 0
        assert decode["compiled_over_eager"] == decode["compiled_tokens_per_s"] / decode["eager_tokens_per_s"]
        # P9: steps/s x the LLM's weights but the token table (read once a step) / the bandwidth measured
        assert 0 < decode["bytes_per_step"] < memory["llm_bytes"] and decode["read_bandwidth_gb_s"] > 0.1
        expected = decode["tokens_per_s"] * decode["bytes_per_step"] / (decode["read_bandwidth_gb_s"] * 1e9)
        assert decode["p9"] == pytest.approx(expected, rel=1e-6)
    _positive_stat(run["ask"]["first_token_s"], 1)
    _positive_stat(run["ask"]["total_s"], 1)

    long = run["long_audio"]
    assert long["audio_s"] == 60 and long["segments"] >= 2 and long["segmenter"]
    assert set(long["by_batch_size"]) == {"1", "2"}
    for item in long["by_batch_size"].values():
        _positive_stat(item["wall_s"], 1)
        assert item["audio_s_per_s"] == 60 / item["wall_s"]["median"]
    assert long["batch_speedup"] > 0

    live = run["live"]  # 10 s at real-time pace in 5 s windows: two answers, each after its window ended
    assert live["audio_s"] == 10 and live["segments"] == 2 and live["dropped"] == 0
    assert len(live["latency_s"]["runs"]) == 2 and live["latency_s"]["min"] > 0

    # the peer, through transformers' Qwen2AudioForConditionalGeneration.generate(): 750 audio tokens for 30 s
    (peer,) = report["peers"]
    assert peer["prompt_tokens"] == 1 + 750 + 1 + 24 and peer["tokens"] == 4
    assert peer["first_token_s"] > 0 and peer["tokens_per_s"] > 0 and peer["llm_dtype"] == "bfloat16"

    # gpu_check.sh's last table reads the same JSON: a row per run and the peer's, a row for a part that is missing
    out.rename(tmp_path / "bench-tiny.json")
    lines = gpu_report.table(tmp_path, ["tiny", "salmonn-13b"]).splitlines()
    assert lines[2].startswith("| pytest -m gpu |  | did not finish (no report) |")
    assert lines[3].startswith("| tiny | none/none/cpu | ok |") and lines[3].count("|") == len(gpu_report.HEADERS) + 1
    assert lines[4].startswith("| qwen2-audio-7b (tiny shape) | qwen2-audio/none/none/cpu | SALMONN greedy ")
    assert lines[5] == "| salmonn-13b |  | did not finish within its time limit (no report) |" + "  |" * 7


def test_a_run_stopped_at_its_time_limit_keeps_what_it_measured(tmp_path):
    """`--timeout` ends a configuration mid-way (here in 60 s of real-time `live`): its finished measurements stay."""
    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--shape", "tiny", "--json", str(out)]
    command += ["--repeat", "1", "--warmup", "0", "--new-tokens", "2", "--skip", "help,stages,ask,long_audio"]
    command += ["--live-seconds", "60", "--timeout", "20", "--markdown"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 1, done.stderr[-2000:]  # not a clean run, and says so
    (run,) = json.loads(out.read_text())["runs"]
    assert run["incomplete"].startswith("exit -9") and "live" not in run
    assert run["decode"]["tokens_per_s"] > 0 and run["decode_beams"]["tokens_per_s"] > 0
    assert "| none/none/cpu (incomplete: exit -9" in done.stdout


def test_bench_skips_a_run_that_does_not_fit_and_says_why(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--shape", "salmonn-13b", "--quant", "8bit"]
    command += ["--max-host-gb", "1", "--skip", "help", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["config"]["label"] == "8bit/quanto/cpu" and "GB of host memory" in run["skipped"]


def test_configurations_resolve_the_backend_per_device_once():
    configs = configurations(["none", "4bit"], ["auto", "quanto"], ["cpu", "cuda"])
    assert configs == [
        BenchConfig("none", "none", "cpu"),
        BenchConfig("4bit", "quanto", "cpu"),
        BenchConfig("none", "none", "cuda"),
        BenchConfig("4bit", "bitsandbytes", "cuda"),
        BenchConfig("4bit", "quanto", "cuda"),
    ]


def test_nf4_weights_are_drawn_on_the_gpu_and_int8_weights_on_the_host():
    """A 13B shape drawn on the host takes 60-100 s, more than gpu_check.sh gives a 13B run; NF4 quantises from the
    GPU, so only LLM.int8 (which quantises on the move to the GPU) still draws on the host."""
    from benchmarks.build import bitsandbytes_draw_device
    from quantize import QuantSpec

    gpu = torch.device("cuda", 0)
    assert bitsandbytes_draw_device(QuantSpec("4bit", "bitsandbytes"), gpu) == gpu
    assert bitsandbytes_draw_device(QuantSpec("8bit", "bitsandbytes"), gpu) == torch.device("cpu")


def test_published_shapes_have_the_published_sizes():
    assert SHAPES["salmonn-7b"].llm.params(lora=False) == 6_738_415_616  # Vicuna-7B
    assert SHAPES["salmonn-13b"].llm.params(lora=False) == 13_015_864_320  # Vicuna-13B
    assert round(SHAPES["salmonn-13b"].whisper.params() / 1e6) == 637  # Whisper-large-v2 encoder


CUSTOM = ModelShape(
    "custom",
    WhisperShape(d_model=48, layers=3, heads=4, ffn=80, positions=1500),
    BeatsShape(
        embed_dim=24,
        encoder_embed_dim=32,
        encoder_layers=3,
        encoder_attention_heads=2,
        encoder_ffn_embed_dim=56,
        conv_pos=16,
        conv_pos_groups=4,
        num_buckets=40,
        max_distance=100,
    ),
    QFormerShape(hidden=32, layers=3, heads=2, intermediate=40, query_tokens=2),
    LlamaShape(hidden=96, layers=3, heads=4, intermediate=200, vocab=500, lora_rank=4),
)


@pytest.mark.parametrize("quant", ["none", "4bit"])
def test_layer_by_layer_builder_builds_the_analytic_parameter_count(quant):
    import torch

    from benchmarks.build import build_model
    from quantize import QuantSpec

    model = build_model(CUSTOM, QuantSpec.parse(quant, backend="quanto"), torch.device("cpu"))
    expected = CUSTOM.params()
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    for name in ("whisper", "beats", "connector"):
        assert sum(p.numel() for p in getattr(model, name).parameters()) == expected[name], name
    if quant == "none":  # quanto's int4 tensors count packed elements; their count is the shape's otherwise
        assert sum(p.numel() for p in model.llm.parameters()) == expected["llm"]
    result = model.generate(torch.zeros(16000).numpy(), "Describe the audio.", max_new_tokens=3, min_length=4)
    assert len(result.token_ids) == 3  # it runs end to end


_BUILD_AND_MEASURE = textwrap.dedent(
    """
    import gc, json, sys, torch
    from pathlib import Path
    from quantize import QuantSpec
    from benchmarks.build import build_llm
    from benchmarks.memory import module_bytes
    from benchmarks.shapes import LlamaShape
    mode, dtype = sys.argv[1], getattr(torch, sys.argv[2])
    spec = QuantSpec.parse(mode, backend="quanto")

    def status_kib(field):  # Linux: VmRSS (now) / VmHWM (peak since the last reset), in KiB
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    # a first, tiny build pays every lazy import and one-off allocation, so only the build itself is measured
    build_llm(LlamaShape(hidden=64, layers=1, heads=2, intermediate=128), spec, torch.device("cpu"), dtype)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    before = status_kib("VmRSS")
    llm = build_llm(LlamaShape(hidden=1024, layers=4, heads=8, intermediate=2816), spec, torch.device("cpu"), dtype)
    print(json.dumps({"increase": status_kib("VmHWM") - before, "size": module_bytes(llm)}))
    """
)


@pytest.mark.parametrize(("mode", "dtype"), [("none", "float16"), ("4bit", "bfloat16")])
def test_building_a_medium_llm_holds_little_more_than_the_finished_model(mode, dtype):
    done = subprocess.run(
        [sys.executable, "-c", _BUILD_AND_MEASURE, mode, dtype], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    # all of it in full precision would be 1.6x (4bit) of the finished size; one layer at a time stays near 1x
    assert figures["increase"] < 1.5 * figures["size"], figures


def test_markdown_summary_names_every_configuration_and_skipped_reason():
    run = {"config": {"label": "4bit/quanto/cpu"}, "load_s": 2.0, "memory": {"model_bytes": 3 * 10**9}}
    skipped = {"config": {"label": "8bit/quanto/cpu"}, "skipped": "too big"}
    report = {"target": "salmonn-7b", "machine": {"description": "x86_64 2 cores"}, "options_text": "repeat 1"}
    text = markdown({**report, "runs": [run, skipped]})
    assert "| 4bit/quanto/cpu | 2.0 |" in text and "| 8bit/quanto/cpu | skipped: too big |" in text
    assert TINY.name in SHAPES
