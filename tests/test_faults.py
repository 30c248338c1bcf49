"""Faults injected for real into the main job: `shelfsight serve` (a real tritonserver under its
supervisor, the real gateway) with the tiny model, under load. Every request sent is counted: each one
is either answered or given a clear status (UNAVAILABLE), within a bound - none hangs, none is lost
silently. Recovery times are measured from the moment the fault is injected."""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from shelfsight import errors
from shelfsight.client import ShelfsightClient
from shelfsight.serving.tritonserver import free_port
from tests import imagefiles
from tests.conftest import ROOT, make_repository, scrape

pytestmark = pytest.mark.slow
LONG = dict(temperature=0.0, max_new_tokens=400, cache="skip")


def photo(seed: int) -> bytes:
    return imagefiles.encode(imagefiles.photo(320, 320, seed=seed), "JPEG", quality=90)


class Serve:
    """`shelfsight serve` in a child process on free ports."""

    def __init__(self, repo: Path, *extra: str):
        self.ports = {name: free_port() for name in ("port", "metrics", "grpc", "http", "tmetrics")}
        self.out: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shelfsight", "serve", "--repo", str(repo), "--port", str(self.ports["port"]),
             "--metrics-port", str(self.ports["metrics"]), "--triton-grpc-port", str(self.ports["grpc"]),
             "--triton-http-port", str(self.ports["http"]), "--triton-metrics-port", str(self.ports["tmetrics"]),
             *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 240
        while not any(line.startswith("serving:") for line in self.out):
            assert self.proc.poll() is None and time.monotonic() < deadline, "".join(self.out[-30:])
            time.sleep(0.2)
        self.target = f"127.0.0.1:{self.ports['port']}"

    def _read(self):
        for line in self.proc.stdout:
            self.out.append(line)

    def triton_pid(self) -> int:
        (pid,) = [p for p in children(self.proc.pid) if b"tritonserver" in cmdline(p).split(b"\0")[0]]
        return pid

    def stub_pid(self, model: str) -> int:
        (pid,) = [p for p in children(self.triton_pid()) if f"/{model}/1/model.py".encode() in cmdline(p)]
        return pid

    def triton_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['http']}/v2/health/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def folder(self) -> Path:
        """The running tritonserver's work folder (the last one announced: killed ones keep logs)."""
        return Path([line for line in self.out if " log /" in line][-1].split(" log ")[-1].strip()).parent

    def shm_prefix(self) -> str:
        region = cmdline(children(self.triton_pid())[0]).split(b"\0")[2].decode()  # <unique prefix><uuid>
        return "_".join(region.split("_")[:2]) + "_"

    def metric(self, name: str) -> float:
        return sum(v for k, v in scrape(f"http://127.0.0.1:{self.ports['metrics']}/metrics").items()
                   if k.startswith(name + "{"))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(90)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    return out


