"""shelfsight/serving/lifecycle.py with real processes, no Triton: the stop note reaches a watcher in
another process."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shelfsight.serving import lifecycle
from tests.conftest import ROOT


def python(code: str, *args: str, **kw) -> subprocess.Popen:
    """A real Python child running `code`; the caller reads its output line by line."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, **kw)


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
