"""Audio in: formats, sample rates and channel counts to 16 kHz mono float32; padding and the 30 s window."""

from __future__ import annotations

import fractions
import os
import sys
import threading

import av
import numpy as np
import pytest
import soundfile as sf

from salmonn_cli.audio import (
    MIN_SAMPLES,
    SAMPLE_RATE,
    WINDOW_SAMPLES,
    decoder_chatter_silenced,
    duration_seconds,
    load_audio,
    model_window,
)
from salmonn_cli.errors import AudioError, DependencyError

from .reference import case_paths, load_case
from .signals import terminal_sigint


def sine(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize(
    "suffix, fmt, subtype",
    [("wav", "WAV", "PCM_16"), ("flac", "FLAC", "PCM_24"), ("ogg", "OGG", "VORBIS"), ("mp3", "MP3", "MPEG_LAYER_III")],
)
def test_formats_decode_to_16k_float32(tmp_path, suffix, fmt, subtype):
    path = tmp_path / f"clip.{suffix}"
    sf.write(path, sine(2.0, 16_000), 16_000, format=fmt, subtype=subtype)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio.shape[0] - 2 * SAMPLE_RATE) <= 0.06 * SAMPLE_RATE  # mp3 adds encoder delay/padding
    assert 0.3 < np.abs(audio).max() < 0.6


@pytest.mark.parametrize("rate", [8_000, 22_050, 44_100, 48_000])
def test_any_rate_is_resampled(tmp_path, rate):
    path = tmp_path / "clip.wav"
    sf.write(path, sine(1.5, rate, 1000.0), rate, subtype="FLOAT")
    audio = load_audio(path)
    assert audio.shape[0] == pytest.approx(1.5 * SAMPLE_RATE, abs=2)
    spectrum = np.abs(np.fft.rfft(audio))
    peak_hz = np.argmax(spectrum) * SAMPLE_RATE / audio.shape[0]
    assert peak_hz == pytest.approx(1000.0, abs=2.0)  # a real resampler keeps the pitch


def test_channels_are_averaged_to_mono(tmp_path):
    left, right = sine(1.0, 16_000, 300.0), sine(1.0, 16_000, 700.0)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 16_000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path), (left + right) / 2, atol=1e-7)


def test_16_bit_files_read_exactly_as_the_original(tmp_path):
    case = load_case(case_paths()[0])
    original, _ = sf.read(case.audio_path, dtype="float64")  # what the original reads
    ours = load_audio(case.audio_path)
    assert np.array_equal(ours.astype(np.float64), original)


def test_window_pads_short_audio_and_keeps_the_first_30_seconds():
    short = model_window(np.ones(1234, np.float32))
    assert short.shape == (MIN_SAMPLES,) and short[:1234].all() and not short[1234:].any()
    long = np.arange(WINDOW_SAMPLES + 999, dtype=np.float32)
    assert np.array_equal(model_window(long), long[:WINDOW_SAMPLES])


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match="not found") as err:
        load_audio(tmp_path / "nope.wav")
    assert err.value.exit_code == 3


def test_unreadable_file(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio")
    with pytest.raises(AudioError, match="cannot read audio file"):
        load_audio(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, np.float32), 16_000)
    with pytest.raises(AudioError, match="no samples"):
        load_audio(path)


def encode_with_pyav(path, codec: str, seconds: float = 2.0, freq: float = 440.0, rate: int = 48_000) -> None:
    """A stereo sine encoded by FFmpeg through PyAV (the container comes from the suffix)."""
    wave = sine(seconds, rate, freq)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout="stereo")
        for i in range(0, wave.shape[0], 1000):
            planes = np.ascontiguousarray(np.stack([wave[i : i + 1000]] * 2))  # (channels, n) planar float
            frame = av.AudioFrame.from_ndarray(planes, format="fltp", layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = rate, i, fractions.Fraction(1, rate)
            container.mux(stream.encode(frame))  # PyAV converts to the codec's sample format and frame size
        container.mux(stream.encode(None))


@pytest.mark.parametrize("name, codec", [("clip.m4a", "aac"), ("clip.webm", "libopus"), ("clip.ogg", "libopus")])
def test_pyav_formats_decode_to_16k_float32(tmp_path, name, codec):
    path = tmp_path / name
    encode_with_pyav(path, codec, freq=440.0)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio.shape[0] - 2 * SAMPLE_RATE) <= 0.05 * SAMPLE_RATE  # codec priming/padding only
    peak_hz = np.argmax(np.abs(np.fft.rfft(audio))) * SAMPLE_RATE / audio.shape[0]
    assert peak_hz == pytest.approx(440.0, abs=2.0)
    assert 0.4 < np.abs(audio).max() < 0.6  # channels averaged, not summed
    assert duration_seconds(path) == pytest.approx(2.0, abs=0.05)


