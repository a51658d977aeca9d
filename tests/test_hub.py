"""Model files and downloads, against a real HTTP server on 127.0.0.1 that speaks the Hub protocol.

Each download runs in a subprocess with HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE set, because huggingface_hub
reads them at import time: that is how a user's run sees them too.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from salmonn_cli.errors import CheckpointError, UsageError
from salmonn_cli.model_file import builtin_models, load_model_spec, with_local_components
from tests.hub_server import FakeRepo, HubServer

ROOT = Path(__file__).resolve().parents[1]


def blob(n: int, seed: int) -> bytes:
    """n deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(n)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


BEATS = blob(300_000, 1)
CKPT = blob(400_000, 2)
WHISPER = {
    "config.json": b'{"model_type": "whisper"}',
    "preprocessor_config.json": b'{"feature_size": 80}',
    "model.safetensors": blob(50_000, 3),
    "flax_model.msgpack": blob(10_000, 4),  # not in `allow`: must not be fetched
    "README.md": b"# whisper",
}
LLM = {
    "vicuna-7b/config.json": b'{"model_type": "llama"}',
    "vicuna-7b/pytorch_model-00001-of-00002.bin": blob(40_000, 5),
    "vicuna-7b/pytorch_model-00002-of-00002.bin": blob(20_000, 6),
    "vicuna-7b/pytorch_model.bin.index.json": b'{"weight_map": {}}',
    "vicuna-7b/tokenizer.model": blob(5_000, 7),
    "app.py": b"print('a Space')",  # outside the folder: must not be fetched
}
ALLOWED_WHISPER = ("config.json", "preprocessor_config.json", "model.safetensors")

MODEL_TOML = f"""
name = "fake"
description = "components served by tests/hub_server.py"

[whisper]
size = 50_000
[[whisper.sources]]
repo = "openai/whisper-fake"
folder = ""
allow = {json.dumps(list(ALLOWED_WHISPER))}

[beats]
[[beats.sources]]
repo = "org/salmonn-gradio"
repo_type = "space"
file = "beats/BEATs.pt"
size = {len(BEATS)}
sha256 = "{sha256(BEATS)}"
[[beats.sources]]
repo = "mirror/encoders"
file = "BEATs.pt"
size = {len(BEATS)}
sha256 = "{sha256(BEATS)}"

[llm]
[[llm.sources]]
repo = "org/salmonn-7b-files"
repo_type = "space"
revision = "main"
folder = "vicuna-7b"
allow = ["config.json", "pytorch_model*.bin", "pytorch_model.bin.index.json", "tokenizer.model"]

[checkpoint]
[[checkpoint.sources]]
repo = "org/salmonn"
file = "salmonn.pth"
sha256 = "{sha256(CKPT)}"

[settings]
qformer_heads = 4

[sizes]
llm_params = 1_000
whisper_encoder_params = 100
beats_params = 10
connector_params = 1
"""


def fake_repos() -> list[FakeRepo]:
    return [
        FakeRepo("openai/whisper-fake", dict(WHISPER)),
        FakeRepo("org/salmonn-gradio", {"beats/BEATs.pt": BEATS, "README.md": b"x"}, repo_type="space"),
        FakeRepo("mirror/encoders", {"BEATs.pt": BEATS}),
        FakeRepo("org/salmonn-7b-files", dict(LLM), repo_type="space"),
        FakeRepo("org/salmonn", {"salmonn.pth": CKPT}),
    ]


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "fake.toml"
    path.write_text(MODEL_TOML, encoding="utf-8")
    return path


@pytest.fixture
def hub():
    with HubServer(fake_repos()) as server:
        yield server


@pytest.fixture
def hf_home(tmp_path) -> Path:
    return tmp_path / "hf_home"


