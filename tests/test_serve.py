"""`salmonn serve`: the real server in a subprocess on tiny components, driven by the real openai SDK and raw HTTP.

Two servers: `server` as a user starts it (an alias `whisper-1`, the CLI's decoding defaults), and `guarded` with
an API key, a queue of one and small limits. Answers are compared with the CLI's own for the same audio and
settings. Every wait has a deadline; everything is on 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import threading
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
import srt
import webvtt

from tests.serve_process import ServeProcess
from tests.speech import long_speech, make_speech
from tests.test_cli_tasks import json_lines, salmonn

SERVER_DECODE = ["--max-new-tokens", "6"]  # the CLI's other defaults (4 beams, no sampling)
QUESTION = "What can you hear?"
WEB_ORIGIN = "http://localhost:3000"  # the guarded server's --cors-origin


def _model(tiny: Path) -> list[str]:
    return ["--model", str(tiny / "model.toml"), "--device", "cpu", "--quant", "none"]


@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> dict[str, Path]:
    """Short speech, long speech (several segments) and the same short speech in other containers."""
    folder = tmp_path_factory.mktemp("serve_audio")
    short, _ = make_speech(["Please bring the red box to the kitchen"], [])
    long, _ = long_speech(8)
    files = {"short": folder / "short.wav", "long": folder / "long.wav"}
    sf.write(files["short"], short, 16_000)
    sf.write(files["long"], long, 16_000)
    for fmt in ("flac", "ogg"):
        files[fmt] = folder / f"short.{fmt}"
        sf.write(files[fmt], short, 16_000)
    files["webm"] = folder / "short.webm"
    _write_webm(files["webm"], short)
    return files


def _write_webm(path: Path, waveform: np.ndarray) -> None:
    import av

    with av.open(str(path), "w", format="webm") as container:
        stream = container.add_stream("libopus", rate=48_000)
        frame = av.AudioFrame.from_ndarray((waveform[None] * 32767).astype(np.int16), format="s16", layout="mono")
        frame.sample_rate = 16_000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    process = ServeProcess(*_model(tiny), *SERVER_DECODE, "--model-alias", "whisper-1",
                           log=tmp_path_factory.mktemp("serve") / "stderr.txt")  # fmt: skip
    yield process
    assert process.stop() == 0, process.stderr()


@pytest.fixture(scope="module")
def guarded(tiny, tmp_path_factory):
    process = ServeProcess(*_model(tiny), "--max-new-tokens", "1500", "--api-key", "sesame", "--queue", "1",
                           "--max-upload-mb", "1", "--max-audio-minutes", "0.5", "--cors-origin", WEB_ORIGIN,
                           log=tmp_path_factory.mktemp("guarded") / "stderr.txt")  # fmt: skip
    yield process
    assert process.stop() == 0, process.stderr()


def client(server: ServeProcess, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def audio_message(path: Path, text: str = QUESTION) -> dict:
    sound = {"type": "input_audio", "input_audio": {"data": b64(path), "format": "wav"}}
    return {"role": "user", "content": [{"type": "text", "text": text}, sound]}


def assert_openai_error(response: httpx.Response, status: int, code: str | None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and "Traceback" not in error["message"]
    assert error["code"] == code and error["param"] == param, error
    assert response.headers["x-should-retry"] == ("true" if status == 503 else "false")
    return error


# -- models, health, the one stdout line -----------------------------------------------------------------------------
def test_health_models_and_the_one_line(server):
    health = server.health()
    assert health["status"] == "ok" and health["model"] == "tiny"
    api = client(server)
    assert [m.id for m in api.models.list()] == ["tiny", "whisper-1"]
    assert api.models.retrieve("whisper-1").owned_by == "salmonn"
    with pytest.raises(openai.NotFoundError) as caught:
        api.models.retrieve("gpt-4o")
    assert caught.value.code == "model_not_found"
    assert server.stdout_lines == [f"listening on {server.url}"]


# -- transcription: every format equals the CLI's -----------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_transcript(tiny, audio) -> dict:
    """What `salmonn transcribe` says of the long file with the server's settings: json (text, segments) and srt."""
    args = ["transcribe", str(audio["long"]), *_model(tiny), *SERVER_DECODE]
    as_json = salmonn(*args, "-f", "json")
    as_srt = salmonn(*args, "-f", "srt")
    assert as_json.returncode == 0 and as_srt.returncode == 0, as_json.stderr + as_srt.stderr
    return {"json": json_lines(as_json.stdout)[0], "srt": as_srt.stdout}


