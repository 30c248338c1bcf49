"""How a launched tritonserver is told to stop, shared by the launcher (tritonserver.py) and the
Python models inside the stubs.

The stop note. Before the launcher sends SIGTERM it writes, in the work folder, how many seconds
requests in flight may still take. Triton itself cannot end a request that is decoding: a cancelled
stream's cancellation stops at the ensemble's step boundary, so Triton's exit waited for requests
nobody read any more and ran into its exit timeout. `StopNoteWatch` (in the generate model)
hands the number to the engine, which finishes what it can in that time and ends the rest with
UNAVAILABLE.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

STOP_NOTE_ENV = "SHELFSIGHT_STOP_NOTE"  # the note's path, in the environment tritonserver hands its stubs
STOP_NOTE_POLL = 0.1  # seconds; a stat call ten times a second in the stub

# ---- the stop note ----

def write_stop_note(folder: Path, drain_seconds: float) -> Path:
    """Tell the models in a server started with `environment_for(folder)` to end their requests
    within `drain_seconds` (0: now). Written before SIGTERM."""
    note = folder / "stopping"
    tmp = folder / ".stopping.tmp"
    tmp.write_text(f"{max(0.0, drain_seconds):.3f}\n")
    tmp.replace(note)
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
