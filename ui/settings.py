"""The UI process's one settings object, built from `shelfsight ui` / `shelfsight serve --ui-port` flags."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shelfsight import ports
from shelfsight.client.client import Connection


@dataclass(frozen=True)
class UISettings:
    # the gateway: HOST:PORT, or a Connection (TLS, an API key) when it asks for them
    target: "str | Connection" = field(default_factory=Connection)
    # who may open the page (Gradio's login): (user, password) pairs; empty: anyone who reaches it
    auth: tuple[tuple[str, str], ...] = ()
    host: str = ports.LOCALHOST  # where the page is served; --host 0.0.0.0 opens it to the network
    port: int = ports.UI  # 0: any free port
    workdir: Path | None = None  # batch and evaluation outputs; None: a temporary folder per process
    timeout: float = 300.0  # deadline for one answer, seconds
    health_interval: float = 2.0  # how often the page checks the gateway, seconds