def test_transcription_formats_equal_the_cli(server, audio, cli_transcript):
    api, expected = client(server), cli_transcript["json"]
    assert len(expected["segments"]) >= 2  # long audio: cut at pauses into several segments
    with audio["long"].open("rb") as f:
        as_json = api.audio.transcriptions.create(model="whisper-1", file=f)
    assert as_json.text == expected["text"]
    assert as_json.usage.seconds == np.ceil(expected["audio_seconds"])
    raw = audio["long"].read_bytes()  # raw bytes: the SDK names the part "upload"; the server sniffs the content
    text = api.audio.transcriptions.create(model="whisper-1", file=raw, response_format="text")
    assert text == expected["text"]  # a bare string, not JSON
    subtitles = api.audio.transcriptions.create(model="tiny", file=raw, response_format="srt")
    assert subtitles.strip() == cli_transcript["srt"].strip()
    assert [c.content for c in srt.parse(subtitles)] == [s["text"] for s in expected["segments"] if s["text"]]
    vtt = api.audio.transcriptions.create(model="tiny", file=raw, response_format="vtt")
    cues = webvtt.from_string(vtt)
    spoken = [s for s in expected["segments"] if s["text"]]
    assert [(_seconds(c.start), _seconds(c.end)) for c in cues] == [
        (pytest.approx(s["start"], abs=1e-3), pytest.approx(s["end"], abs=1e-3)) for s in spoken]  # fmt: skip
    verbose = api.audio.transcriptions.create(model="tiny", file=raw, response_format="verbose_json",
                                              timestamp_granularities=["segment"])  # fmt: skip
    assert verbose.text == expected["text"] and verbose.duration == pytest.approx(expected["audio_seconds"])
    assert [(s.start, s.end, s.text) for s in verbose.segments] == [
        (pytest.approx(s["start"], abs=1e-3), pytest.approx(s["end"], abs=1e-3), s["text"])
        for s in spoken]  # fmt: skip
    for index, segment in enumerate(verbose.model_dump()["segments"]):
        assert segment["id"] == index and isinstance(segment["seek"], int)
        assert all(isinstance(t, int) for t in segment["tokens"]) and segment["tokens"]
        assert {"temperature", "avg_logprob", "compression_ratio", "no_speech_prob"} <= set(segment)


def _seconds(stamp: str) -> float:
    hours, minutes, seconds = stamp.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def test_granularity_as_curl_sends_it_and_languages(server, audio):
    files = {"file": ("talk.wav", audio["short"].read_bytes())}
    plain = httpx.post(f"{server.url}/v1/audio/transcriptions", files=files, timeout=60,
                       data={"model": "tiny", "response_format": "verbose_json", "timestamp_granularities": "segment",
                             "language": "de"})  # fmt: skip
    assert plain.status_code == 200 and plain.json()["language"] == "german"
    assert plain.headers["x-request-id"].startswith("req_")


def test_any_container_is_read_by_its_content(server, audio):
    api = client(server)
    expected = api.audio.transcriptions.create(model="tiny", file=audio["short"].read_bytes(), response_format="text")
    for fmt in ("flac", "ogg", "webm"):
        blob = ("blob", audio[fmt].read_bytes())  # what browsers send: no suffix
        text = api.audio.transcriptions.create(model="tiny", file=blob, response_format="text")
        assert isinstance(text, str), fmt
        if fmt == "flac":  # lossless: the very same samples
            assert text == expected


def test_translation_into_english_and_into_another_language(server, audio, tiny):
    api = client(server)
    raw = audio["short"].read_bytes()
    verbose = api.audio.translations.create(model="whisper-1", file=raw, response_format="verbose_json")
    assert verbose.language == "english" and verbose.segments
    german = api.audio.translations.create(model="tiny", file=raw, extra_body={"to_language": "German"})
    cli = salmonn("translate", str(audio["short"]), "--to", "German", *_model(tiny), *SERVER_DECODE, "-f", "json")
    assert cli.returncode == 0, cli.stderr
    assert german.text == json_lines(cli.stdout)[0]["text"]