def alive(pid: int) -> bool:
    """Running, and not a zombie nobody reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def running_from(folder: Path) -> list[int]:
    """Processes whose command line names `folder`: its tritonserver and stubs."""
    return [int(p.name) for p in Path("/proc").glob("[0-9]*") if str(folder).encode() in cmdline(int(p.name))
            and alive(int(p.name))]


def shm(prefix: str) -> list[str]:
    return [f for f in os.listdir("/dev/shm") if f.startswith(prefix)]


def refuses(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def under_load(target: str, n: int, fault, bound: float):
    """n long answers in flight, then `fault()`; returns each request's (outcome, seconds) once all ended."""
    results: list = [None] * n

    def ask(i):
        t0 = time.monotonic()
        try:
            with ShelfsightClient(target) as c:
                c.recognize(photo(100 + i), f"Question {i}: read the label.", timeout=bound, **LONG)
            results[i] = ("OK", time.monotonic() - t0)
        except errors.ShelfsightError as e:
            results[i] = (e.code, time.monotonic() - t0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    time.sleep(1.5)  # all admitted and decoding
    fault()
    for t in threads:
        t.join(bound + 10)
    return results


def wait_serving(target: str, since: float, limit: float = 180) -> float:
    """Seconds from `since` until the gateway answers a real request again."""
    with ShelfsightClient(target) as c:
        while time.monotonic() - since < limit:
            try:
                if c.health() == "SERVING":
                    c.recognize(photo(1), "What brand?", temperature=0.0, max_new_tokens=4, cache="skip", timeout=30)
                    return time.monotonic() - since
            except errors.Unavailable:
                pass
            time.sleep(0.05)
    raise AssertionError(f"not serving again within {limit}s")


@pytest.fixture(scope="module")
def serve(tiny_checkpoint, tmp_path_factory):
    server = Serve(make_repository(tiny_checkpoint, tmp_path_factory.mktemp("faults") / "repo"))
    yield server
    server.stop()


def test_serve_prints_every_address(serve):
    line = next(line for line in serve.out if line.startswith("serving:"))
    for port in serve.ports.values():
        assert f":{port}" in line, line
    assert "log " in line


def test_dead_model_stub_fails_in_flight_at_once_and_recovers(serve):
    stub = serve.stub_pid("generate")
    seen_not_serving = []

    def kill_stub():
        os.kill(stub, signal.SIGKILL)
        t = time.monotonic()
        with ShelfsightClient(serve.target) as c:
            while time.monotonic() - t < 5 and not seen_not_serving:
                if c.health() == "NOT_SERVING":
                    seen_not_serving.append(time.monotonic() - t)
        kill_stub.at = t

    results = under_load(serve.target, 4, kill_stub, bound=120)
    # answered or refused with UNAVAILABLE, and at once: not at the 120 s deadline
    assert all(r is not None and r[0] in ("OK", "UNAVAILABLE") for r in results), results
    assert all(r[1] < 10 for r in results), results
    assert seen_not_serving and seen_not_serving[0] < 2, "health never said NOT_SERVING"
    recovered = wait_serving(serve.target, kill_stub.at)
    print(f"dead generate stub: in-flight failed after {max(r[1] for r in results):.1f}s, "
          f"NOT_SERVING after {seen_not_serving[0]:.2f}s, serving again after {recovered:.1f}s")
    assert not alive(stub)
    assert serve.stub_pid("generate") != stub
    assert serve.metric("shelfsight_upstream_up") == 1


def test_killed_triton_is_reaped_and_restarted(serve):
    triton = serve.triton_pid()
    stubs = children(triton)
    assert len(stubs) >= 3
    region = cmdline(stubs[0]).split(b"\0")[2].decode()  # <unique prefix><uuid>
    shm_prefix = "_".join(region.split("_")[:2]) + "_"

    def kill_triton():
        os.kill(triton, signal.SIGKILL)
        kill_triton.at = time.monotonic()

    results = under_load(serve.target, 4, kill_triton, bound=120)
    assert all(r is not None and r[0] in ("OK", "UNAVAILABLE") and r[1] < 10 for r in results), results
    while time.monotonic() - kill_triton.at < 180 and (alive(triton) or not serve.triton_ready()):
        time.sleep(0.05)
    back = time.monotonic()
    # the gateway follows within 2 s of Triton being ready again (it took 38 s with gRPC's default backoff)
    follow = wait_serving(serve.target, back)
    print(f"killed tritonserver: serving again after {time.monotonic() - kill_triton.at:.1f}s, "
          f"{follow:.2f}s after Triton was ready")
    assert follow < 2.0
    assert not alive(triton), "the killed tritonserver was left a zombie"
    assert not [p for p in stubs if alive(p)], "the killed server's stubs were orphaned"
    assert serve.triton_pid() != triton
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(shm_prefix)], "its shared memory was kept"


