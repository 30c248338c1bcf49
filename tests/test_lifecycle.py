"""shelfsight/serving/lifecycle.py with real processes and real signals, no Triton: children die with
the process that spawned them (whichever thread spawned them), the sweep removes exactly what dead
owners left, and the stop note reaches a watcher in another process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from shelfsight.serving import lifecycle
from tests.conftest import ROOT


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def wait_gone(pid: int, limit: float) -> float:
    t0 = time.monotonic()
    while alive(pid):
        assert time.monotonic() - t0 < limit, f"pid {pid} still alive after {limit}s"
        time.sleep(0.02)
    return time.monotonic() - t0


def python(code: str, *args: str, **kw) -> subprocess.Popen:
    """A real Python child running `code`; the caller reads its output line by line."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, **kw)


def test_a_child_spawned_from_a_short_lived_thread_outlives_the_thread_but_not_the_process():
    # asyncio.to_thread workers start Triton; PR_SET_PDEATHSIG fires when the forking *thread* ends
    parent = python("""
        import threading, time
        from shelfsight.serving import lifecycle
        out = []
        t = threading.Thread(target=lambda: out.append(lifecycle.spawn(["sleep", "300"], start_new_session=True)))
        t.start(); t.join()
        print(out[0].pid, flush=True)
        time.sleep(300)
    """)
    child = int(parent.stdout.readline())
    try:
        time.sleep(1.0)
        assert alive(child), "the child died with the thread that spawned it"
        parent.kill()  # SIGKILL: nothing of the parent runs any more
        parent.wait(10)
        print(f"child gone {wait_gone(child, 5):.2f}s after its parent was killed")
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)


OWNER = """
    import os, sys
    from pathlib import Path
    from shelfsight.serving import lifecycle
    folder, prefix = Path(sys.argv[1]), sys.argv[2]
    folder.mkdir()
    lifecycle.claim(folder, prefix)
    (Path("/dev/shm") / (prefix + "region")).write_bytes(b"x" * 4096)
    # a "tritonserver" running from the folder, in a session of its own and without a death signal:
    # what a server killed before its death signal was armed would leave running
    (folder / "backends").mkdir()
    (folder / "backends" / "tritonserver").symlink_to("/bin/sleep")
    import subprocess
    orphan = subprocess.Popen([str(folder / "backends" / "tritonserver"), "300"], start_new_session=True)
    print(orphan.pid, flush=True)
    import time; time.sleep(300)
"""


def test_sweep_removes_what_dead_owners_left_and_nothing_else(tmp_path):
    prefixes = {name: f"shelfsight_test{os.getpid()}{name}_" for name in ("dead", "live")}
    owners = {name: python(OWNER, str(tmp_path / f"shelfsight-triton-{name}"), prefixes[name]) for name in prefixes}
    procs = {}
    try:
        for name, proc in owners.items():
            procs[name] = int(proc.stdout.readline())
        unowned = tmp_path / "shelfsight-triton-unowned"  # e.g. a failed server's kept log
        unowned.mkdir()
        (unowned / "tritonserver.log").write_text("why it failed\n")
        owners["dead"].kill()
        owners["dead"].wait(10)

        removed = lifecycle.sweep(tmp_path)

        assert removed == [tmp_path / "shelfsight-triton-dead"]
        assert not (tmp_path / "shelfsight-triton-dead").exists()
        assert not list(Path("/dev/shm").glob(f"{prefixes['dead']}*"))
        wait_gone(procs["dead"], 5)
        # the live owner's folder, region and process, and the unowned folder, are untouched
        assert (tmp_path / "shelfsight-triton-live" / lifecycle.OWNER_FILE).exists()
        assert list(Path("/dev/shm").glob(f"{prefixes['live']}*"))
        assert alive(procs["live"])
        assert (unowned / "tritonserver.log").exists()
        assert lifecycle.sweep(tmp_path) == []
    finally:
        for proc in owners.values():
            proc.kill()
        for pid in procs.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        for prefix in prefixes.values():
            for region in Path("/dev/shm").glob(f"{prefix}*"):
                region.unlink()


def test_a_reused_pid_is_not_a_live_owner(tmp_path):
    folder = tmp_path / "shelfsight-triton-reused"
    folder.mkdir()
    lifecycle.claim(folder)
    record = (folder / lifecycle.OWNER_FILE).read_text().replace('"start": ', '"start": 1')  # another start time
    (folder / lifecycle.OWNER_FILE).write_text(record)
    assert lifecycle.sweep(tmp_path) == [folder]


def test_the_stop_note_reaches_a_watcher_in_another_process(tmp_path):
    watcher = python("""
        import threading
        from shelfsight.serving import lifecycle
        got = threading.Event()
        seconds = []
        lifecycle.StopNoteWatch(lambda s: (seconds.append(s), got.set()))
        print("watching", flush=True)
        assert got.wait(30)
        print(seconds[0], flush=True)
    """, env=dict(os.environ, **lifecycle.environment_for(tmp_path)))
    assert watcher.stdout.readline().strip() == "watching"
    lifecycle.write_stop_note(tmp_path, 2.5)
    assert watcher.stdout.readline().strip() == "2.5"
    assert watcher.wait(10) == 0


@pytest.mark.parametrize("drain,exit_timeout", [(25.0, 30), (0.0, 5)])
def test_the_exit_timeout_leaves_time_to_unload_after_the_drain(tmp_path, drain, exit_timeout):
    from shelfsight.errors import InvalidArgument
    from shelfsight.serving.tritonserver import TritonServer, TritonSettings

    with pytest.raises(InvalidArgument, match="must leave"):
        TritonServer(TritonSettings(repo=tmp_path, drain_timeout=drain, exit_timeout=exit_timeout))
