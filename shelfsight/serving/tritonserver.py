"""Start and stop the real tritonserver bundled in the `nvidia-pytriton` wheel (no Docker).

What it takes (shared/notes/triton-from-pypi.md): a backends dir of *symlinks* to the Python backend
and the stub for this Python (a copied stub loses its RPATH); this venv's bin first in PATH (the stub
runs the `python3` it finds there and reads pyvenv.cfg); LD_LIBRARY_PATH holding this interpreter's
libpython; unique shared-memory names, removed after exit. A stub that cannot load a library leaves
the server "loading" forever, so readiness is awaited with a deadline while the log is watched.
The server dies with the process that started it, and what a dead one left is swept away at the next
start (lifecycle.py).
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from shelfsight import ports
from shelfsight.errors import FailedPrecondition, InvalidArgument, Unavailable
from shelfsight.serving import lifecycle

FATAL_LOG_LINES = ("error while loading shared libraries", "failed to load all models",
                   "Address already in use", "failed to start")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((ports.LOCALHOST, 0))
        return s.getsockname()[1]


def bundle_dir() -> Path:
    # Located, not imported: the wheel is installed without its Python dependencies (we only use the
    # server binary), so importing `pytriton` would fail.
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise FailedPrecondition("nvidia-pytriton is not installed in this environment; run `make env`")
    return Path(list(spec.submodule_search_locations)[0]) / "tritonserver"


@dataclass(frozen=True)
class TritonSettings:
    repo: Path
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    host: str = ports.LOCALHOST
    startup_timeout: float = 300.0
    # On stop, the seconds requests in flight may still take; then the engine ends them with
    # UNAVAILABLE (the stop note, lifecycle.py). `shelfsight serve` passes 0: its gateway has already
    # given them its --shutdown-grace, and what is left in Triton then has nobody waiting for it.
    drain_timeout: float = 15.0
    # Triton's own deadline on SIGTERM, after which it exits 1 ("Exit timeout expired"): the drain,
    # then unloading the models, each Python stub's finalize() tearing down a torch process - measured
    # 3-8 s for the tiny model on 2 cores after 48 streams (5 s was too short even idle).
    exit_timeout: int = 30
    log_path: Path | None = None  # default: <tempdir>/tritonserver.log
    extra_args: tuple[str, ...] = ()


UNLOAD_BUDGET = 10  # seconds of the exit timeout kept for unloading the models (measured 3-8 s)
# Triton's APIs that nobody in front of it needs, restricted to callers who send a header whose value
# is made at each start and known to this process only (docs/security.md): changing log settings,
# loading and unloading models, registering shared memory, tracing, statistics - and, on HTTP, inference
# itself (the gateway answers through gRPC; a local process could otherwise skip the gateway's checks
# and limits through the HTTP port). Health, metadata and model config stay open: the supervisor, the
# gateway and Kubernetes probes read them.
RESTRICTED_HTTP = "logging,model-repository,shared-memory,trace,statistics,inference"
RESTRICTED_GRPC = "logging,model-repository,shared-memory,trace,statistics"
ADMIN_HEADER = "shelfsight-admin"


class TritonServer:
    def __init__(self, settings: TritonSettings):
        if settings.drain_timeout + UNLOAD_BUDGET > settings.exit_timeout:
            raise InvalidArgument(f"exit_timeout ({settings.exit_timeout}s) must leave {UNLOAD_BUDGET}s for "
                                  f"unloading after drain_timeout ({settings.drain_timeout}s)")
        self.settings = settings
        self.proc: subprocess.Popen | None = None
        self.shm_prefix = f"shelfsight_{uuid.uuid4().hex[:10]}_"
        self._workdir = Path(tempfile.mkdtemp(prefix="shelfsight-triton-"))
        lifecycle.claim(self._workdir, self.shm_prefix)
        self.log_path = settings.log_path or self._workdir / "tritonserver.log"
        self.stubs: dict[int, str] = {}  # pid -> model instance, recorded once the server is ready
        self.admin_key = secrets.token_hex(16)  # the ADMIN_HEADER value the restricted APIs want
        self._stopped = False

    @property
    def grpc_url(self) -> str:
        return f"{self.settings.host}:{self.settings.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.metrics_port}/metrics"

    def addresses(self) -> str:
        return (f"triton grpc {self.grpc_url}, http {self.http_url}, metrics {self.metrics_url}; "
                f"log {self.log_path}")

    def _children(self) -> dict[int, str]:
        """The server's Python-backend stubs: pid -> model instance name (e.g. generate_0_0)."""
        found = {}
        if not self.proc:
            return found
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) != self.proc.pid:  # fields: state, ppid, ...
                    continue
                argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue  # gone while we looked
            if argv and argv[0].endswith(b"triton_python_backend_stub"):
                # argv: stub, model path, shm region, sizes..., parent pid, libpython, ipc handle, instance name
                names = [a.decode(errors="replace") for a in argv if re.fullmatch(rb"[\w.-]+_\d+_\d+", a)]
                found[int(stat.parent.name)] = names[-1] if names else argv[1].decode(errors="replace")
        return found

    def failure(self) -> str | None:
        """Why the server can no longer answer, or None while it is whole: the process exited, or a
        model's stub process died (Triton keeps running then, but fails that model's requests with
        "Stub process is not healthy" and never answers the ones it had in flight)."""
        if not self.proc:
            return "tritonserver is not running"
        if self.proc.poll() is not None:
            return f"tritonserver exited with code {self.proc.returncode}"
        for pid, name in self.stubs.items():
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                state = "gone"
            if state in ("Z", "X", "gone"):
                return f"the Python stub of model instance {name} (pid {pid}) died"
        return None

    def _backends(self) -> Path:
        bundle = bundle_dir()
        py = f"{sys.version_info[0]}.{sys.version_info[1]}"
        stub = bundle / "python_backend_stubs" / py / "triton_python_backend_stub"
        if not stub.exists():
            raise FailedPrecondition(f"the bundled Triton has no Python backend stub for Python {py}")
        target = self._workdir / "backends" / "python"
        target.mkdir(parents=True, exist_ok=True)
        for src in (bundle / "backends" / "python" / "libtriton_python.so",
                    bundle / "backends" / "python" / "triton_python_backend_utils.py", stub):
            (target / src.name).symlink_to(src)
        return target.parent

    def command(self) -> list[str]:
        s = self.settings
        bundle = bundle_dir()
        return [str(bundle / "bin" / "tritonserver"),
                f"--model-repository={Path(s.repo).resolve()}",
                f"--backend-directory={self._backends()}",
                f"--cache-directory={bundle / 'caches'}",
                f"--grpc-port={s.grpc_port}", f"--http-port={s.http_port}", f"--metrics-port={s.metrics_port}",
                f"--grpc-address={s.host}", f"--http-address={s.host}", f"--metrics-address={s.host}",
                f"--exit-timeout-secs={s.exit_timeout}",
                f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                "--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0", "--log-verbose=0",
                f"--http-restricted-api={RESTRICTED_HTTP}:{ADMIN_HEADER}={self.admin_key}",
                f"--grpc-restricted-protocol={RESTRICTED_GRPC}:{ADMIN_HEADER}={self.admin_key}",
                *s.extra_args]

    def environment(self) -> dict:
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.prefix) / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        libdir = sysconfig.get_config_var("LIBDIR") or str(Path(sys.base_prefix) / "lib")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, env.get("LD_LIBRARY_PATH")]))
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.update(lifecycle.environment_for(self._workdir))  # where the stubs find the stop note
        return env

    def start(self) -> "TritonServer":
        lifecycle.sweep()  # what servers killed before they could stop left: folders, shm, processes
        if not (Path(self.settings.repo) / "shelfsight.json").exists():
            self.stop()
            raise FailedPrecondition(f"{self.settings.repo} is not a shelfsight repository (no shelfsight.json)")
        # appended: under a supervisor the next server writes the same --triton-log, after the failed one's
        self._log = open(self.log_path, "a")
        self._log.write(f"==== tritonserver starting (shm prefix {self.shm_prefix}) ====\n")
        self._log.flush()
        # its own session: its stubs join its process group, which stop() kills as one
        self.proc = lifecycle.spawn(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                    env=self.environment(), start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, lines: int = 40) -> str:
        """The reasons models failed (if any), then the end of the log."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        reasons = [ln for ln in text if "failed to load '" in ln or "UNAVAILABLE:" in ln]
        return "\n".join(dict.fromkeys(reasons[:10] + text[-lines:]))

    def _wait_ready(self) -> None:
        url = f"http://{self.settings.host}:{self.settings.http_port}/v2/health/ready"
        deadline = time.monotonic() + self.settings.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Unavailable(f"tritonserver exited with code {self.proc.returncode} while starting:\n"
                                  f"{self.log_tail()}")
            text = self.log_path.read_text(errors="replace")
            for line in FATAL_LOG_LINES:
                if line in text:
                    raise Unavailable(f"tritonserver failed to start ({line}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        self.stubs = self._children()
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise Unavailable(f"tritonserver was not ready after {self.settings.startup_timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, graceful: bool = True, drain: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL after a grace period; reap the server, kill any stub left behind,
        remove its shared memory, and its work folder unless it failed (then the log stays for reading,
        and the path is in the message that reported the failure). Requests in flight get `drain`
        seconds (default: settings.drain_timeout) to finish, then end with UNAVAILABLE.
        graceful=False kills at once: for a broken server, whose in-flight requests would never end."""
        if self._stopped:  # once: the process group id of a reaped server may belong to another by now
            return self.proc.returncode if self.proc else None
        self._stopped = True
        rc = None
        if self.proc and self.proc.poll() is None and not graceful:
            os.killpg(self.proc.pid, signal.SIGKILL)
            rc = self.proc.wait()
        elif self.proc and self.proc.poll() is None:
            lifecycle.write_stop_note(self._workdir, self.settings.drain_timeout if drain is None else drain)
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(self.settings.exit_timeout + 15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                rc = self.proc.wait()
        elif self.proc:
            rc = self.proc.returncode
        if self.proc:  # stubs are in the server's process group; none must outlive it
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in self.stubs:  # and by pid, in case one left the group (after a kill -9 of the server)
            try:
                if b"triton_python_backend_stub" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)  # checked first: the pid may have been reused
            except OSError:
                pass
        for leftover in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            leftover.unlink(missing_ok=True)
        if getattr(self, "_log", None):
            self._log.close()
        keep_log = rc not in (0, None) and self.settings.log_path is None
        if keep_log:
            lifecycle.release(self._workdir)  # the log is the user's now: no sweep removes it
        shutil.rmtree(self._workdir / "backends" if keep_log else self._workdir, ignore_errors=True)
        return rc

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