def test_kill_9_of_serve_leaves_nothing_running_and_the_next_start_cleans_up(serve, tiny_checkpoint, tmp_path):
    """kill -9 of `serve` used to orphan tritonserver and its stubs (still serving, ports held), and
    leave their folder and shared memory. The module's `serve` is the live instance that must stay."""
    repo = make_repository(tiny_checkpoint, tmp_path / "repo")
    victim = Serve(repo)
    folder, prefix = victim.folder(), victim.shm_prefix()
    triton, stubs = victim.triton_pid(), children(victim.triton_pid())
    assert len(stubs) >= 3 and shm(prefix) and running_from(folder)
    live_folder, live_prefix = serve.folder(), serve.shm_prefix()

    os.kill(victim.proc.pid, signal.SIGKILL)
    t0 = time.monotonic()
    # the stubs' command lines name the repository, not the folder: wait for them by pid too
    while (running_from(folder) or alive(triton) or any(alive(p) for p in stubs)) and time.monotonic() - t0 < 15:
        time.sleep(0.05)
    gone = time.monotonic() - t0
    assert not running_from(folder), f"outlived a killed serve: {running_from(folder)}"
    assert not alive(triton) and not [p for p in stubs if alive(p)]
    assert all(refuses(port) for port in victim.ports.values()), victim.ports
    assert folder.exists(), "(the leftover the next start must remove)"

    # the next start (`shelfsight triton` here) removes what the dead one left, and only that
    ports = [str(free_port()) for _ in range(3)]
    nxt = subprocess.Popen([sys.executable, "-m", "shelfsight", "triton", "--repo", str(repo), "--grpc-port", ports[0],
                            "--http-port", ports[1], "--metrics-port", ports[2]],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        lines = [nxt.stdout.readline()]
        while lines[-1] and "tritonserver ready" not in lines[-1]:
            lines.append(nxt.stdout.readline())
        assert "tritonserver ready" in lines[-1], "".join(lines)
        assert not folder.exists() and not shm(prefix)
        assert live_folder.exists() and shm(live_prefix) and running_from(live_folder)
        with ShelfsightClient(serve.target) as c:
            assert c.health() == "SERVING"
    finally:
        nxt.send_signal(signal.SIGTERM)
        out, _ = nxt.communicate(timeout=90)
    print(f"kill -9 of serve: tritonserver and {len(stubs)} stubs gone after {gone:.2f}s")
    assert nxt.returncode == 0, out[-3000:]
    assert "removed what a dead server" in "".join(lines), "".join(lines)


def test_sigterm_after_load_exits_cleanly(tiny_checkpoint, tmp_path):
    """32 streams, a third of them abandoned mid-answer, for 12 s; then SIGTERM with answers in flight.
    It used to end in Triton's "Exit timeout expired" (exit code 1, folders left): finished streams
    cancelled after their last answer leaked Triton requests, and decodes nobody read kept Triton's
    exit waiting. Every request is counted: answered, abandoned by its client, or UNAVAILABLE."""
    server = Serve(make_repository(tiny_checkpoint, tmp_path / "repo"), "--shutdown-grace", "5")
    folder, prefix = server.folder(), server.shm_prefix()
    stopping, lock = threading.Event(), threading.Lock()
    started, ended, at_stop = [0], {}, {}

    def client(i):
        rnd = random.Random(i)
        with ShelfsightClient(server.target) as c:
            while not stopping.is_set():
                with lock:
                    started[0] += 1
                abandon, outcome = rnd.random() < 0.33, "OK"
                try:
                    for n, _ in enumerate(c.stream(photo(rnd.randrange(10**6)), f"Question {i}: the brand?",
                                                   timeout=90, temperature=0.0, max_new_tokens=256, cache="skip")):
                        if abandon and n == 2:
                            outcome = "abandoned"
                            break
                except errors.ShelfsightError as e:
                    outcome = e.code
                with lock:
                    ended[outcome] = ended.get(outcome, 0) + 1
                    if stopping.is_set():
                        at_stop[outcome] = at_stop.get(outcome, 0) + 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    time.sleep(12)
    stopping.set()
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    rc = server.proc.wait(120)
    took = time.monotonic() - t0
    for t in threads:
        t.join(30)
    text = "".join(server.out)
    print(f"SIGTERM after load: exit code {rc} after {took:.1f}s; {started[0]} requests: {ended}; "
          f"ended after SIGTERM: {at_stop}")
    assert rc == 0 and "Exit timeout expired" not in text and "stopped\n" in text, text[-3000:]
    assert not [t for t in threads if t.is_alive()], "a request was never answered"
    assert sum(ended.values()) == started[0] and set(ended) <= {"OK", "abandoned", "UNAVAILABLE"}, ended
    assert sum(at_stop.values()) >= 8, f"too few requests were in flight at SIGTERM to test it: {at_stop}"
    assert not folder.exists() and not shm(prefix) and not running_from(folder)
    assert took < 5 + 25, "longer than the gateway's grace plus Triton's unloading"


def test_sigterm_stops_cleanly(serve):
    """Last in this module: it stops the shared server."""
    triton = serve.triton_pid()
    stubs = children(triton)
    log_dir = serve.folder()
    assert log_dir.exists()
    assert serve.stop() == 0, "".join(serve.out[-20:])
    text = "".join(serve.out)
    assert "Exit timeout expired" not in text and "stopped\n" in text
    assert not alive(triton) and not [p for p in stubs if alive(p)]
    assert not log_dir.exists(), "a clean stop left its /tmp/shelfsight-triton-* folder behind"


def test_serve_gives_up_after_repeated_failures(tiny_checkpoint, tmp_path):
    repo = make_repository(tiny_checkpoint, tmp_path / "repo")
    server = Serve(repo, "--max-restarts", "2")
    triton = server.triton_pid()
    # from now on the model cannot load: every restart fails
    (repo / "generate" / "1" / "model.py").write_text("raise RuntimeError('injected: this model cannot load')\n")
    os.kill(triton, signal.SIGKILL)
    rc = server.proc.wait(240)
    text = "".join(server.out)
    assert rc == 1, text[-3000:]
    assert "giving up" in text
    assert not alive(triton)
    leftovers = [p for p in Path("/proc").glob("[0-9]*") if str(repo).encode() in cmdline(int(p.name))]
    assert not leftovers, "a tritonserver or stub outlived `serve`"
    shutil.rmtree(repo, ignore_errors=True)
