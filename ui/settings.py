"""The UI process's one settings object, built from `shelfsight ui` / `shelfsight serve --ui-port` flags."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class UISettings:
    target: str = "127.0.0.1:50051"  # the gateway, HOST:PORT
    host: str = "127.0.0.1"  # where the page is served; --host 0.0.0.0 opens it to the network
    port: int = 7860  # 0: any free port
    workdir: Path | None = None  # batch and evaluation outputs; None: a temporary folder per process
    timeout: float = 300.0  # deadline for one answer, seconds
    health_interval: float = 2.0  # how often the page checks the gateway, seconds
