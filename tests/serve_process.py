"""A real `salmonn serve --port 0` in a subprocess, for the server tests: started, read, stopped, every wait bounded."""

from __future__ import annotations

import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx

START_DEADLINE_S = 120.0
STOP_DEADLINE_S = 30.0
POLL_S = 0.02


class ServeProcess:
    """`salmonn serve` on 127.0.0.1 with a free port; `url` once its one stdout line has said where it listens."""

    def __init__(self, *args: str, log: Path) -> None:
        exe = shutil.which("salmonn")
        assert exe, "the salmonn console script is not installed (pip install -e .)"
        self.log = log
        self._log_file = log.open("w")
        self.process = subprocess.Popen([exe, "serve", "--port", "0", *args], stdout=subprocess.PIPE,
                                        stderr=self._log_file, text=True)  # fmt: skip
        self.url = self._read_url()
        self.stdout_lines = [f"listening on {self.url}"]

    def _read_url(self) -> str:
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stdout], [], [], 1.0)
            if ready:
                line = self.process.stdout.readline()
                if line.startswith("listening on http://127.0.0.1:"):
                    return line.split()[-1]
                raise AssertionError(f"unexpected first stdout line {line!r}; stderr:\n{self.stderr()}")
            if self.process.poll() is not None:
                break
        self.process.kill()
        raise AssertionError(f"salmonn serve did not start; stderr:\n{self.stderr()}")

    def stderr(self) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log.read_text()

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def wait_health(self, ready, what: str, deadline_s: float = 60.0) -> dict:
        """Poll /health until `ready(health)` holds, up to a deadline (the test relies on the state, not on time)."""
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            health = self.health()
            if ready(health):
                return health
            time.sleep(POLL_S)
        raise AssertionError(f"the server never reached: {what}; last /health {health}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send `sig`; the exit code (the process is killed, and the test fails, past the deadline)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"salmonn serve did not stop on {sig!r}; stderr:\n{self.stderr()}") from None
        rest = self.process.stdout.read()
        self.stdout_lines += rest.splitlines()
        self._log_file.close()
        return self.process.returncode
