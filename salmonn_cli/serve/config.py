"""The server's settings: what `salmonn serve`'s options add up to, handed to every part of the server."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ..cli.options import DecodeChoice
from ..longform import LongformSettings

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True)
class ServeConfig:
    """`served_name`: the model id clients name (`aliases` too). `decode`, `longform`: the defaults every request
    starts from, the same as the task commands' for the same options, so answers match the CLI's."""

    served_name: str
    aliases: tuple[str, ...] = ()
    host: str = "127.0.0.1"  # where it listens: on loopback, the Host header must name loopback too
    api_key: str | None = None
    max_upload_bytes: int = 100 * 2**20
    max_audio_seconds: float = 120 * 60.0
    queue: int = 16  # requests waiting behind the one running; one more is answered 503
    cors_origins: tuple[str, ...] = ()
    decode: DecodeChoice = DecodeChoice()
    longform: LongformSettings = field(default_factory=LongformSettings)

    @property
    def model_ids(self) -> tuple[str, ...]:
        return (self.served_name, *self.aliases)

    @property
    def max_json_bytes(self) -> int:
        """A chat body carries the audio in base64 (4 bytes per 3) plus the messages."""
        return -(-self.max_upload_bytes * 4 // 3) + 2**20

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
