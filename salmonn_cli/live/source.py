"""Capture sources: 16 kHz mono float32 blocks, from a microphone (PortAudio via sounddevice) or a file.

Both go through one path: a producer (the PortAudio callback, or a thread pacing a file) pushes blocks at the
source's native rate into a bounded queue; the consumer's `read` mixes to mono, resamples to 16 kHz with a
streaming soxr resampler and keeps the sample clock true. A live producer never waits: when the queue is full
the block is dropped and counted (`overflow_s`), and the consumer puts silence of the same length in its place,
so every later timestamp is still right. A `--fast` file producer instead waits for room (back-pressure).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..audio import SAMPLE_RATE
from ..errors import DependencyError, UsageError

BLOCK_S = 0.032  # 512 samples at 16 kHz: one silero-vad frame, so segmentation never waits for a block
RING_S = 60.0  # seconds of audio the block queue holds before a live producer starts dropping blocks
PORTAUDIO_HINT = "install PortAudio: apt-get install libportaudio2 (Debian/Ubuntu), brew install portaudio (macOS)"
_PA_DEVICE_UNAVAILABLE = -9985  # paDeviceUnavailable: another program holds the device


@dataclass(frozen=True, eq=False)
class Block:
    """Captured audio: (T,) float32 at 16 kHz, the index of its first sample since capture start, and the
    `time.monotonic()` at which its last sample was captured (for end-of-utterance latency)."""

    samples: np.ndarray
    start: int
    captured_at: float

    @property
    def end(self) -> int:
        return self.start + self.samples.shape[0]


@dataclass(frozen=True)
class InputDevice:
    """An audio input PortAudio offers."""

    index: int
    name: str
    host_api: str
    channels: int
    default_rate: float
    is_default: bool


class CaptureSource:
    """A bounded block queue between a producer (native rate, any channels) and a 16 kHz mono consumer."""

    def __init__(self, rate: int, *, live: bool, ring_s: float = RING_S, block_s: float = BLOCK_S) -> None:
        self.rate = rate
        self.live = live  # a real-time producer: never waits, drops (and counts) on overflow
        self._queue: queue.Queue = queue.Queue(maxsize=max(2, math.ceil(ring_s / block_s)))
        self._closed = threading.Event()  # set by the producer after its last put
        self._stop = threading.Event()
        self._produced = 0  # native frames pushed or dropped (producer side)
        self._consumed = 0  # native frames read, dropped ones included (consumer side)
        self._out = 0  # 16 kHz samples handed out
        self._last_captured = 0.0
        self.overflow_frames = 0  # native frames dropped because the queue was full
        self.device_overflows = 0  # overflows PortAudio itself reported (frames lost before the callback)
        self.started_at: float | None = None  # time.monotonic() when capture started
        self._flushed = False
        self._resampler = None
        if rate != SAMPLE_RATE:  # e.g. a 48 kHz-only device: resample instead of failing
            import soxr

            self._resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")

    @property
    def overflow_s(self) -> float:
        """Seconds of audio lost because the consumer fell behind by more than the queue holds."""
        return self.overflow_frames / self.rate

    @property
    def ended(self) -> bool:
        """True once the producer has stopped and every block has been read."""
        return self._closed.is_set() and self._queue.empty()

    # -- producer side ---------------------------------------------------------------------------------------
    def _push(self, samples: np.ndarray, captured_at: float) -> None:
        """Queue one native-rate block, (T,) or (T, C). Live: drop and count when full; else wait for room."""
        item = (self._produced, samples, captured_at)
        self._produced += samples.shape[0]
        if self.live:
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                self.overflow_frames += samples.shape[0]
            return
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _finish(self) -> None:
        self._closed.set()

    # -- consumer side ---------------------------------------------------------------------------------------
    def read(self, timeout: float = 0.1) -> Block | None:
        """The next 16 kHz mono block, or None when none came within `timeout` seconds (or the source ended)."""
        try:
            start, samples, captured_at = self._queue.get(timeout=0.0 if self._closed.is_set() else timeout)
        except queue.Empty:
            return self._flush() if self.ended else None
        mono = samples.mean(axis=1, dtype=np.float32) if samples.ndim == 2 else samples.astype(np.float32, copy=False)
        if start > self._consumed:  # blocks lost to overflow: silence in their place keeps the clock true
            mono = np.concatenate([np.zeros(start - self._consumed, np.float32), mono])
        self._consumed = start + samples.shape[0]
        self._last_captured = captured_at
        if self._resampler is not None:
            mono = self._resampler.resample_chunk(mono)
        return self._emit(mono, captured_at)

    def _flush(self) -> Block | None:
        """Once, at the end of the stream: silence for blocks lost at the very end, and the resampler's tail."""
        if self._flushed:
            return None
        self._flushed = True
        tail = np.zeros(self._produced - self._consumed, np.float32)
        self._consumed = self._produced
        if self._resampler is not None:
            tail = self._resampler.resample_chunk(tail)
            tail = np.concatenate([tail, self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)])
        return self._emit(tail, self._last_captured) if tail.shape[0] else None

    def _emit(self, samples: np.ndarray, captured_at: float) -> Block:
        block = Block(np.ascontiguousarray(samples, dtype=np.float32), self._out, captured_at)
        self._out = block.end
        return block

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Stop capturing; blocks already queued can still be read (until `ended`)."""
        self._stop.set()
        self._finish()


class FileSource(CaptureSource):
    """A waveform fed through the capture path: at real-time pace (block k at t0 + its end time, so sleeping
    never adds up to drift), or with `fast` as fast as the consumer takes it."""

    def __init__(self, waveform: np.ndarray, *, fast: bool = False, block_s: float = BLOCK_S) -> None:
        super().__init__(SAMPLE_RATE, live=not fast, block_s=block_s)
        self.waveform = np.asarray(waveform, dtype=np.float32)
        self.block_samples = max(1, round(block_s * SAMPLE_RATE))
        self._thread: threading.Thread | None = None

    @classmethod
    def from_file(cls, path, *, fast: bool = False) -> FileSource:
        from ..audio import load_audio

        return cls(load_audio(path), fast=fast)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._feed, name="salmonn-file-source", daemon=True)
        self.started_at = time.monotonic()
        self._thread.start()

    def _feed(self) -> None:
        t0 = self.started_at
        for first in range(0, self.waveform.shape[0], self.block_samples):
            block = self.waveform[first : first + self.block_samples]
            if not self.live:
                if self._stop.is_set():
                    break
            elif self._stop.wait(max(0.0, t0 + (first + block.shape[0]) / SAMPLE_RATE - time.monotonic())):
                break  # stopped while waiting for this block's capture time
            self._push(block, time.monotonic())
        self._finish()

    def stop(self) -> None:
        super().stop()
        if self._thread is not None:
            self._thread.join(timeout=2.0)


class MicSource(CaptureSource):
    """A PortAudio input stream whose callback only copies each block into the queue (no work on the audio
    thread: resampling and mixing happen in `read`)."""

    def __init__(self, sd, device: InputDevice, rate: int, channels: int) -> None:
        super().__init__(rate, live=True)
        self.device = device
        self.channels = channels
        try:
            self._stream = sd.InputStream(
                device=device.index, samplerate=rate, channels=channels, dtype="float32",
                blocksize=max(1, round(BLOCK_S * rate)), callback=self._callback,
            )  # fmt: skip
        except sd.PortAudioError as exc:
            raise _open_error(device, exc) from None
        self._sd = sd

    def _callback(self, indata, frames, time_info, status) -> None:
        if status.input_overflow:
            self.device_overflows += 1
        self._push(indata.copy(), time.monotonic())

    def start(self) -> None:
        self.started_at = time.monotonic()
        try:
            self._stream.start()
        except self._sd.PortAudioError as exc:
            raise _open_error(self.device, exc) from None

    def read(self, timeout: float = 0.1) -> Block | None:
        if not self._closed.is_set() and not self._stream.active:  # unplugged, or the host API gave up
            raise DependencyError(f"input device {self.device.index} ({self.device.name}) stopped delivering audio")
        return super().read(timeout)

    def stop(self) -> None:
        try:
            self._stream.stop()  # waits for the callback in progress: nothing is pushed after this
            self._stream.close()
        finally:
            super().stop()


def import_sounddevice():
    """The sounddevice module, or a DependencyError saying what to install (the package, or PortAudio)."""
    try:
        import sounddevice
    except ImportError:
        raise DependencyError(
            "live capture needs sounddevice: pip install sounddevice (or: pip install 'salmonn[live]')"
        ) from None
    except OSError as exc:  # sounddevice raises OSError('PortAudio library not found') at import
        raise DependencyError(f"live capture needs the PortAudio library ({exc}): {PORTAUDIO_HINT}") from None
    return sounddevice


def list_input_devices(sd) -> list[InputDevice]:
    """Every device PortAudio offers with at least one input channel."""
    default = sd.default.device[0] if sd.default.device else -1
    apis = sd.query_hostapis()
    return [
        InputDevice(
            i, d["name"], apis[d["hostapi"]]["name"], d["max_input_channels"], d["default_samplerate"], i == default
        )  # fmt: skip
        for i, d in enumerate(sd.query_devices())
        if d["max_input_channels"] > 0
    ]


def resolve_device(sd, spec: str | None) -> InputDevice:
    """The input device `spec` names (an index, or part of a name, case-insensitive); the default if None."""
    devices = list_input_devices(sd)
    if not devices:
        wanted = "" if spec is None else f" (asked for {spec!r})"
        raise DependencyError(
            f"no input device: PortAudio finds no microphone or other audio input on this machine{wanted}; "
            "see salmonn live --list-devices, or feed a file with --input FILE"
        )
    if spec is None:
        return next((d for d in devices if d.is_default), devices[0])
    spec = spec.strip()
    if spec.isdigit():
        match = [d for d in devices if d.index == int(spec)]
    else:
        match = [d for d in devices if spec.lower() in d.name.lower()]
        match = [d for d in match if d.name.lower() == spec.lower()] or match
    if not match:
        known = "; ".join(f"{d.index}: {d.name}" for d in devices)
        raise DependencyError(f"no input device {spec!r}: the inputs are {known} (see salmonn live --list-devices)")
    if len(match) > 1:
        names = "; ".join(f"{d.index}: {d.name}" for d in match)
        raise UsageError(f"--capture-device {spec!r} matches several inputs ({names}): give its index")
    return match[0]


def _busy(exc: Exception) -> bool:
    text = str(exc).lower()
    return _PA_DEVICE_UNAVAILABLE in getattr(exc, "args", ()) or "unavailable" in text or "busy" in text


def _open_error(device: InputDevice, exc: Exception) -> DependencyError:
    if _busy(exc):
        return DependencyError(f"input device {device.index} ({device.name}) is busy: another program is using it")
    return DependencyError(f"cannot open input device {device.index} ({device.name}): {exc}")


def pick_settings(sd, device: InputDevice) -> tuple[int, int]:
    """(rate, channels) to open `device` with: 16 kHz mono when it accepts that, else its native rate (we
    resample) and/or its own channel count (we mix down). Never fails on the rate alone."""
    native = int(device.default_rate) or SAMPLE_RATE
    last: Exception | None = None
    for rate, channels in dict.fromkeys([(SAMPLE_RATE, 1), (native, 1), (SAMPLE_RATE, device.channels),
                                         (native, device.channels)]):  # fmt: skip
        try:
            sd.check_input_settings(device=device.index, samplerate=rate, channels=channels, dtype="float32")
            return rate, channels
        except (sd.PortAudioError, ValueError) as exc:
            if _busy(exc):
                raise _open_error(device, exc) from None
            last = exc
    raise _open_error(device, last)


def open_microphone(spec: str | None) -> MicSource:
    """A MicSource on the device `spec` names (see `resolve_device`), opened but not started."""
    sd = import_sounddevice()
    device = resolve_device(sd, spec)
    rate, channels = pick_settings(sd, device)
    return MicSource(sd, device, rate, channels)