def test_transcription_streams(server, audio):
    api = client(server)
    whole = api.audio.transcriptions.create(model="tiny", file=audio["long"].read_bytes()).text
    for beams in (4, 1):  # beams: a delta per decoded segment; greedy: per token
        events = list(api.audio.transcriptions.create(model="tiny", file=audio["long"].read_bytes(), stream=True,
                                                      extra_body={"num_beams": beams}))  # fmt: skip
        deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
        done = events[-1]
        assert done.type == "transcript.text.done" and "".join(deltas) == done.text
        assert len(deltas) >= 2
        if beams == 4:
            assert done.text == whole
    timed = list(api.audio.transcriptions.create(model="tiny", file=audio["long"].read_bytes(), stream=True,
                                                 timestamp_granularities=["segment"]))  # fmt: skip
    segments = [(e.start, e.end, e.text) for e in timed if e.type == "transcript.text.segment"]
    verbose = api.audio.transcriptions.create(model="tiny", file=audio["long"].read_bytes(),
                                              response_format="verbose_json")  # fmt: skip
    assert segments == [(s.start, s.end, s.text) for s in verbose.segments] and len(segments) >= 2
    assert [e.id for e in timed if e.type == "transcript.text.segment"] == [f"seg_{i}" for i in range(len(segments))]
    assert timed[-1].type == "transcript.text.done" and timed[-1].text == whole
    files = {"file": ("a.wav", audio["short"].read_bytes())}
    raw = httpx.post(f"{server.url}/v1/audio/transcriptions", files=files, data={"model": "tiny", "stream": "true"},
                     timeout=60)  # fmt: skip
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert "[DONE]" not in raw.text  # OpenAI's transcript stream ends without it