def drive(*args: str, endpoint: str, hf_home: Path, offline_env: bool = False) -> dict:
    """Run the hub_server driver in a subprocess with a clean Hub environment; its JSON answer."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and not k.startswith(("HF_", "HUGGINGFACE")) and k != "TRANSFORMERS_OFFLINE"
    }
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(ROOT))
    env.update(NO_PROXY="127.0.0.1,localhost", HF_HUB_DISABLE_PROGRESS_BARS="1")
    if offline_env:
        env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.hub_server", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ok(answer: dict) -> dict:
    assert "ok" in answer, answer
    return answer["ok"]


def error(answer: dict) -> dict:
    assert "error" in answer, answer
    failure = answer["error"]
    assert failure["type"] == "CheckpointError" and failure["exit_code"] == 4
    assert "\n" not in failure["message"]  # one line on stderr
    return failure


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def gets(hub: HubServer, suffix: str) -> list:
    return [r for r in hub.requests if r.method == "GET" and r.path.endswith(suffix)]


# ---------------------------------------------------------------- downloads
def test_fresh_download_of_files_and_folders_fetches_only_what_is_allowed(hub, model, hf_home):
    used = ok(drive("resolve", str(model), endpoint=hub.url, hf_home=hf_home))
    assert Path(used["beats"]["path"]).read_bytes() == BEATS
    assert Path(used["checkpoint"]["path"]).read_bytes() == CKPT
    assert used["beats"]["source"] == "space org/salmonn-gradio@main:beats/BEATs.pt"
    assert all(u["downloaded"] for u in used.values())
    assert files_under(Path(used["whisper"]["path"])) == {name: WHISPER[name] for name in ALLOWED_WHISPER}
    llm = Path(used["llm"]["path"])
    assert llm.name == "vicuna-7b"
    assert files_under(llm) == {k.removeprefix("vicuna-7b/"): v for k, v in LLM.items() if k != "app.py"}
    assert str(hf_home) in used["checkpoint"]["path"]  # huggingface_hub's own cache, under HF_HOME
    assert not gets(hub, "flax_model.msgpack") and not gets(hub, "app.py")
    assert [r.path for r in gets(hub, "/beats/BEATs.pt")] == ["/spaces/org/salmonn-gradio/resolve/main/beats/BEATs.pt"]
    # the sha256 verdict is remembered next to the blob, keyed by its path, size and mtime
    real = Path(os.path.realpath(used["checkpoint"]["path"]))
    marker = json.loads(real.with_name(real.name + ".sha256-ok").read_text())
    assert marker == {"path": str(real), "size": len(CKPT), "mtime_ns": real.stat().st_mtime_ns, "sha256": sha256(CKPT)}


def test_download_resumes_with_a_range_request_after_the_connection_drops(hub, model, hf_home):
    # huggingface_hub writes what it received in whole 10 MiB chunks, so only a cut past the first chunk
    # leaves anything to resume from: a 14 MiB file cut at 12 MiB.
    big, cut = blob(14 << 20, 8), 12 << 20
    hub.repos[-1].files["salmonn.pth"] = big
    model.write_text(MODEL_TOML.replace(sha256(CKPT), sha256(big)))
    hub.drop_once = {"salmonn.pth": cut}
    used = ok(drive("download", str(model), endpoint=hub.url, hf_home=hf_home))
    assert Path(used["checkpoint"]).read_bytes() == big
    first, second = gets(hub, "/salmonn.pth")
    assert first.range is None and second.range.startswith("bytes=") and second.range.endswith("-")
    assert 0 < int(second.range[len("bytes=") : -1]) <= cut


def _hub_env(endpoint: str, hf_home: Path) -> dict[str, str]:
    """The environment of a real `salmonn` run against `endpoint`, with nothing of the machine's Hub settings."""
    hub_settings = ("HF_", "HUGGINGFACE", "TRANSFORMERS_OFFLINE")
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and not k.startswith(hub_settings)}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1")
    return env


