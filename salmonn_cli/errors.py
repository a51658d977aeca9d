"""Typed errors. Each user-facing failure has its own class and exit code; the CLI maps them in one table."""

from __future__ import annotations

EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as shells report it
EXIT_TERMINATED = 143  # SIGTERM (timeout, systemd, a container stop), handled as Ctrl-C: 128 + SIGTERM


class SalmonnError(Exception):
    """Base class of every error this package raises on purpose. `exit_code` is what the CLI exits with."""

    exit_code: int = 1


class UsageError(SalmonnError):
    """The caller asked for something that does not make sense (bad option value, bad combination)."""

    exit_code = 2


class AudioError(SalmonnError):
    """An input audio file is missing, unreadable or empty."""

    exit_code = 3


class CheckpointError(SalmonnError):
    """A model component file is missing, of the wrong kind, or does not match what the model expects."""

    exit_code = 4

    def __init__(self, message: str, *, path: object = None, key: str | None = None) -> None:
        self.path = None if path is None else str(path)
        self.key = key
        details = []
        if self.path is not None:
            details.append(f"file {self.path}")
        if key is not None:
            details.append(f"key {key!r}")
        suffix = f" ({', '.join(details)})" if details else ""
        super().__init__(message + suffix)


class UnexpectedKeyError(CheckpointError):
    """A checkpoint holds a key the model does not have (often: a renamed key that would silently do nothing)."""


class MissingKeyError(CheckpointError):
    """A checkpoint lacks a key the model needs."""


class ShapeMismatchError(CheckpointError):
    """A checkpoint tensor has a shape other than the one the model expects."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle holds something other than tensors and plain containers (it could run code): refused."""


class DependencyError(SalmonnError):
    """An optional library or a piece of hardware the request needs is not there."""

    exit_code = 5


class OutOfMemoryError(SalmonnError):
    """The device ran out of memory."""

    exit_code = 6


class OutputError(SalmonnError):
    """An output cannot be written: a read-only or full disk, a folder without write permission."""

    exit_code = 7


class AddressError(SalmonnError):
    """`salmonn serve` cannot listen where it was asked: the port is in use, or the address is not this machine's."""

    exit_code = 8
