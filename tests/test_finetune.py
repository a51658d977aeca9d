"""`salmonn finetune` on tiny components, CPU: data validation, the loss falling, what changes and what does not,
the saved checkpoint, first-step loss = `model.loss`, resume after SIGKILL and Ctrl-C, make-data."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import soundfile as sf
import torch

import salmonn_cli
from salmonn_cli.audio import SAMPLE_RATE
from salmonn_cli.checkpoint import original_connector_key, read_salmonn_checkpoint
from salmonn_cli.checkpoint import our_connector_key as _map_connector_key
from salmonn_cli.finetune import BaseModel, DataError, FinetuneConfig, load_data, read_examples, run_finetune
from salmonn_cli.finetune.data import split_validation
from salmonn_cli.finetune.make_data import plan_inputs
from salmonn_cli.finetune.train import training_quantization
from salmonn_cli.hub import sha256_of
from salmonn_cli.llm import lora_scales
from tests.speech import SENTENCES, espeak

from .conftest import make_tiny
from .launchers import rank_pids

RESPONSES = ("a fox", "red box", "rain", "violin")  # short answers: a few steps can fit them


def salmonn_command(*args) -> list[str]:
    """The command line of `salmonn ARGS...`, through the real entry point."""
    exe = shutil.which("salmonn")
    assert exe, "the salmonn console script is not installed (pip install -e .)"
    return [exe, *map(str, args)]


def run_cli(*args, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(salmonn_command(*args), capture_output=True, text=True, timeout=timeout)


# -- fixtures --------------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:  # this module's own: it sharpens the head (overrides conftest's `tiny`)
    """Tiny components whose LLM output head is 20x sharper than its random init (rows of norm ~3, not 0.16).

    Why: with init std 0.02 no logit can exceed ~1.3, so the loss cannot fall far below ln(vocab) whatever LoRA
    learns; a trained LLM's head is that much sharper, and with it a few steps can fit the answers.
    """
    from safetensors.torch import load_file, save_file

    folder = make_tiny(tmp_path_factory.mktemp("ft") / "model")
    weights = folder / "llm" / "model.safetensors"
    tensors = load_file(weights)
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 20
    save_file(tensors, weights, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"))


def write_data(folder: Path, sound=lambda i: espeak(SENTENCES[i])) -> Path:
    """Four clips (`sound(i)`: espeak's by default) and `data.jsonl` with short answers (tasks and instructions
    mixed), in `folder`."""
    (folder / "clips").mkdir(parents=True)
    lines = []
    for i, response in enumerate(RESPONSES):
        sf.write(folder / "clips" / f"c{i}.wav", sound(i), SAMPLE_RATE)
        ask = {"task": "transcribe"} if i % 2 else {"instruction": "What is said?"}
        lines.append(json.dumps({"audio": f"clips/c{i}.wav", **ask, "response": response}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def load(tiny: Path, checkpoint: Path | None = None, quant: str = "none"):
    return salmonn_cli.load_model(tiny / "whisper", tiny / "beats.pt", tiny / "llm", checkpoint or tiny / "salmonn.pth",
                                  quantization=training_quantization(quant))  # fmt: skip


def base_of(tiny: Path) -> BaseModel:
    return BaseModel("tiny", tiny / "salmonn.pth", sha256_of(tiny / "salmonn.pth"))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


@pytest.fixture(scope="module")
def trained(tiny, data_dir, tmp_path_factory):
    """A full-precision run through the library: 12 steps of 2 x 2 examples (padding exercised)."""
    model = load(tiny)
    before = {name: snapshot(getattr(model, name)) for name in ("whisper", "beats", "connector", "llm")}
    data = load_data(data_dir / "data.jsonl", tokenizer=model.tokenizer)
    config = FinetuneConfig(lr=3e-2, steps=12, batch_size=2, grad_accum=2, quant="none", save_every=5)
    out = tmp_path_factory.mktemp("run") / "out"
    run = run_finetune(model, data, config, out, base=base_of(tiny))
    return model, before, run, out


# -- data -------------------------------------------------------------------------------------------------------
BAD_LINES = {
    "bad JSON": ('{"audio": "clips/c0.wav", "task": ', "bad JSON"),
    "not an object": ('["clips/c0.wav"]', "expected a JSON object"),
    "missing audio": ('{"task": "caption", "response": "x"}', "missing field 'audio'"),
    "missing response": ('{"audio": "clips/c0.wav", "task": "caption"}', "missing field 'response'"),
    "missing instruction": ('{"audio": "clips/c0.wav", "response": "x"}', "missing field 'instruction' (or 'task')"),
    "unknown task": ('{"audio": "clips/c0.wav", "task": "sing", "response": "x"}', "unknown task 'sing'"),
    "missing audio file": ('{"audio": "clips/none.wav", "task": "caption", "response": "x"}', "audio file not found"),
    "unreadable audio": ('{"audio": "clips/junk.wav", "task": "caption", "response": "x"}', "not an audio format"),
    "empty response": ('{"audio": "clips/c0.wav", "task": "caption", "response": "  "}', "empty response"),
    "long response": (json.dumps({"audio": "clips/c0.wav", "task": "story", "response": "word " * 40}),
                      "over --max-text-tokens 20"),
}  # fmt: skip
GOOD_LINE = '{"audio": "clips/c1.wav", "instruction": "Hi?", "response": "a fox"}'


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from salmonn_cli.tokenizer import load_tokenizer

    return load_tokenizer(tiny / "llm")


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_each_kind_of_bad_line_is_reported_with_its_line_number(kind, data_dir, tokenizer, tmp_path):
    (data_dir / "clips" / "junk.wav").write_bytes(b"RIFF but not really audio")
    text, reason = BAD_LINES[kind]
    path = data_dir / f"bad_{kind.replace(' ', '_')}.jsonl"
    path.write_text(f"{GOOD_LINE}\n\n{text}\n{GOOD_LINE}\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_data(path, tokenizer=tokenizer, max_text_tokens=20)
    assert [(p.line, reason in p.reason) for p in caught.value.problems] == [(3, True)], caught.value.problems
    assert f"{path}:3: " in str(caught.value) and caught.value.exit_code == 2


def test_cli_lists_every_bad_line_and_trains_nothing(tiny, data_dir, tmp_path):
    (data_dir / "clips" / "junk.wav").write_bytes(b"RIFF but not really audio")
    lines = [GOOD_LINE] + [text for text, _ in BAD_LINES.values()]
    path = data_dir / "all_bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    result = run_cli("finetune", "--few-shot", path, "-o", out, "--model", tiny / "model.toml", "--quant", "none",
                     "--max-text-tokens", "20", "--offline")  # fmt: skip
    assert result.returncode == 2, result.stderr
    for number, (_, reason) in enumerate(BAD_LINES.values(), start=2):
        assert f"{path}:{number}: " in result.stderr and reason in result.stderr, (number, result.stderr)
    assert "Traceback" not in result.stderr and not out.exists()


def test_validation_split_is_seeded_and_the_hash_follows_the_audio(data_dir, tokenizer, tmp_path):
    examples, problems = read_examples(data_dir / "data.jsonl", tokenizer=tokenizer)
    assert not problems and [e.response for e in examples] == list(RESPONSES)
    assert split_validation(examples, 0.25, seed=1) == split_validation(examples, 0.25, seed=1)
    train, val = split_validation(examples, 0.25, seed=1)
    assert len(val) == 1 and len(train) == 3
    copy = tmp_path / "copy"
    (copy / "clips").mkdir(parents=True)
    for i in range(4):
        sf.write(copy / "clips" / f"c{i}.wav", espeak(SENTENCES[i]) * (0.5 if i == 3 else 1.0), SAMPLE_RATE)
    (copy / "data.jsonl").write_text((data_dir / "data.jsonl").read_text())
    assert load_data(copy / "data.jsonl").train_sha256 != load_data(data_dir / "data.jsonl").train_sha256


def test_the_inverse_key_map_writes_the_original_names(tiny):
    ckpt = read_salmonn_checkpoint(tiny / "salmonn.pth")
    for ours, original in ckpt.source_keys.items():
        if ours in ckpt.connector:
            assert original_connector_key(ours) == original and _map_connector_key(original) == ours


# -- training -----------------------------------------------------------------------------------------------------
def test_loss_falls_below_half_within_twelve_steps(trained):
    _, _, run, _ = trained
    result = run.result
    assert result.steps_done == 12 and len(result.losses) == 12
    assert result.final_loss < result.first_loss / 2, result.losses


def test_only_the_lora_matrices_change(trained):
    model, before, _, _ = trained
    for name in ("whisper", "beats", "connector"):
        assert changed(before[name], getattr(model, name)) == set(), name
    lora = {k for k in before["llm"] if ".lora_A." in k or ".lora_B." in k}
    assert changed(before["llm"], model.llm) == lora and lora
    # and the model is handed back as load_model gives it
    assert not any(m.training for m in model.modules()) and not any(p.requires_grad for p in model.parameters())


def test_the_checkpoint_loads_everywhere_and_changes_generation(trained, tiny):
    _, _, run, out = trained
    raw = torch.load(out / "salmonn.pth", weights_only=True)
    base_keys = set(torch.load(tiny / "salmonn.pth", weights_only=True)["model"])
    assert set(raw) == {"model"} and set(raw["model"]) <= base_keys  # the original names, nothing new
    from safetensors.torch import load_file

    copy = load_file(out / "salmonn.safetensors")
    assert copy.keys() == raw["model"].keys() and all(torch.equal(copy[k], raw["model"][k]) for k in copy)
    report = json.loads((out / "finetune.json").read_text())
    assert report["steps"] == 12 and report["first_loss"] == run.result.first_loss
    assert report["base"]["checkpoint_sha256"] == sha256_of(tiny / "salmonn.pth")
    assert report["hyperparameters"]["lr"] == 3e-2 and len(report["data"]["train_sha256"]) == 64

    tuned, base = load(tiny, out / "salmonn.pth"), load(tiny)
    wave = espeak(SENTENCES[0])
    args = dict(max_new_tokens=6, num_beams=1)
    tuned_ids = tuned.generate(wave, "What is said?", **args).token_ids
    assert tuned_ids != base.generate(wave, "What is said?", **args).token_ids
    # --lora-scale works on it: at 0 the tuned model IS the base model (LLM and connector unchanged), at 2 and 4
    # the tuned adapter acts with its strength
    embeds = base.inputs_embeds(base.audio_tokens(wave), "What is said?")
    assert torch.equal(tuned.next_token_logits(embeds, lora_scale=0.0), base.next_token_logits(embeds, lora_scale=0.0))
    assert not torch.allclose(tuned.next_token_logits(embeds, lora_scale=2.0), tuned.next_token_logits(embeds))
    assert lora_scales(tuned.llm) == {4.0}


def test_first_step_loss_equals_model_loss(tiny, data_dir, tmp_path):
    """With LoRA dropout off (the only difference between training and `model.loss`), the first step's loss on
    one example is `model.loss` of that example at scale 4.0."""
    model = load(tiny)
    line = (data_dir / "data.jsonl").read_text().splitlines()[0]
    (data_dir / "one.jsonl").write_text(line + "\n")
    data = load_data(data_dir / "one.jsonl", tokenizer=model.tokenizer)
    example = data.train[0]
    from salmonn_cli.audio import load_audio

    expected = model.loss(load_audio(example.audio), example.instruction, example.response, lora_scale=4.0)
    config = FinetuneConfig(lr=1e-3, steps=1, grad_accum=1, lora_dropout=0.0, quant="none")
    run = run_finetune(model, data, config, tmp_path / "out", base=base_of(tiny))
    assert run.result.first_loss == expected  # bit for bit: the same graph, the same float32 math


def test_qlora_4bit_with_the_connector(tiny, data_dir, tmp_path):
    """4-bit NF4 base (bitsandbytes on CPU), connector trained too: base LLM and encoders bit-identical."""
    model = load(tiny, quant="4bit")
    from quantize import quantized_layers

    assert quantized_layers(model.llm)
    before = {name: snapshot(getattr(model, name)) for name in ("whisper", "beats", "connector", "llm")}
    data = load_data(data_dir / "data.jsonl", tokenizer=model.tokenizer)
    config = FinetuneConfig(lr=3e-2, steps=3, grad_accum=2, quant="4bit", train_connector=True)
    run = run_finetune(model, data, config, tmp_path / "out", base=base_of(tiny))
    assert run.result.final_loss < run.result.first_loss, run.result.losses
    assert changed(before["whisper"], model.whisper) == changed(before["beats"], model.beats) == set()
    # every connector tensor with a gradient moves (with one query per window, self-attention's query and key
    # cannot matter: a softmax over one position is 1)
    moved = changed(before["connector"], model.connector)
    assert {"query_tokens", "ln_speech.weight", "ln_audio.bias", "proj.weight"} <= moved
    lora = {k for k in before["llm"] if ".lora_A." in k or ".lora_B." in k}
    assert changed(before["llm"], model.llm) == lora
    tuned = read_salmonn_checkpoint(tmp_path / "out" / "salmonn.pth")
    assert torch.equal(tuned.connector["proj.weight"], model.connector.proj.weight.detach())
    load(tiny, tmp_path / "out" / "salmonn.pth")  # loads as any SALMONN checkpoint


def test_a_used_folder_needs_resume_and_resume_needs_the_same_settings(trained, tiny, data_dir):
    model, _, _, out = trained
    from salmonn_cli.errors import UsageError

    data = load_data(data_dir / "data.jsonl", tokenizer=model.tokenizer)
    with pytest.raises(UsageError, match="already holds a fine-tuning run"):
        run_finetune(model, data, FinetuneConfig(quant="none"), out, base=base_of(tiny))
    other = FinetuneConfig(lr=1e-2, steps=12, batch_size=2, grad_accum=2, quant="none")
    with pytest.raises(UsageError, match="lr 0.03 -> 0.01"):
        run_finetune(model, data, other, out, base=base_of(tiny), resume=True)


# -- the command: resume after SIGKILL, Ctrl-C, make-data -------------------------------------------------------
def train_args(tiny: Path, data_dir: Path, out: Path, *extra) -> list:
    return ["finetune", "--few-shot", data_dir / "data.jsonl", "-o", out, "--model", tiny / "model.toml", "--offline",
            "--quant", "none", "--steps", "8", "--save-every", "2", "--lr", "3e-2", "--seed", "3", *extra]  # fmt: skip


def run_until(args: list, line_prefix: str, sig: int) -> tuple[int, str]:
    """Start the command, send `sig` once a stderr line starts with `line_prefix`; (exit code, all stderr)."""
    proc = subprocess.Popen(salmonn_command(*args), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    watchdog = threading.Timer(180, proc.kill)
    watchdog.start()
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if line.startswith(line_prefix):
                proc.send_signal(sig)
                break
        seen.extend(proc.stderr)
        return proc.wait(), "".join(seen)
    finally:
        watchdog.cancel()


@pytest.fixture(scope="module")
def uninterrupted(tiny, data_dir, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("straight") / "out"
    result = run_cli(*train_args(tiny, data_dir, out))
    assert result.returncode == 0, result.stderr
    return torch.load(out / "salmonn.pth", weights_only=True)["model"]


def assert_same_tensors(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    assert [k for k in got if not torch.equal(got[k], expected[k])] == []


def test_killed_run_resumes_to_exactly_the_uninterrupted_weights(uninterrupted, tiny, data_dir, tmp_path):
    kill_at = random.Random(0).randint(3, 7)  # a step after the first save (step 2), before the end
    out = tmp_path / "out"
    code, stderr = run_until(train_args(tiny, data_dir, out), f"step {kill_at}/8", signal.SIGKILL)
    assert code == -signal.SIGKILL, stderr
    assert (out / "state.pt").is_file() and not (out / "salmonn.pth").exists()  # nothing looks complete
    saved = torch.load(out / "state.pt", weights_only=True)["step"]
    assert saved in (2, 4, 6) and saved <= kill_at
    resumed = run_cli(*train_args(tiny, data_dir, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"step {saved + 1}/8" in resumed.stderr and f"step {saved}/8" not in resumed.stderr
    assert_same_tensors(torch.load(out / "salmonn.pth", weights_only=True)["model"], uninterrupted)


@pytest.mark.parametrize(("sig", "expected"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_saves_exits_and_resumes_to_the_same_weights(uninterrupted, tiny, data_dir, tmp_path, sig,
                                                                         expected):  # fmt: skip
    out = tmp_path / "out"
    code, stderr = run_until(train_args(tiny, data_dir, out), "step 1/8", sig)
    assert code == expected, stderr
    assert "--resume" in stderr and "Traceback" not in stderr and not (out / "salmonn.pth").exists()
    assert torch.load(out / "state.pt", weights_only=True)["step"] >= 1
    resumed = run_cli(*train_args(tiny, data_dir, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_tensors(torch.load(out / "salmonn.pth", weights_only=True)["model"], uninterrupted)


def test_make_data_writes_examples_the_validator_accepts(tiny, data_dir, tokenizer):
    out = data_dir / "made" / "made.jsonl"
    clips = [data_dir / "clips" / "c0.wav", data_dir / "clips" / "c1.wav"]
    result = run_cli("finetune", "make-data", *clips, "-n", "3", "--temperature", "0.8", "--seed", "0", "--beams", "1",
                     "--max-new-tokens", "12", "-o", out, "--model", tiny / "model.toml", "--offline")  # fmt: skip
    assert result.returncode == 0, result.stderr
    examples, problems = read_examples(out, tokenizer=tokenizer)
    assert problems == [] and len(examples) == 3
    assert [e.audio.name for e in examples] == ["c0.wav", "c1.wav", "c0.wav"]
    assert json.loads(out.read_text().splitlines()[0])["audio"] == "../clips/c0.wav"
    assert {e.instruction for e in examples} == {salmonn_cli.prompt.TASK_INSTRUCTIONS["story"]}


def test_make_data_refuses_repeating_a_deterministic_answer():
    from salmonn_cli.errors import UsageError

    with pytest.raises(UsageError, match="--temperature"):
        plan_inputs([Path("a.wav")], 2, sampling=False)
    assert plan_inputs([Path("a.wav"), Path("b.wav")], 3, sampling=True) == ([Path("a.wav"), Path("b.wav")] * 2)[:3]


def test_training_refuses_the_inference_only_torchao_backend():
    from salmonn_cli.errors import UsageError

    with pytest.raises(UsageError, match="torchao's kernels are for inference"):
        FinetuneConfig(quant_backend="torchao")
    assert FinetuneConfig(quant_backend="quanto").quant_backend == "quanto"


def test_two_processes_of_batch_one_reach_one_process_of_batch_two(tiny, data_dir, tmp_path):
    """torchrun, 2 ranks on gloo, each a batch of 1 per step: the weights of one process with batches of 2 (the
    gradients summed over the ranks by their answer tokens). Dropout off: each rank would draw its own masks. A
    small learning rate: Adam divides by the root of the squared gradients, which magnifies the last-bit
    differences of a padded batch of 2 against two unpadded rows in the weights of a few near-zero gradients."""
    step = ["--steps", "4", "--grad-accum", "1", "--lora-dropout", "0", "--lr", "1e-3"]
    one = run_cli(*train_args(tiny, data_dir, tmp_path / "one", *step, "--batch-size", "2"))
    assert one.returncode == 0, one.stderr
    per_rank = train_args(tiny, data_dir, tmp_path / "two", *step, "--batch-size", "1")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
              "salmonn_cli", *map(str, per_rank)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(launch, capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr
    assert two.stderr.count("done: 4 steps") == 1  # rank 0 reports for the job
    expected = torch.load(tmp_path / "one" / "salmonn.pth", weights_only=True)["model"]
    got = torch.load(tmp_path / "two" / "salmonn.pth", weights_only=True)["model"]
    assert got.keys() == expected.keys()
    worst = max(float((got[k] - expected[k]).abs().max()) for k in got)
    assert worst < 1e-5, worst
    assert any(not torch.equal(got[k], torch.load(tiny / "salmonn.pth", weights_only=True)["model"][k])
               for k in got if "lora" in k)  # fmt: skip  # it trained
    losses = [json.loads((tmp_path / run / "finetune.json").read_text())["losses"] for run in ("one", "two")]
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)  # each step's loss: the mean over both ranks' answers
    resumed_alone = run_cli(*train_args(tiny, data_dir, tmp_path / "two", *step, "--batch-size", "1", "--resume"))
    assert resumed_alone.returncode == 2 and "processes 2 -> 1" in resumed_alone.stderr


def _torchrun_finetune(tiny: Path, data_dir: Path, out: Path, *extra) -> list[str]:
    args = train_args(tiny, data_dir, out, "--steps", "20", "--grad-accum", "1", "--lora-dropout", "0", *extra)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
            "salmonn_cli", *map(str, args)]  # fmt: skip


def test_a_two_process_run_killed_after_a_save_resumes_to_the_same_weights(tiny, data_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = subprocess.run(_torchrun_finetune(tiny, data_dir, tmp_path / "straight"), capture_output=True,
                              text=True, timeout=300, env=env)  # fmt: skip
    assert straight.returncode == 0, straight.stderr
    out = tmp_path / "killed"
    launcher = subprocess.Popen(_torchrun_finetune(tiny, data_dir, out), stderr=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, text=True, env=env)  # fmt: skip

    def kill_all() -> None:  # the ranks run in sessions of their own: each is killed by its pid
        for pid in [*rank_pids(launcher).values(), launcher.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    watchdog = threading.Timer(300, kill_all)
    watchdog.start()
    try:
        for line in launcher.stderr:
            if line.startswith("saved state at step 2"):
                kill_all()  # both ranks and the launcher, at once
                break
        launcher.wait()
    finally:
        watchdog.cancel()
    assert launcher.returncode != 0 and (out / "state.pt").is_file() and not (out / "salmonn.pth").exists()
    saved = torch.load(out / "state.pt", weights_only=False)["step"]  # 2, or a later save the kill came after
    assert 2 <= saved < 20
    resumed = subprocess.run(_torchrun_finetune(tiny, data_dir, out, "--resume"), capture_output=True, text=True,
                             timeout=300, env=env)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    steps = [line.split()[1] for line in resumed.stderr.splitlines() if line.startswith("step ")]
    assert steps == [f"{k}/20" for k in range(saved + 1, 21)]  # it went on from the saved step, not from 0
    assert_same_tensors(torch.load(out / "salmonn.pth", weights_only=True)["model"],
                        torch.load(tmp_path / "straight" / "salmonn.pth", weights_only=True)["model"])  # fmt: skip