@pytest.mark.parametrize("held", ["model.safetensors", "salmonn.pth"], ids=["in a folder", "a single file"])
@pytest.mark.parametrize(("sig", "code", "word"), [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")],
                         ids=["ctrl-c", "sigterm"])  # fmt: skip
def test_a_download_stopped_mid_file_exits_at_once_and_resumes_later(hub, model, hf_home, held, sig, code, word):
    import shutil as sh
    import signal

    from tests.signals import default_sigint

    hub.hold = {held}
    command = [sh.which("salmonn"), "download", "--model", str(model)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_hub_env(hub.url, hf_home), preexec_fn=default_sigint)  # fmt: skip
    try:
        assert hub.held.wait(timeout=120), "the download never reached the held file"
        proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=30)  # at once: no worker thread keeps it alive
    finally:
        proc.kill()
        hub.released.set()
    assert proc.returncode == code, err
    assert err.rstrip().endswith(f"salmonn: {word}") and "Traceback" not in err and out == "", err
    snapshots = hf_home / "hub"
    assert not [p for p in snapshots.rglob(held) if p.is_file()], "a half file where a whole one belongs"
    again = subprocess.run(command, capture_output=True, text=True, timeout=120, env=_hub_env(hub.url, hf_home))
    assert again.returncode == 0, again.stderr
    paths = dict(line.split("\t") for line in again.stdout.splitlines())
    assert Path(paths["checkpoint"]).read_bytes() == CKPT
    assert (Path(paths["whisper"]) / "model.safetensors").read_bytes() == WHISPER["model.safetensors"]


def test_a_missing_repo_falls_back_to_the_next_source_and_says_which(hub, model, hf_home):
    hub.missing = {"org/salmonn-gradio"}
    used = ok(drive("resolve", str(model), endpoint=hub.url, hf_home=hf_home))
    assert used["beats"]["source"] == "model mirror/encoders@main:BEATs.pt"
    assert Path(used["beats"]["path"]).read_bytes() == BEATS
    assert any(r.path.startswith("/api/spaces/org/salmonn-gradio/") for r in hub.requests)
    assert [r.path for r in gets(hub, "BEATs.pt")] == ["/mirror/encoders/resolve/main/BEATs.pt"]


def test_every_source_failing_names_each_source_and_its_reason(hub, model, hf_home):
    hub.missing = {"org/salmonn-gradio", "mirror/encoders"}
    message = error(drive("resolve", str(model), endpoint=hub.url, hf_home=hf_home))["message"]
    assert "could not download the beats component from any source" in message
    assert "space org/salmonn-gradio@main:beats/BEATs.pt: repository not found" in message
    assert "model mirror/encoders@main:BEATs.pt: repository not found" in message


def test_a_hub_answering_malformed_json_is_a_download_failure_naming_the_source(hub, model, hf_home):
    hub.malformed = {"org/salmonn-gradio", "mirror/encoders"}  # both of beats' sources
    failure = error(drive("resolve", str(model), endpoint=hub.url, hf_home=hf_home))
    assert "could not download the beats component from any source" in failure["message"]
    assert "space org/salmonn-gradio@main:beats/BEATs.pt: a malformed answer from the Hub" in failure["message"]


def test_wrong_bytes_fail_the_sha256_check_with_both_hashes(hub, model, hf_home):
    hub.corrupt = {"salmonn.pth"}
    message = error(drive("resolve", str(model), endpoint=hub.url, hf_home=hf_home))["message"]
    wrong = sha256(bytes(b ^ 0xFF for b in CKPT))
    assert f"has sha256 {wrong}, expected {sha256(CKPT)}" in message
    assert "the download is corrupt: delete it with `rm " in message
    assert f"run `salmonn download --model {model}` again" in message


def test_a_file_changed_after_verification_is_hashed_again(hub, model, hf_home):
    used = ok(drive("resolve", str(model), endpoint=hub.url, hf_home=hf_home))
    real = Path(os.path.realpath(used["beats"]["path"]))
    real.chmod(0o644)
    real.write_bytes(BEATS[:-1] + bytes([BEATS[-1] ^ 1]))  # same size, new mtime
    message = error(drive("resolve", str(model), "--offline", endpoint=hub.url, hf_home=hf_home))["message"]
    assert "beats file beats/BEATs.pt" in message and "sha256" in message


