"""Inputs checked before any model loads: a bad file costs a second, not a model load.

`probe_audio` reads what a file is (stat) and its header (libsndfile's, else PyAV's), never its samples: it
exists, it is a regular readable file, its container and codec open, and it has a sample rate and at least one
channel. A pipe (`<(...)`, /dev/stdin, a named FIFO) can be read only once, so `probe_inputs` copies it into a
temporary folder first and probes (and later reads) the copy: a pipe of garbage is refused before the load too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from .atomic import failure_reason
from .audio import PYAV_SUFFIXES, av_reason, decoder_chatter_silenced, has_pyav, import_av, soundfile_reason
from .errors import AudioError
from .inputs import InputItem


@dataclass(frozen=True)
class AudioHeader:
    """What a file's header says: rate, channels and frames (None where unknown: PyAV's containers may not say)."""

    path: Path
    sample_rate: int | None
    channels: int | None
    frames: int | None = None


def probe_audio(path: Path) -> AudioHeader:
    """The file's header, or an AudioError whose one line says what is wrong with it."""
    if _file_kind(path) == "pipe":  # probe_inputs copies a pipe first; a reader that needs a file says so
        raise AudioError(f"{path} is a pipe, which can be read only once: give a file")
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
    """`file` or `pipe`; an AudioError for what cannot be read as audio at all."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise AudioError(f"audio file not found: {path}") from None
    except PermissionError:
        raise AudioError(f"cannot read {path}: permission denied") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise AudioError(f"cannot read {path}: its symbolic links loop") from None
        raise AudioError(f"cannot read {path}: {failure_reason(exc)}") from None
    if stat.S_ISFIFO(info.st_mode):
        return "pipe"  # `<(...)`, /dev/stdin, a FIFO: welcome, copied by probe_inputs
    if stat.S_ISDIR(info.st_mode):  # only an unreadable one reaches here: a readable folder gives its files
        if not os.access(path, os.R_OK | os.X_OK):
            raise AudioError(f"cannot read folder {path}: permission denied")
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


@dataclass(frozen=True)
class ProbedInputs:
    """The inputs that can be read (in the order given; a pipe's item reads from its copy) and the problem of
    each one that cannot."""

    good: list[InputItem]
    bad: dict[Path, AudioError] = field(default_factory=dict)
    seconds: dict[Path, float | None] = field(default_factory=dict)  # each good input's length, where its header says

    def longer_than(self, seconds: float) -> bool:
        """Whether any good input is known to be longer than `seconds`."""
        return any(length is not None and length > seconds for length in self.seconds.values())


@contextlib.contextmanager
def probe_inputs(items: list[InputItem]) -> Iterator[ProbedInputs]:
    """Probe every input; the copies of pipes live until the block ends."""
    with tempfile.TemporaryDirectory(prefix="salmonn-pipes-") as copies:
        good, bad, seconds = [], {}, {}
        for number, item in enumerate(items):
            try:
                if _pipe(item.path):
                    item = replace(item, read_from=_copied(item.path, Path(copies) / f"{number}{item.path.suffix}"))
                header = probe_audio(item.audio_path)
            except AudioError as exc:  # said of the name the user gave, not of a pipe's copy
                bad[item.path] = AudioError(str(exc).replace(str(item.audio_path), str(item.path)))
            else:
                good.append(item)
                seconds[item.path] = header.frames / header.sample_rate if header.frames else None
        yield ProbedInputs(good, bad, seconds)


def _pipe(path: Path) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False  # probe_audio says what is wrong


def _copied(pipe: Path, copy: Path) -> Path:
    """The whole of `pipe` written to `copy` (this waits for a FIFO's writer, as any reader of it would)."""
    try:
        with open(pipe, "rb") as source, open(copy, "wb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
    except OSError as exc:
        raise AudioError(f"cannot read {pipe}: {failure_reason(exc)}") from None
    return copy
