"""Audio in: any file soundfile or PyAV reads, any rate, any channel count -> 16 kHz mono float32.

Constants carry their units in their names. The model sees at most one window of audio; cutting longer
audio into windows is the caller's business (see `model_window`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import AudioError, DependencyError
from .stop import stop_deferred
from .window import MIN_SAMPLES, SAMPLE_RATE, WINDOW_SAMPLES, WINDOW_SECONDS  # noqa: F401  (re-exported)

# Containers and codecs libsndfile never reads: go straight to PyAV (soundfile would only fail slowly).
PYAV_SUFFIXES = frozenset(
    {".m4a", ".mp4", ".m4b", ".aac", ".webm", ".mkv", ".mka", ".mov", ".opus", ".wma", ".3gp", ".amr", ".ac3"}
)


def load_audio(path: str | Path) -> np.ndarray:
    """Read an audio file and return it as a 1-D float32 array at 16 kHz, channels averaged to mono.

    soundfile first (wav, flac, ogg, mp3, ...); what it cannot read (m4a, mp4, aac, webm, mkv, opus, ...) is
    decoded with PyAV, an optional extra. Resampling uses soxr (HQ) in both cases.
    Raises AudioError for a missing, unreadable or empty file, DependencyError when PyAV is needed but missing.
    """
    path = Path(path)
    if not path.exists() or path.is_dir():  # not is_file(): named pipes and /dev/fd/N streams are welcome
        raise AudioError(f"audio file not found: {path}")
    if path.suffix.lower() in PYAV_SUFFIXES:
        samples, rate = _read_pyav(path)
    else:
        try:
            samples, rate = _read_soundfile(path)
        except AudioError as soundfile_failed:
            if not has_pyav():
                raise
            try:  # e.g. opus in ogg with an old libsndfile, or an mp4 named .ogg
                samples, rate = _read_pyav(path)
            except AudioError:
                raise soundfile_failed from None  # libsndfile's reason is the clearer one
    if samples.shape[0] == 0:
        raise AudioError(f"audio file has no samples: {path}")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    return resample(mono, rate)


class _StderrSilencer:
    """Native decoders' own stderr lines (libsndfile's mpg123: "Note: Illegal Audio-MPEG-Header ...") go nowhere:
    they write to descriptor 2 from C, past Python's sys.stderr, so the descriptor itself is pointed at /dev/null
    while any thread decodes, and back when the last one is done; what they mean reaches the user as our one line.

    Reference-counted under a lock: with two threads each saving and restoring descriptor 2 themselves, the one
    that started second would save /dev/null and, finishing last, leave it there for good (a server decodes
    several uploads at once). A Ctrl-C or SIGTERM is held while descriptor 2 is switched either way: landing
    between the switch and the `try`, it would leave it at /dev/null, and the stop's summary would vanish.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._saved: int | None = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        entered = False
        try:
            with stop_deferred():  # a stop asked for here is raised once `entered` is set: the finally undoes it
                with self._lock:
                    if self._depth == 0:
                        self._saved = _point_stderr_at_null()
                    self._depth += 1
                entered = True
            yield
        finally:
            if entered:
                with stop_deferred(), self._lock:
                    self._depth -= 1
                    if self._depth == 0 and self._saved is not None:
                        os.dup2(self._saved, 2)
                        os.close(self._saved)
                        self._saved = None


