"""Waiting for a file to appear in a folder without sleeping: Linux inotify through libc."""

from __future__ import annotations

import ctypes
import os
import select
import struct
from pathlib import Path

_IN_MOVED_TO = 0x00000080  # an atomic write's rename into the folder
_IN_CLOSE_WRITE = 0x00000008
_EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


class FolderWatch:
    """`with FolderWatch(folder) as watch: ...; watch.next_name(suffix, timeout)`: the next file written there."""

    def __init__(self, folder: Path) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if self._libc.inotify_add_watch(self._fd, str(folder).encode(), _IN_MOVED_TO | _IN_CLOSE_WRITE) < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder}")
        self._pending: list[str] = []

    def __enter__(self) -> FolderWatch:
        return self

    def __exit__(self, *exc) -> None:
        os.close(self._fd)

    def next_name(self, suffix: str, timeout: float) -> str | None:
        """The name of the next file ending in `suffix` written into the folder, or None after `timeout` s."""
        while True:
            while self._pending:
                name = self._pending.pop(0)
                if name.endswith(suffix):
                    return name
            ready, _, _ = select.select([self._fd], [], [], timeout)
            if not ready:
                return None
            data = os.read(self._fd, 65536)
            offset = 0
            while offset < len(data):
                _, _, _, length = _EVENT_HEADER.unpack_from(data, offset)
                start = offset + _EVENT_HEADER.size
                self._pending.append(data[start : start + length].rstrip(b"\0").decode())
                offset = start + length
