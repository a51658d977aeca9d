"""Audio from a request: uploaded (multipart) or base64 bytes -> a 16 kHz mono waveform, or a 400/413.

Names and content types are not trusted (the openai SDK names raw bytes `upload`, browsers say `blob`): the
container is sniffed from the first bytes and the bytes are written to a temporary file with that suffix, so the
CLI's own readers (`probe.probe_audio`, `audio.load_audio`) decode them exactly as they decode a file on disk.
The length cap is checked on the header before anything is decoded, and again on the decoded samples.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AudioError, DependencyError
from .api_error import ApiError, bad_audio

# (offset, magic, suffix): what the first bytes say the container is
_MAGIC = (
    (0, b"RIFF", ".wav"),
    (0, b"fLaC", ".flac"),
    (0, b"OggS", ".ogg"),
    (0, b"ID3", ".mp3"),
    (0, b"\x1aE\xdf\xa3", ".webm"),
    (4, b"ftyp", ".m4a"),
    (0, b"#!AMR", ".amr"),
    (0, b"FORM", ".aiff"),
    (0, b"caff", ".caf"),
)


def sniff_suffix(data: bytes) -> str:
    """The file suffix the bytes' container calls for; "" when unknown (every decoder is then tried)."""
    for offset, magic, suffix in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return suffix
    if len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0:  # an MPEG audio frame sync, no ID3 tag
        return ".mp3"
    return ""


@dataclass(frozen=True)
class Clip:
    """Decoded request audio: the waveform, its length and the sha256 of the bytes it came from (cache key)."""

    waveform: np.ndarray
    seconds: float
    sha256: str


def decode_base64(text: object, param: str) -> bytes:
    """The bytes of base64 `text`, with or without a `data:...;base64,` prefix; 400 naming `param` otherwise."""
    if not isinstance(text, str) or not text:
        raise bad_audio(param, "the audio data must be a non-empty base64 string")
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if not head.endswith(";base64"):
            raise bad_audio(param, "a data: URL must be base64 (data:audio/wav;base64,...)")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise bad_audio(param, "the audio data is not valid base64") from None


def read_clip(data: bytes, param: str, max_seconds: float) -> Clip:
    """Decode request bytes; 400 `invalid_audio` for what is not audio, 413 `audio_too_long` past the cap."""
    from ..audio import SAMPLE_RATE, load_audio
    from ..probe import probe_audio

    if not data:
        raise bad_audio(param, "the audio file is empty (0 bytes)")
    digest = hashlib.sha256(data).hexdigest()
    with tempfile.TemporaryDirectory(prefix="salmonn-upload-") as folder:
        path = Path(folder) / f"audio{sniff_suffix(data)}"
        path.write_bytes(data)
        try:
            header = probe_audio(path)
            if header.frames is not None and header.sample_rate:
                _check_length(header.frames / header.sample_rate, max_seconds, param)
            waveform = load_audio(path)
        except AudioError as exc:
            raise bad_audio(param, f"could not decode the audio: {_reason(exc, path)}") from None
        except DependencyError as exc:
            raise bad_audio(param, f"this audio format needs a library the server lacks: {exc}") from None
    seconds = waveform.shape[0] / SAMPLE_RATE
    _check_length(seconds, max_seconds, param)
    return Clip(waveform, seconds, digest)


def _check_length(seconds: float, max_seconds: float, param: str) -> None:
    if seconds > max_seconds:
        raise ApiError(413, f"the audio is {seconds / 60:.1f} minutes long; this server takes at most "
                       f"{max_seconds / 60:g} (--max-audio-minutes)", param=param, code="audio_too_long")  # fmt: skip


def _reason(exc: AudioError, path: Path) -> str:
    """The reader's one line without the temporary file's name, which means nothing to the client."""
    text = str(exc)
    if f"{path}: " in text:  # "cannot read audio file <path>: <reason>"
        return text.split(f"{path}: ", 1)[1]
    return text.replace(f": {path}", "").replace(str(path), "the upload")  # "audio file has no samples: <path>"
