"""`shelfsight ui`: serve the web workbench for a running gateway (and `serve --ui-port` beside it)."""
from __future__ import annotations

import time
from pathlib import Path


def register(sub) -> None:
    from shelfsight.ui.settings import UISettings

    s = UISettings()
    u = sub.add_parser("ui", help="the web workbench (Gradio) over a running gateway: ask, history, batch, evaluate")
    u.add_argument("--target", default=s.target, help="gateway HOST:PORT")
    u.add_argument("--port", type=int, default=s.port, help="the page's port (0: any free port)")
    u.add_argument("--host", default=s.host, help="address the page listens on (0.0.0.0 opens it to the network)")
    u.add_argument("--workdir", type=Path, help="where batch and evaluation results are kept (default: a temp folder)")
    u.add_argument("--timeout", type=float, default=s.timeout, help="deadline for one answer, seconds")
    u.set_defaults(func=cmd_ui)


def settings_from(args):
    from shelfsight.ui.settings import UISettings

    return UISettings(target=args.target, host=args.host, port=args.port, workdir=args.workdir, timeout=args.timeout)


def cmd_ui(args) -> int:
    from shelfsight.ui.app import launch

    settings = settings_from(args)
    page = launch(settings, block=False)
    print(f"web UI on {page.local_url} (gateway {settings.target}); Ctrl-C stops it", flush=True)
    try:
        while page.is_running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        page.close()
    return 0


def start_beside(target: str, port: int = 0, host: str = "127.0.0.1", workdir: Path | None = None):
    """Start the page on a background thread for a gateway this process runs; returns the page
    (page.local_url, page.close())."""
    from shelfsight.ui.app import launch
    from shelfsight.ui.settings import UISettings

    return launch(UISettings(target=target, host=host, port=port, workdir=workdir), block=False)