def test_offline_with_a_cache_works_without_contacting_the_server(hub, model, hf_home):
    first = ok(drive("download", str(model), endpoint=hub.url, hf_home=hf_home))
    hub.requests.clear()
    by_env = ok(drive("resolve", str(model), endpoint=hub.url, hf_home=hf_home, offline_env=True))
    by_flag = ok(drive("resolve", str(model), "--offline", endpoint=hub.url, hf_home=hf_home))
    assert {k: v["path"] for k, v in by_env.items()} == {k: v["path"] for k, v in by_flag.items()} == first
    assert not any(v["downloaded"] for v in by_env.values())
    assert hub.requests == []


def test_a_cached_model_is_used_online_without_any_request(hub, model, hf_home):
    ok(drive("download", str(model), endpoint=hub.url, hf_home=hf_home))
    hub.requests.clear()
    ok(drive("resolve", str(model), endpoint=hub.url, hf_home=hf_home))
    assert hub.requests == []


def test_offline_without_a_cache_says_what_to_run(hub, model, hf_home):
    message = error(drive("resolve", str(model), endpoint=hub.url, hf_home=hf_home, offline_env=True))["message"]
    assert message == (
        "the whisper component (model openai/whisper-fake@main:/) is not in the cache and offline mode is on:"
        f" run `salmonn download --model {model}` while online"
    )
    assert hub.requests == []


def test_not_downloading_reports_what_is_missing(hub, model, hf_home):
    message = error(drive("resolve", str(model), "--no-download", endpoint=hub.url, hf_home=hf_home))["message"]
    assert "is not downloaded yet: run `salmonn download --model" in message
    assert hub.requests == []


def test_an_unreachable_hub_fails_fast_with_the_endpoint(model, hf_home):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    message = error(drive("resolve", str(model), endpoint=endpoint, hf_home=hf_home))["message"]
    assert message.startswith(f"cannot reach the Hub (HF_ENDPOINT={endpoint}) to download the whisper component")


def test_cache_status_reports_cached_components_and_their_size(hub, model, hf_home):
    before = ok(drive("status", str(model), endpoint=hub.url, hf_home=hf_home))
    assert [s["name"] for s in before] == ["whisper", "beats", "llm", "checkpoint"]
    assert not any(s["cached"] for s in before) and all(s["size_bytes"] == 0 for s in before)
    assert [s["expected_bytes"] for s in before] == [50_000, len(BEATS), None, None]
    hub.missing = {"org/salmonn-gradio"}
    ok(drive("download", str(model), endpoint=hub.url, hf_home=hf_home))
    hub.requests.clear()
    after = {s["name"]: s for s in ok(drive("status", str(model), endpoint=hub.url, hf_home=hf_home))}
    assert all(s["cached"] for s in after.values())
    assert after["whisper"]["size_bytes"] == sum(len(WHISPER[n]) for n in ALLOWED_WHISPER)
    assert after["beats"] == {
        "name": "beats",
        "source": "model mirror/encoders@main:BEATs.pt",
        "cached": True,
        "size_bytes": len(BEATS),
        "expected_bytes": len(BEATS),
    }
    assert after["llm"]["size_bytes"] == sum(len(v) for k, v in LLM.items() if k != "app.py")
    assert after["checkpoint"]["size_bytes"] == len(CKPT)
    assert hub.requests == []