# -- chat ---------------------------------------------------------------------------------------------------------
def test_chat_equals_ask_and_encodes_a_clip_once(server, audio, tiny):
    api = client(server)
    before = server.health()["encoded"]
    first = api.chat.completions.create(model="tiny", messages=[audio_message(audio["short"])])
    cli = salmonn("ask", str(audio["short"]), QUESTION, *_model(tiny), *SERVER_DECODE, "-f", "json")
    assert cli.returncode == 0, cli.stderr
    assert first.choices[0].message.content == json_lines(cli.stdout)[0]["text"]
    assert first.choices[0].finish_reason in ("stop", "length") and first.usage.prompt_tokens > 0
    conversation = [audio_message(audio["short"]), {"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "And what else?"}]  # fmt: skip
    follow_up = api.chat.completions.create(model="tiny", messages=conversation)  # audio from the earlier turn
    assert isinstance(follow_up.choices[0].message.content, str)
    again = api.chat.completions.create(model="tiny", messages=[audio_message(audio["short"])])
    assert again.choices[0].message.content == first.choices[0].message.content  # deterministic at temperature 0
    assert server.health()["encoded"] == before + 1  # three turns about one clip: encoded once


def test_chat_streams(server, audio):
    api = client(server)
    message = [audio_message(audio["short"])]
    whole = api.chat.completions.create(model="tiny", messages=message, extra_body={"num_beams": 1})
    chunks = list(api.chat.completions.create(model="tiny", messages=message, stream=True, extra_body={"num_beams": 1},
                                              stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len({c.id for c in chunks}) == 1
    body = {"model": "tiny", "messages": message, "stream": True}
    raw = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")
    events = [json.loads(line[6:]) for line in raw.text.splitlines() if line.startswith("data: {")]
    assert all("usage" not in e for e in events)  # not asked for: no usage key at all


def test_seeded_sampling_repeats(server, audio):
    api = client(server)
    raw = audio["short"].read_bytes()
    runs = [api.audio.transcriptions.create(model="tiny", file=raw, temperature=0.8, extra_body={"seed": 7}).text
            for _ in range(2)]  # fmt: skip
    assert runs[0] == runs[1]


def test_four_clients_at_once(server, audio):
    files = [audio["short"], audio["flac"], audio["short"], audio["flac"]]
    api = client(server)
    expected = [api.audio.transcriptions.create(model="tiny", file=f.read_bytes(), response_format="text")
                for f in files]  # fmt: skip
    answers: list[str | None] = [None] * 4

    def ask(i: int) -> None:
        answers[i] = client(server).audio.transcriptions.create(model="tiny", file=files[i].read_bytes(),
                                                                response_format="text")  # fmt: skip

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert answers == expected
    assert server.health()["max_in_flight"] == 1  # one inference at a time, the rest waited their turn


# -- bad input ----------------------------------------------------------------------------------------------------
def _wav_bytes(tmp_path: Path, seconds: float, rate: int = 16_000) -> bytes:
    path = tmp_path / "x.wav"
    sf.write(path, np.zeros(int(seconds * rate), np.float32) + 0.01, rate)
    return path.read_bytes()


BAD_UPLOADS = [  # (name, file bytes or None, form fields, status, code, param)
    ("text file", b"just some words\n" * 10, {}, 400, "invalid_audio", "file"),
    ("png", b"\x89PNG\r\n\x1a\n" + bytes(200), {}, 400, "invalid_audio", "file"),
    ("empty file", b"", {}, 400, "invalid_audio", "file"),
    ("truncated wav", b"RIFF\x24\x08\x00\x00WAVEfmt ", {}, 400, "invalid_audio", "file"),
    ("no file", None, {}, 400, "missing_required_parameter", "file"),
    ("no model", "wav", {"model": None}, 400, "missing_required_parameter", "model"),
    ("unknown model", "wav", {"model": "whisper-2"}, 404, "model_not_found", "model"),
    ("bad format", "wav", {"response_format": "xml"}, 400, "invalid_value", "response_format"),
    ("diarized", "wav", {"response_format": "diarized_json"}, 400, "invalid_value", "response_format"),
    ("hot", "wav", {"temperature": "hot"}, 400, "invalid_value", "temperature"),
    ("negative temperature", "wav", {"temperature": "-1"}, 400, "invalid_value", "temperature"),
    ("stream srt", "wav", {"stream": "true", "response_format": "srt"}, 400, "invalid_value", "stream"),
    ("word times", "wav", {"timestamp_granularities[]": "word"}, 400, "invalid_value", "timestamp_granularities"),
    ("language", "wav", {"language": "fr"}, 400, "invalid_value", "language"),
    ("beams", "wav", {"num_beams": "0"}, 400, "invalid_value", "num_beams"),
    ("file as text", "text-field", {}, 400, "invalid_value", "file"),
]


@pytest.mark.parametrize("name, data, fields, status, code, param", BAD_UPLOADS, ids=[c[0] for c in BAD_UPLOADS])
def test_bad_uploads_are_openai_errors(server, tmp_path, name, data, fields, status, code, param):
    form = {"model": "tiny", **fields}
    form = {k: v for k, v in form.items() if v is not None}
    files = None
    if data == "text-field":
        form["file"] = "not a file"
    elif data is not None:
        files = {"file": ("clip.wav", _wav_bytes(tmp_path, 1.0) if data == "wav" else data)}
    response = httpx.post(f"{server.url}/v1/audio/transcriptions", data=form, files=files, timeout=60)
    assert_openai_error(response, status, code, param)


def _chat(path: Path, **changes) -> dict:
    return {"model": "tiny", "messages": [audio_message(path)], **changes}


def test_bad_chat_requests_are_openai_errors(server, audio):
    url = f"{server.url}/v1/chat/completions"
    short = audio["short"]
    text_only = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}]}
    bad_b64 = _chat(short)
    bad_b64["messages"][0]["content"][1]["input_audio"]["data"] = "@@not base64@@"
    two = _chat(short)
    two["messages"][0]["content"].append(two["messages"][0]["content"][1])
    image = _chat(short)
    image["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}})
    url_audio = _chat(short)
    url_audio["messages"][0]["content"][1] = {"type": "audio_url", "audio_url": {"url": "https://example.com/a.wav"}}
    cases = [
        (text_only, 400, "unsupported_content", "messages"),
        (bad_b64, 400, "invalid_audio", "messages[0].content[1].input_audio.data"),
        (two, 400, "unsupported_content", "messages[0].content"),
        (image, 400, "unsupported_content", "messages[0].content[2]"),
        (url_audio, 400, "unsupported_content", "messages[0].content[1].audio_url"),
        (_chat(short, n=2), 400, "invalid_value", "n"),
        (_chat(short, temperature=3), 400, "invalid_value", "temperature"),
        (_chat(short, logprobs=True), 400, "invalid_value", "logprobs"),
        (_chat(short, model="gpt-4o"), 404, "model_not_found", "model"),
        ({"model": "tiny"}, 400, "missing_required_parameter", "messages"),
    ]
    for body, status, code, param in cases:
        assert_openai_error(httpx.post(url, json=body, timeout=60), status, code, param)
    malformed = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}, timeout=60)
    assert_openai_error(malformed, 400, "invalid_request")
    with pytest.raises(openai.BadRequestError) as caught:  # as the SDK reports it
        client(server).chat.completions.create(model="tiny", messages=text_only["messages"])
    assert caught.value.code == "unsupported_content"
    assert client(server).chat.completions.create(model="tiny", messages=[audio_message(short)]).choices  # unwedged


