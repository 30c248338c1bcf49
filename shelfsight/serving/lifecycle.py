"""What a launched tritonserver must not outlive, and how it is told to stop.

Three things, shared by the launcher (tritonserver.py) and the Python models inside the stubs:

Children die with their parent. `spawn()` starts a process that gets SIGKILL the moment the process
that started it dies (Linux PR_SET_PDEATHSIG), so a `kill -9` of `shelfsight serve` no longer leaves
tritonserver serving on its ports. The signal fires when the *thread* that forked the child ends, not
the process: Triton is started from asyncio.to_thread workers and restarted from others, so every
spawn runs on one thread of its own that lives as long as the process does. The stubs need nothing:
each one checks every 300 ms that its tritonserver still exists and exits when it does not.

Leftovers of dead servers are removed. A process killed at once leaves its work folder
(/tmp/shelfsight-triton-*) and its shared-memory regions (/dev/shm/<prefix>*). Each folder carries an
owner record (the owning process's pid and start time, and the shm prefix); `sweep()`, run before
every start, removes what belongs to owners that are gone - and any process still running from such a
folder. Folders of live owners (another test, another user's server) and folders without a record
are never touched.

The stop note. Before the launcher sends SIGTERM it writes, in the work folder, how many seconds
requests in flight may still take. Triton itself cannot end a request that is decoding: a cancelled
stream's cancellation stops at the ensemble's step boundary, so Triton's exit waited for requests
nobody read any more and ran into its exit timeout. `StopNoteWatch` (in the generate model)
hands the number to the engine, which finishes what it can in that time and ends the rest with
UNAVAILABLE.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable

log = logging.getLogger("shelfsight.serving.lifecycle")

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
OWNER_FILE = "owner.json"
FOLDER_PREFIXES = ("shelfsight-triton-", "shelfsight-serve-")
STOP_NOTE_ENV = "SHELFSIGHT_STOP_NOTE"  # the note's path, in the environment tritonserver hands its stubs
STOP_NOTE_POLL = 0.1  # seconds; a stat call ten times a second in the stub

# ---- children die with their parent ----

_spawns: queue.Queue | None = None
_spawns_lock = threading.Lock()
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the forked child only calls it


def spawn(argv: list[str], **popen_kwargs) -> subprocess.Popen:
    """subprocess.Popen(argv, ...) whose process is SIGKILLed when this process dies."""
    global _spawns
    with _spawns_lock:
        if _spawns is None:
            _spawns = queue.Queue()
            threading.Thread(target=_spawn_forever, args=(_spawns,), name="shelfsight-spawner", daemon=True).start()
    done: concurrent.futures.Future = concurrent.futures.Future()
    _spawns.put((argv, popen_kwargs, done))
    return done.result()


def _spawn_forever(requests: queue.Queue) -> None:
    """The spawning thread: it never returns, so it ends only with the process."""
    parent = os.getpid()

    # preexec_fn is documented as unsafe with threads because the child may need a lock another
    # thread held at fork; this one takes none: a resolved libc call and getppid.
    def die_with_parent():
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the death signal was armed
            os._exit(1)

    while True:
        argv, kwargs, done = requests.get()
        try:
            done.set_result(subprocess.Popen(argv, preexec_fn=die_with_parent, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the caller, whose spawn() raises it
            done.set_exception(e)


# ---- owner records and the sweep of dead owners' leftovers ----

def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (it tells a pid's reuse apart), or None when
    it is gone - or dead and not yet reaped by its parent (a zombie owns nothing)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def claim(folder: Path, shm_prefix: str = "") -> None:
    """Record this process as the owner of `folder` (and of the shm regions named `shm_prefix`*)."""
    record = {"pid": os.getpid(), "start": _start_time(os.getpid()), "shm_prefix": shm_prefix}
    _write_whole(folder / OWNER_FILE, json.dumps(record))  # a sweeper never reads half a record


def _write_whole(path: Path, text: str) -> None:
    """Write `path` so that a reader finds it whole or absent: a sibling file, then a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def release(folder: Path) -> None:
    """Give up ownership: what stays in `folder` (a failed server's log) is the user's to read."""
    (folder / OWNER_FILE).unlink(missing_ok=True)


def _owner_gone(record: dict) -> bool:
    start = _start_time(int(record["pid"]))
    return start is None or start != record.get("start")


def sweep(tmpdir: Path | None = None) -> list[Path]:
    """Remove the work folders, shm regions and processes of shelfsight servers whose owner died.
    Returns the folders removed."""
    tmpdir = Path(tmpdir or tempfile.gettempdir())
    removed = []
    for folder in sorted(p for prefix in FOLDER_PREFIXES for p in tmpdir.glob(f"{prefix}*")):
        try:
            if folder.stat().st_uid != os.getuid():
                continue
            record = json.loads((folder / OWNER_FILE).read_text())
            if not _owner_gone(record):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue  # no record (being created, released, or not ours to judge): left alone
        killed = _kill_processes_of(folder)
        prefix = record.get("shm_prefix") or ""
        regions = list(Path("/dev/shm").glob(f"{prefix}*")) if prefix else []
        for region in regions:
            region.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
        log.warning("removed what a dead server (pid %s) left: %s, %d shm regions, %d processes",
                    record.get("pid"), folder, len(regions), killed)
    return removed


SERVER_PROGRAMS = (b"tritonserver", b"triton_python_backend_stub")


def _kill_processes_of(folder: Path) -> int:
    """SIGKILL this user's tritonservers and stubs that run from `folder` (a server whose death signal
    could not fire: its argv, and its stubs', name the folder's backends directory). Only those two
    programs: a `tail -f` of the dead server's log is someone reading it."""
    needle, killed = str(folder).encode(), 0
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if (proc.stat().st_uid != os.getuid() or os.path.basename(argv[0]) not in SERVER_PROGRAMS
                    or not any(needle in a for a in argv)):
                continue
            os.kill(int(proc.name), signal.SIGKILL)
            killed += 1
        except OSError:
            continue  # gone meanwhile
    return killed


# ---- the stop note ----

def write_stop_note(folder: Path, drain_seconds: float) -> Path:
    """Tell the models in a server started with `environment_for(folder)` to end their requests
    within `drain_seconds` (0: now). Written before SIGTERM."""
    note = folder / "stopping"
    _write_whole(note, f"{max(0.0, drain_seconds):.3f}\n")
    return note


def environment_for(folder: Path) -> dict[str, str]:
    return {STOP_NOTE_ENV: str(folder / "stopping")}


class StopNoteWatch:
    """In a model (inside the stub): calls `on_stop(drain_seconds)` once, on its own thread, when
    the launcher's note appears. Without the environment variable (Triton started some other way)
    it does nothing, and Triton's own exit timeout is all there is."""

    def __init__(self, on_stop: Callable[[float], None]):
        self.path = os.environ.get(STOP_NOTE_ENV)
        self._on_stop = on_stop
        self._closed = threading.Event()
        self._thread = None
        if self.path:
            self._thread = threading.Thread(target=self._watch, name="shelfsight-stop-note", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        while not self._closed.wait(STOP_NOTE_POLL):
            try:
                text = Path(self.path).read_text()
            except OSError:
                continue  # not written (yet)
            try:
                drain = float(text.strip())
            except ValueError:
                drain = 0.0  # unreadable: the launcher is stopping us all the same
            self._on_stop(drain)
            return

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