def _point_stderr_at_null() -> int | None:
    """Descriptor 2 to /dev/null; a copy of what it was (None: there is no usable descriptor 2, e.g. embedded)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        return None
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
    return saved


decoder_chatter_silenced = _StderrSilencer()  # `with decoder_chatter_silenced():` around a native decoder's call


def _read_soundfile(path: Path) -> tuple[np.ndarray, int]:
    """(samples (T, channels) float32, rate Hz) via soundfile; AudioError when libsndfile cannot read it."""
    import soundfile as sf

    try:
        with decoder_chatter_silenced():
            samples, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (T, channels)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioError(f"cannot read audio file {path}: {soundfile_reason(exc)}") from None
    return samples, rate


def soundfile_reason(exc: Exception) -> str:
    """libsndfile's reason in one line, or a true one where libsndfile's is not: for data it cannot recognise it
    says "File does not exist or is not a regular file (possibly a pipe?)" of a file that is both."""
    reason = " ".join(str(exc).split())  # libsndfile's messages span lines; ours are one line
    if "does not exist or is not a regular file" in reason or "Format not recognised" in reason:
        return "not an audio format we can read"
    return reason.split("': ", 1)[-1]  # without "Error opening '<path>'", which our line already names


def has_pyav() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def import_av(path: Path):
    """The av module, or a one-sentence DependencyError naming the file type and what to install."""
    try:
        import av
    except ImportError:
        kind = f"{path.suffix.lower()} files" if path.suffix else f"{path.name}"
        raise DependencyError(f"reading {kind} needs PyAV: pip install av") from None
    return av


def _read_pyav(path: Path) -> tuple[np.ndarray, int]:
    """(samples (T, channels) float32, rate Hz) of the first audio stream, decoded with PyAV (FFmpeg).

    Only the sample format is converted here (to planar float); channels are averaged and the rate changed by
    the caller, exactly as for soundfile, so both paths give the same result for the same audio.
    """
    av = import_av(path)
    chunks: list[np.ndarray] = []  # each (channels, n)
    rate = 0
    try:
        with decoder_chatter_silenced(), av.open(str(path)) as container:
            streams = [s for s in container.streams if s.type == "audio"]
            if not streams:
                raise AudioError(f"cannot read audio file {path}: it has no audio stream")
            converter = av.AudioResampler(format="fltp")  # layout and rate: those of the first frame
            for frame in container.decode(streams[0]):
                for out in converter.resample(frame):
                    rate = out.sample_rate
                    chunks.append(out.to_ndarray())
            chunks += [out.to_ndarray() for out in converter.resample(None)]  # flush
    except (av.FFmpegError, OSError, ValueError, EOFError) as exc:
        raise AudioError(f"cannot read audio file {path}: {av_reason(exc)}") from None
    if not chunks:
        return np.zeros((0, 1), np.float32), rate or SAMPLE_RATE
    return np.ascontiguousarray(np.concatenate(chunks, axis=1).T, dtype=np.float32), rate  # (T, channels)


def duration_seconds(path: str | Path) -> float | None:
    """The length of an audio file in seconds from its header (cheap: nothing decoded); None if unknown.

    For progress and ETA only: compressed formats may differ from the decoded length by codec padding.
    """
    path = Path(path)
    if not path.exists() or path.is_dir():  # not is_file(): named pipes and /dev/fd/N streams are welcome
        raise AudioError(f"audio file not found: {path}")
    if path.suffix.lower() not in PYAV_SUFFIXES:
        import soundfile as sf

        try:
            with decoder_chatter_silenced():
                info = sf.info(str(path))
            return info.frames / info.samplerate if info.samplerate else None
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
            if not has_pyav():
                raise AudioError(f"cannot read audio file {path}: {soundfile_reason(exc)}") from None
    av = import_av(path)
    try:
        with av.open(str(path)) as container:
            return None if container.duration is None else container.duration / av.time_base
    except (av.FFmpegError, OSError, ValueError, EOFError) as exc:
        raise AudioError(f"cannot read audio file {path}: {av_reason(exc)}") from None


def av_reason(exc: Exception) -> str:
    """FFmpeg's message without its errno and the repeated file name: "Invalid data found when processing input"."""
    return " ".join(str(getattr(exc, "strerror", None) or exc).split())


def resample(waveform: np.ndarray, rate: int) -> np.ndarray:
    """Resample a 1-D float waveform from `rate` Hz to SAMPLE_RATE with soxr; float32 out."""
    waveform = np.asarray(waveform, dtype=np.float32)
    if rate == SAMPLE_RATE:
        return np.ascontiguousarray(waveform)
    import soxr

    return soxr.resample(waveform, rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)


def model_window(waveform: np.ndarray) -> np.ndarray:
    """What the original feeds the model: zero-padded at the end to at least 1 s, then the first 30 s."""
    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim != 1:
        raise ValueError(f"expected a 1-D waveform, got shape {waveform.shape}")
    if waveform.shape[0] < MIN_SAMPLES:
        waveform = np.pad(waveform, (0, MIN_SAMPLES - waveform.shape[0]))
    return waveform[:WINDOW_SAMPLES]


SILENCE_DBFS = -50.0  # a 20 ms frame louder than this (RMS, dB re full scale) counts as audible
LOUDNESS_FRAME_S = 0.02  # loudness is judged per 20 ms frame, here and where long audio is cut
_FRAME_SAMPLES = round(LOUDNESS_FRAME_S * SAMPLE_RATE)


def is_silent(waveform: np.ndarray, threshold_dbfs: float = SILENCE_DBFS) -> bool:
    """True when no 20 ms frame of the waveform is louder than `threshold_dbfs`: nothing for the model to hear."""
    waveform = np.asarray(waveform, dtype=np.float32)
    frames = waveform[: waveform.shape[0] // _FRAME_SAMPLES * _FRAME_SAMPLES].reshape(-1, _FRAME_SAMPLES)
    if frames.shape[0] == 0:
        frames = waveform[None]
    rms = np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1))
    return bool(rms.max(initial=0.0) <= 10 ** (threshold_dbfs / 20))
