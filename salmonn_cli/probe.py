"""Inputs checked before any model loads: a bad file costs a second, not a model load.

`probe_audio` reads what a file is (stat) and its header (libsndfile's, else PyAV's), never its samples: it
exists, it is a regular readable file (or a pipe, which is read once, when its turn comes, and so not probed),
its container and codec open, and it has a sample rate and at least one channel.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .audio import PYAV_SUFFIXES, av_reason, decoder_chatter_silenced, has_pyav, import_av, soundfile_reason
from .errors import AudioError


@dataclass(frozen=True)
class AudioHeader:
    """What a file's header says: rate, channels and frames (None where unknown: a pipe is not read ahead, and
    PyAV's containers may not say)."""

    path: Path
    sample_rate: int | None
    channels: int | None
    frames: int | None = None


def probe_audio(path: Path) -> AudioHeader:
    """The file's header, or an AudioError whose one line says what is wrong with it."""
    kind = _file_kind(path)
    if kind == "pipe":
        return AudioHeader(path, None, None)
    header = None
    if path.suffix.lower() not in PYAV_SUFFIXES:
        try:
            header = _soundfile_header(path)
        except AudioError:
            if not has_pyav():
                raise
    header = _checked(header or _pyav_header(path))
    if header.frames == 0:
        raise AudioError(f"audio file has no samples: {path}")
    return header


def _file_kind(path: Path) -> str:
    """"file" or "pipe"; an AudioError for what cannot be read as audio at all."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise AudioError(f"audio file not found: {path}") from None
    except PermissionError:
        raise AudioError(f"cannot read {path}: permission denied") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise AudioError(f"cannot read {path}: its symbolic links loop") from None
        raise AudioError(f"cannot read {path}: {exc.strerror}") from None
    if stat.S_ISFIFO(info.st_mode):
        return "pipe"  # `<(...)`, /dev/stdin: welcome, read once when their turn comes
    if stat.S_ISDIR(info.st_mode):
        raise AudioError(f"{path} is a folder, not an audio file")
    if not stat.S_ISREG(info.st_mode):
        raise AudioError(f"{path} is a device or socket, not an audio file")
    if not os.access(path, os.R_OK):
        raise AudioError(f"cannot read {path}: permission denied")
    if info.st_size == 0:
        raise AudioError(f"audio file is empty (0 bytes): {path}")
    return "file"


def _soundfile_header(path: Path) -> AudioHeader:
    import soundfile as sf

    try:
        with decoder_chatter_silenced():
            info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioError(f"cannot decode {path}: {soundfile_reason(exc)}") from None
    return AudioHeader(path, int(info.samplerate), int(info.channels), int(info.frames))


def _pyav_header(path: Path) -> AudioHeader:
    av = import_av(path)
    try:
        with decoder_chatter_silenced(), av.open(str(path)) as container:
            streams = [s for s in container.streams if s.type == "audio"]
            if not streams:
                raise AudioError(f"cannot decode {path}: it has no audio stream")
            codec = streams[0].codec_context
            channels = getattr(codec, "channels", None) or codec.layout.nb_channels  # PyAV versions differ
            return AudioHeader(path, int(codec.sample_rate or 0), int(channels or 0))
    except (av.FFmpegError, OSError, ValueError, EOFError) as exc:
        reason = av_reason(exc)
        if isinstance(exc, EOFError) or "Invalid data found" in reason or "End of file" in reason:
            reason = "not an audio format we can read"  # FFmpeg found no container it knows in the bytes
        raise AudioError(f"cannot decode {path}: {reason}") from None


def _checked(header: AudioHeader) -> AudioHeader:
    if not header.sample_rate or header.sample_rate <= 0:
        raise AudioError(f"cannot decode {header.path}: its header gives no sample rate")
    if not header.channels or header.channels < 1:
        raise AudioError(f"cannot decode {header.path}: its header gives no audio channel")
    return header


def probe_inputs(paths: list[Path]) -> dict[Path, AudioError]:
    """The problem of each input that cannot be read (in the order given); the others are absent."""
    problems: dict[Path, AudioError] = {}
    for path in paths:
        try:
            probe_audio(path)
        except AudioError as exc:
            problems[path] = exc
    return problems