def test_local_components_are_checked_and_need_no_hub(tmp_path, hf_home):
    for folder in ("whisper", "llm"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text("{}")
        (tmp_path / folder / "model.safetensors").write_bytes(b"x")
    (tmp_path / "beats.pt").write_bytes(b"b")
    text = (
        MODEL_TOML.split("[whisper]")[0]
        + "\n".join(
            f'{role} = {{ path = "{name}" }}'
            for role, name in [("whisper", "whisper"), ("beats", "beats.pt"), ("llm", "llm"), ("checkpoint", "c.pth")]
        )
        + "\n[sizes]"
        + MODEL_TOML.split("[sizes]")[1]
    )
    (tmp_path / "local.toml").write_text(text)
    endpoint = "http://127.0.0.1:9"  # never contacted
    message = error(drive("resolve", str(tmp_path / "local.toml"), endpoint=endpoint, hf_home=hf_home))["message"]
    assert message == f"the checkpoint file {tmp_path / 'c.pth'} does not exist or is not a file"
    (tmp_path / "c.pth").write_bytes(b"c")
    used = ok(drive("resolve", str(tmp_path / "local.toml"), endpoint=endpoint, hf_home=hf_home))
    assert used["llm"] == {"path": str(tmp_path / "llm"), "source": "local", "downloaded": False}
    assert not hf_home.exists()


# ---------------------------------------------------------------- model files
def test_builtin_models_carry_the_published_facts():
    assert builtin_models() == ["salmonn-13b", "salmonn-7b"]
    big, small = load_model_spec("salmonn-13b"), load_model_spec("salmonn-7b")
    assert big.checkpoint.sources[0].sha256 == "709c665b25ef05b48985584ec31d6f15018b754abf47b9c33ed9a278285bbae0"
    assert big.checkpoint.sources[0].size == 400_466_533
    assert [s.repo for s in big.beats.sources] == ["tsinghua-ee/SALMONN-7B-gradio", "THUdyh/Ola_speech_encoders"]
    assert big.beats.sources[0].repo_type == "space"
    assert {s.sha256 for s in big.beats.sources} == {"e5815275a04b6885e7b8af63d120b29bffae2cd2225cf4915e1ec6d819d3022c"}
    assert big.llm.sources[0].repo == "lmsys/vicuna-13b-v1.1" and small.llm.sources[0].repo == "lmsys/vicuna-7b-v1.5"
    assert small.checkpoint.sources[0].file == "salmonn_7b_v0.pth" and small.checkpoint.sources[0].size is None
    for spec in (big, small):
        assert spec.model_arg == spec.name and spec.settings.lora_scale == 4.0 and spec.settings.qformer_heads == 12
        assert spec.settings.prompt_template == "USER: {}\nASSISTANT:"
        assert spec.whisper.sources[0].allow_patterns() == list(ALLOWED_WHISPER)
    assert (big.sizes.llm_params, small.sizes.llm_params) == (13_015_864_320, 6_738_415_616)


def test_unknown_model_names_and_missing_files_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="unknown model 'salmonn-99b': choose one of salmonn-13b, salmonn-7b"):
        load_model_spec("salmonn-99b")
    with pytest.raises(UsageError, match="does not exist"):
        load_model_spec(str(tmp_path / "nope.toml"))


@pytest.mark.parametrize(
    ("edit", "key", "problem"),
    [
        (lambda t: t.replace('name = "fake"', "name = 3"), "name", "expected a string, got an integer"),
        (lambda t: t.replace("sha256 =", "sha265 =", 1), "beats.sources[0].sha265", "unknown field 'sha265'"),
        (lambda t: t.replace('repo_type = "space"', 'repo_type = "spaces"', 1), "beats.sources[0].repo_type", "not"),
        (lambda t: t.replace('folder = "vicuna-7b"', 'file = "x"'), "llm.sources[0].folder", "llm is a folder"),
        (lambda t: t.replace("llm_params = 1_000\n", ""), "sizes.llm_params", "required field is missing"),
        (lambda t: t.replace("[beats]", '[beats]\npath = "b.pt"'), "beats.path", "not both"),
        (lambda t: t.replace("qformer_heads = 4", 'prompt_template = "no slot"'), "settings.prompt_template", "{}"),
        (lambda t: t.replace("name =", "name = = "), None, "not valid TOML"),
    ],
)
def test_malformed_model_files_name_the_file_and_the_field(tmp_path, edit, key, problem):
    path = tmp_path / "bad.toml"
    path.write_text(edit(MODEL_TOML))
    with pytest.raises(CheckpointError) as caught:
        load_model_spec(str(path))
    assert caught.value.path == str(path) and caught.value.key == key
    assert problem in str(caught.value) and "\n" not in str(caught.value)


def test_local_overrides_replace_hub_components(tmp_path, model):
    spec = with_local_components(load_model_spec(str(model)), checkpoint=tmp_path / "mine.pth", llm=None)
    assert spec.checkpoint.path == tmp_path / "mine.pth" and not spec.checkpoint.sources
    assert spec.llm.sources and spec.model_arg == str(model)
