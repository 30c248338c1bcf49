#!/usr/bin/env python3
"""Build the project's Python environments once per machine and link each checkout to them.

Two environments exist because they cannot be one (shared/notes/quantization.md):
  serve   numpy<2 for Triton's Python stub; runs the server, gateway, client and tests
  export  GPTQModel (numpy>=2.4.6); only the offline int4 quantization step runs here

The heavy part (torch alone is 5.5 GB) is built once into a cache outside the clone, in a folder
named by a hash of the pins, so every clone and worktree reuses it and a pin change builds a new one:

    $SHELFSIGHT_ENV_CACHE or ~/.cache/shelfsight/envs/<name>-<key>/      full venv, shared

Each checkout gets a tiny overlay venv (`.venv`, `.venv-export`, a few KB) that chains to the shared
site-packages through a .pth file and holds this checkout's own editable install. A plain symlink to
the shared venv would make every clone's `pip install -e .` overwrite the others' import paths.
Triton's stub finds the overlay through PATH + pyvenv.cfg and honours .pth files, so models import
the project the same way tests do.

Usage: python3 scripts/envs.py [serve] [export]      (no argument: both)
Uses only the standard library, so it runs on a bare machine.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQ = ROOT / "requirements"
# name -> (requirement files installed with deps, files installed with --no-deps, overlay dir)
ENVS = {
    "serve": (["serve.txt"], ["serve-nodeps.txt"], ".venv"),
    "export": (["export.txt"], [], ".venv-export"),
}
COMPLETE = ".shelfsight-complete"
KEEP_UNUSED_DAYS = 14


def cache_root() -> Path:
    env = os.environ.get("SHELFSIGHT_ENV_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shelfsight" / "envs"


def env_key(name: str) -> str:
    deps, nodeps, _ = ENVS[name]
    h = hashlib.sha256()
    h.update(f"{sys.version_info[:2]} {sysconfig.get_platform()} {sys.base_prefix}\n".encode())
    for f in deps + nodeps:
        h.update(f.encode() + b"\0" + (REQ / f).read_bytes())
    return h.hexdigest()[:12]


def site_packages(venv: Path) -> Path:
    v = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    return venv / "lib" / v / "site-packages"


def run(cmd: list[str], log) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)


def build_shared(name: str) -> Path:
    """Return the shared venv for `name`, building it if missing or half-built."""
    deps, nodeps, _ = ENVS[name]
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{name}-{env_key(name)}"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two clones building at once: the second waits and reuses
        if (target / COMPLETE).exists():
            (target / COMPLETE).touch()
            return target
        if target.exists():
            shutil.rmtree(target)  # an interrupted build: start over rather than trust it
        print(f"[envs] building the {name} environment in {target} (first time only; a few minutes)",
              flush=True)
        t0 = time.time()
        log_path = root / f"{target.name}.log"
        with open(log_path, "w") as log:
            try:
                run([sys.executable, "-m", "venv", str(target)], log)
                py = str(target / "bin" / "python")
                run([py, "-m", "pip", "install", "-q", "--upgrade", "pip"], log)
                for f in deps:
                    run([py, "-m", "pip", "install", "-r", str(REQ / f)], log)
                for f in nodeps:
                    run([py, "-m", "pip", "install", "--no-deps", "-r", str(REQ / f)], log)
            except subprocess.CalledProcessError:
                sys.exit(f"[envs] building {name} failed; see {log_path}")
        (target / COMPLETE).write_text(f"{time.time() - t0:.0f}s\n")
        print(f"[envs] {name} built in {time.time() - t0:.0f}s", flush=True)
        prune(root, name, keep=target)
        return target


def prune(root: Path, name: str, keep: Path) -> None:
    """Drop this env's older builds that nobody has used for a while, so the disk does not fill."""
    cutoff = time.time() - KEEP_UNUSED_DAYS * 86400
    for old in root.glob(f"{name}-*"):
        marker = old / COMPLETE
        if old != keep and old.is_dir() and marker.exists() and marker.stat().st_mtime < cutoff:
            shutil.rmtree(old, ignore_errors=True)


def link_overlay(name: str, shared: Path) -> Path:
    """Create/refresh the checkout's overlay venv chained to `shared`, with the project installed."""
    overlay = ROOT / ENVS[name][2]
    if overlay.is_symlink() or (overlay.exists() and not (overlay / "pyvenv.cfg").exists()):
        overlay.unlink() if overlay.is_symlink() else shutil.rmtree(overlay)
    chain = site_packages(overlay) / "_shelfsight_shared.pth"
    wanted = f"import site; site.addsitedir({str(site_packages(shared))!r})\n"
    if not (overlay / "pyvenv.cfg").exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(overlay)], check=True)
    if not chain.exists() or chain.read_text() != wanted:
        chain.write_text(wanted)
    stamp = overlay / ".shelfsight-installed"
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    digest = hashlib.sha256(pyproject + str(shared).encode()).hexdigest()
    if not stamp.exists() or stamp.read_text() != digest:
        # The shared pip installs into the overlay; --no-build-isolation uses the shared setuptools.
        subprocess.run([str(shared / "bin" / "python"), "-m", "pip", "--python",
                        str(overlay / "bin" / "python"), "install", "-q", "--no-deps",
                        "--no-build-isolation", "-e", str(ROOT)], check=True)
        stamp.write_text(digest)
    return overlay


def main(argv: list[str]) -> None:
    names = argv or list(ENVS)
    for name in names:
        if name not in ENVS:
            sys.exit(f"[envs] unknown environment {name!r}; known: {', '.join(ENVS)}")
        overlay = link_overlay(name, build_shared(name))
        print(f"[envs] {overlay.name} ready", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
