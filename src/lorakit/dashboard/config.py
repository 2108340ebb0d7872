"""The dashboard's settings, each with its help text (the CLI flags are made from them)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, fields

from lorakit.config import ConfigError


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class DashboardConfig:
    host: str = _help("address to listen on; 127.0.0.1 keeps the page on this machine (anything else needs"
                      " --api-key)", default="127.0.0.1")
    port: int = _help("TCP port (0: any free port)", default=7860)
    api_key: str | None = _help("browsers must open the page once as /?key=KEY (then a cookie carries it) or send"
                                " 'Authorization: Bearer KEY' (default: $LORAKIT_API_KEY)", default=None)
    poll_seconds: float = _help("how often the page asks for new metrics and statuses", default=2.0)

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"--port: given {self.port}, expected 0-65535")
        if not 0.1 <= self.poll_seconds <= 3600:  # NaN fails both; a page polling nonstop would load the host
            problems.append(f"--poll-seconds: given {self.poll_seconds}, expected 0.1 to 3600 seconds")
        if not self.loopback and not self.api_key:
            problems.append(
                f"--host {self.host}: the runs would be readable from other machines; set --api-key or LORAKIT_API_KEY"
            )
        if problems:
            raise ConfigError("dashboard: " + "; ".join(problems))

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @classmethod
    def help_of(cls, name: str) -> str:
        return next(f.metadata["help"] for f in fields(cls) if f.name == name)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