def test_without_pyav_an_m4a_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "talk.m4a"
    encode_with_pyav(path, "aac")
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    with pytest.raises(DependencyError) as err:
        load_audio(path)
    assert str(err.value) == "reading .m4a files needs PyAV: pip install av" and err.value.exit_code == 5
    unreadable = tmp_path / "notes.wav"
    unreadable.write_text("this is not audio")
    with pytest.raises(AudioError, match="cannot read audio file"):  # not a PyAV matter: still exit 3
        load_audio(unreadable)


def test_soundfile_failures_fall_back_to_pyav(tmp_path):
    path = tmp_path / "clip.m4a"
    encode_with_pyav(path, "aac", freq=1000.0)
    renamed = path.rename(tmp_path / "clip.audio")  # a suffix that says nothing: soundfile is tried first
    audio = load_audio(renamed)
    assert abs(audio.shape[0] - 2 * SAMPLE_RATE) <= 0.05 * SAMPLE_RATE


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_m4a(tmp_path, damage):
    path = tmp_path / "broken.m4a"
    if damage == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    else:
        encode_with_pyav(path, "aac")
        path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(AudioError, match="cannot read audio file .*broken.m4a") as err:
        load_audio(path)
    assert err.value.exit_code == 3


def test_duration_from_the_header(tmp_path):
    path = tmp_path / "clip.flac"
    sf.write(path, sine(3.0, 22_050), 22_050)
    assert duration_seconds(path) == pytest.approx(3.0)
    with pytest.raises(AudioError, match="not found"):
        duration_seconds(tmp_path / "nope.wav")


def test_decoder_chatter_silencing_overlapping_in_two_threads_gives_stderr_back():
    """Thread A silences, then B, then A finishes first: descriptor 2 is /dev/null while either decodes and is the
    real stderr again when both are done (saving and restoring per thread would leave /dev/null behind)."""
    real = os.fstat(2)
    a_inside, b_inside, a_done = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, os.stat_result] = {}

    def a() -> None:
        with decoder_chatter_silenced():
            a_inside.set()
            assert b_inside.wait(10)
        a_done.set()

    def b() -> None:
        assert a_inside.wait(10)
        with decoder_chatter_silenced():
            b_inside.set()
            assert a_done.wait(10)
            seen["b, after a left"] = os.fstat(2)

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    threads[0].start()
    threads[1].start()
    for thread in threads:
        thread.join(timeout=20)
    null = os.stat(os.devnull)
    assert (seen["b, after a left"].st_ino, seen["b, after a left"].st_dev) == (null.st_ino, null.st_dev)
    after = os.fstat(2)
    assert (after.st_ino, after.st_dev) == (real.st_ino, real.st_dev)


@pytest.mark.parametrize("moment", ["as it silences", "as it restores"])
def test_a_stop_while_stderr_is_switched_still_gives_stderr_back(monkeypatch, moment):
    """A Ctrl-C landing while descriptor 2 is being pointed at /dev/null, or back, is raised once the switch is
    whole: stderr is the real one afterwards (else a stopped run's summary line would go to /dev/null)."""
    import signal

    from salmonn_cli import audio

    real = os.fstat(2)
    if moment == "as it silences":
        point = audio._point_stderr_at_null

        def interrupted_point():
            saved = point()
            signal.raise_signal(signal.SIGINT)  # the stop lands right after descriptor 2 went to /dev/null
            return saved

        monkeypatch.setattr(audio, "_point_stderr_at_null", interrupted_point)
    with terminal_sigint(), pytest.raises(KeyboardInterrupt):
        with decoder_chatter_silenced():
            if moment == "as it restores":
                dup2 = os.dup2

                def interrupted_dup2(fd, fd2):  # once: pytest's own capture calls os.dup2 too
                    monkeypatch.setattr(os, "dup2", dup2)
                    signal.raise_signal(signal.SIGINT)  # the stop lands just before descriptor 2 is put back
                    return dup2(fd, fd2)

                monkeypatch.setattr(os, "dup2", interrupted_dup2)
    after = os.fstat(2)
    assert (after.st_ino, after.st_dev) == (real.st_ino, real.st_dev)