def test_paths_methods_and_hosts(server):
    assert_openai_error(httpx.post(f"{server.url}/v1/chat/completions/chat/completions", json={}), 404, "unknown_url")
    assert_openai_error(httpx.post(f"{server.url}/audio/transcriptions"), 404, "unknown_url")
    wrong_method = httpx.get(f"{server.url}/v1/audio/transcriptions")
    assert_openai_error(wrong_method, 405, "method_not_allowed")
    rebound = httpx.get(f"{server.url}/v1/models", headers={"Host": "evil.example"})
    assert_openai_error(rebound, 400, "invalid_host")
    other_origin = httpx.get(f"{server.url}/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other_origin.headers  # no CORS unless --cors-origin


# -- the guarded server: key, limits, queue, disconnects -----------------------------------------------------------
def test_api_key(guarded, audio):
    url = f"{guarded.url}/v1/models"
    missing = httpx.get(url)
    assert_openai_error(missing, 401, "invalid_api_key")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert_openai_error(httpx.get(url, headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
    assert httpx.get(url, headers={"Authorization": "Bearer sesame"}).status_code == 200
    assert httpx.get(f"{guarded.url}/health").status_code == 200  # health is open
    with pytest.raises(openai.AuthenticationError):
        client(guarded, "wrong").models.list()
    assert [m.id for m in client(guarded, "sesame").models.list()] == ["tiny"]


def test_cors_only_for_the_origins_given(guarded):
    url = f"{guarded.url}/v1/models"
    preflight = httpx.options(url, headers={"Origin": WEB_ORIGIN, "Access-Control-Request-Method": "GET",
                                            "Access-Control-Request-Headers": "authorization"})  # fmt: skip
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == WEB_ORIGIN
    allowed = httpx.get(url, headers={"Origin": WEB_ORIGIN, "Authorization": "Bearer sesame"})
    assert allowed.headers["access-control-allow-origin"] == WEB_ORIGIN
    other = httpx.get(url, headers={"Origin": "https://evil.example", "Authorization": "Bearer sesame"})
    assert "access-control-allow-origin" not in other.headers


def _raw_request(server: ServeProcess, head: str, body_chunks: list[bytes]) -> tuple[str, int]:
    """Send a request by hand; (the whole response, how many body bytes the server let us send)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode())
        sent = 0
        for chunk in body_chunks:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        sock.shutdown(socket.SHUT_WR)
        response = b""
        while not _complete(response):
            part = sock.recv(65536)
            if not part:
                break
            response += part
    return response.decode("latin-1"), sent


def _complete(response: bytes) -> bool:
    head, found, body = response.partition(b"\r\n\r\n")
    lengths = [line.split(b":")[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
    return bool(found) and bool(lengths) and len(body) >= int(lengths[0])


def test_oversized_uploads_are_413(guarded, tmp_path):
    auth = "Authorization: Bearer sesame\r\n"
    head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: multipart/form-data; "
            f"boundary=x\r\nContent-Length: {50 * 2**20}\r\nExpect: 100-continue\r\n\r\n")  # fmt: skip
    response, _ = _raw_request(guarded, head, [])  # no body sent: the refusal comes on the headers alone
    assert response.startswith("HTTP/1.1 413") and "request_too_large" in response
    part = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n' + b"x" * 65536
    body = [b"%x\r\n%s\r\n" % (len(part), part) for _ in range(20)] + [b"0\r\n\r\n"]  # 1.25 MiB, no length
    head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: multipart/form-data; "
            "boundary=x\r\nTransfer-Encoding: chunked\r\n\r\n")  # fmt: skip
    response, _ = _raw_request(guarded, head, body)
    assert response.startswith("HTTP/1.1 413") and "request_too_large" in response
    long_audio = _wav_bytes(tmp_path, 40.0, rate=8_000)  # 40 s: over the 0.5-minute cap, yet small
    assert len(long_audio) < 2**20
    too_long = httpx.post(f"{guarded.url}/v1/audio/transcriptions", files={"file": ("a.wav", long_audio)},
                          data={"model": "tiny"}, headers={"Authorization": "Bearer sesame"}, timeout=60)  # fmt: skip
    assert_openai_error(too_long, 413, "audio_too_long", "file")


def _slow_chat(path: Path, **changes) -> dict:
    """A chat turn that decodes 1500 tokens: seconds of work even for the tiny model."""
    return {**_chat(path, max_tokens=1500), **changes}


def test_full_queue_is_503_and_a_gone_client_stops_its_work(guarded, audio):
    headers = {"Authorization": "Bearer sesame"}
    url = f"{guarded.url}/v1/chat/completions"
    base = guarded.health()
    with httpx.Client(timeout=120, headers=headers) as http:
        # a streaming client that reads one event and goes away
        with http.stream("POST", url, json=_slow_chat(audio["short"], stream=True, num_beams=1)) as stream:
            assert stream.status_code == 200
            next(stream.iter_lines())
            guarded.wait_health(lambda h: h["busy"], "the first job running")
            queued = threading.Thread(target=lambda: http.post(url, json=_slow_chat(audio["short"])))
            queued.start()
            guarded.wait_health(lambda h: h["queue"] == 1, "a second job queued")
            full = httpx.post(url, json=_chat(audio["short"]), headers=headers, timeout=60)
            error = assert_openai_error(full, 503, "server_overloaded")
            assert int(full.headers["retry-after"]) >= 1 and "--queue" in error["message"]
        after_close = guarded.wait_health(lambda h: h["cancelled"] == base["cancelled"] + 1, "the stream's job stopped")
        assert after_close["served"] == base["served"]  # stopped, not finished
        queued.join(timeout=120)
    assert not queued.is_alive()
    assert guarded.health()["served"] == base["served"] + 1  # the queued one ran after the stopped one
    assert "499" in guarded.stderr()


def test_a_client_that_hangs_up_stops_its_work(server, audio):
    """Not a stream: the client sends its request, and closes the connection while the model is on it."""
    base = server.health()
    body = json.dumps(_slow_chat(audio["short"])).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        server.wait_health(lambda h: h["busy"], "the request running")
    stopped = server.wait_health(lambda h: h["cancelled"] == base["cancelled"] + 1 and not h["busy"],
                                 "its work stopped")  # fmt: skip
    assert stopped["served"] == base["served"]
    assert client(server).models.list().data  # and the server goes on


def test_a_busy_port_is_one_line_before_any_load(server):
    port = server.url.rsplit(":", 1)[1]
    result = subprocess.run(["salmonn", "serve", "--host", "0.0.0.0", "--port", port, "--model", "/no/such.toml"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 8, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "without --api-key" in lines[0]  # another address without a key: warned
    assert lines[-1].startswith("salmonn: error: cannot listen on 0.0.0.0:") and "in use" in lines[-1]
    assert len(lines) == 2 and result.stdout == ""


def test_stop_signals_exit_0(server, guarded, audio):
    """SIGTERM and Ctrl-C stop the server gracefully and it exits 0; work in flight is stopped and answered 503.
    (The last test: it stops both servers.)"""
    def post(url: str, headers: dict, answers: list) -> None:
        answers.append(httpx.post(url, json=_slow_chat(audio["short"]), headers=headers, timeout=120))

    key = {"Authorization": "Bearer sesame"}
    for process, sig, headers in ((server, signal.SIGTERM, {}), (guarded, signal.SIGINT, key)):
        answers: list[httpx.Response] = []
        slow = threading.Thread(target=post, args=(f"{process.url}/v1/chat/completions", headers, answers))
        slow.start()
        process.wait_health(lambda h: h["busy"], "the slow request running")
        assert process.stop(sig) == 0, process.stderr()
        slow.join(timeout=60)
        assert_openai_error(answers[0], 503, "server_shutting_down")
        assert process.stdout_lines == [f"listening on {process.url}"]
        assert "stopped" in process.stderr() and "Traceback" not in process.stderr()
