"""`shelfsight ui`: serve the web workbench for a running gateway (and `serve --ui-port` beside it)."""
from __future__ import annotations

import time
from pathlib import Path


def register(sub) -> None:
    from shelfsight.ui.settings import UISettings

    s = UISettings()
    u = sub.add_parser("ui", help="the web workbench (Gradio) over a running gateway: ask, history, batch, evaluate")
    u.add_argument("--target", default=s.target.target, help="gateway HOST:PORT")
    u.add_argument("--port", type=int, default=s.port, help="the page's port (0: any free port)")
    u.add_argument("--host", default=s.host, help="address the page listens on (0.0.0.0 opens it to the network)")
    u.add_argument("--workdir", type=Path, help="where batch and evaluation results are kept (default: a temp folder)")
    u.add_argument("--timeout", type=float, default=s.timeout, help="deadline for one answer, seconds")
    u.add_argument("--auth-file", type=Path, help="who may open the page: lines of USER:PASSWORD (Gradio's login); "
                   "give it whenever --host is not 127.0.0.1")
    from shelfsight.client.cli import add_connection_flags

    add_connection_flags(u)
    u.set_defaults(func=cmd_ui)


def read_auth(path: Path | None) -> tuple[tuple[str, str], ...]:
    from shelfsight.errors import InvalidArgument, NotFound

    if path is None:
        return ()
    if not path.is_file():
        raise NotFound(f"--auth-file {path} does not exist")
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            user, sep, password = line.strip().partition(":")
            if not sep or not user or not password:
                raise InvalidArgument(f"{path}:{n}: each line must be USER:PASSWORD")
            pairs.append((user, password))
    return tuple(pairs)


def settings_from(args):
    from shelfsight.client.cli import connection
    from shelfsight.ui.settings import UISettings

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.auth_file:
        print(f"warning: the web UI listens on {args.host} and asks nobody for a login (give --auth-file)",
              flush=True)
    return UISettings(target=connection(args), host=args.host, port=args.port, workdir=args.workdir,
                      timeout=args.timeout, auth=read_auth(args.auth_file))


def cmd_ui(args) -> int:
    from shelfsight.ui.app import launch

    settings = settings_from(args)
    page = launch(settings, block=False)
    print(f"web UI on {page.local_url} (gateway {settings.target.target}); Ctrl-C stops it", flush=True)
    try:
        while page.is_running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        page.close()
    return 0


def start_beside(target, port: int = 0, host: str = "127.0.0.1", workdir: Path | None = None,
                 auth: tuple[tuple[str, str], ...] = ()):
    """Start the page on a background thread for a gateway this process runs; returns the page
    (page.local_url, page.close())."""
    from shelfsight.ui.app import launch
    from shelfsight.ui.settings import UISettings

    return launch(UISettings(target=target, host=host, port=port, workdir=workdir, auth=auth), block=False)

