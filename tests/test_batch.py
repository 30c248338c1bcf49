"""`shelfsight batch`: interrupted and resumed, every image is answered exactly once; failures are
kept apart and retried."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from tests import imagefiles
from tests.conftest import ROOT


def batch(folder, out, target, *extra):
    return [sys.executable, "-m", "shelfsight", "batch", str(folder), "--out", str(out), "--target", target,
            "--concurrency", "2", "--temperature", "0", "--max-new-tokens", "24", "--no-progress", *extra]


def lines(path):
    return path.read_text().splitlines() if path.exists() else []


def test_interrupted_batch_resumes_without_loss_or_repeats(gateway, tmp_path):
    folder = tmp_path / "photos"
    (folder / "shelf2").mkdir(parents=True)
    names = []
    for i in range(12):
        name = f"{'shelf2/' if i % 3 == 0 else ''}p{i:02d}.jpg"
        (folder / name).write_bytes(imagefiles.encode(imagefiles.photo(300, 260, seed=200 + i), "JPEG"))
        names.append(name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "results.jsonl"
    target = f"127.0.0.1:{gateway.port}"

    proc = subprocess.Popen(batch(folder, out, target, "--cache", "skip"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(lines(out)) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # a hard crash, not a polite Ctrl-C
    proc.wait(30)
    partial = len(lines(out))
    assert 4 <= partial < 12
    with open(out, "a") as f:  # a write torn by the crash
        f.write('{"image": "p99.jpg", "question": "Describe')

    done = subprocess.run(batch(folder, out, target), cwd=ROOT, capture_output=True, text=True, timeout=300)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["total"] == 13 and summary["skipped"] == partial and summary["failed"] == 1
    assert summary["answered"] == 12 - partial
    assert done.returncode == 1  # one image could not be answered
    rows = [json.loads(line) for line in lines(out)]
    assert sorted(r["image"] for r in rows) == sorted(names)  # each exactly once, the torn line gone
    assert all(r["completion_tokens"] == 24 and r["text"] for r in rows)
    errors = [json.loads(line) for line in lines(tmp_path / "results.errors.jsonl")]
    assert [e["image"] for e in errors] == ["broken.jpg"] and errors[0]["error"] == "INVALID_ARGUMENT"

    again = subprocess.run(batch(folder, out, target), cwd=ROOT, capture_output=True, text=True, timeout=300)
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert (summary["skipped"], summary["answered"], summary["failed"]) == (12, 0, 1)  # only the broken one retried
    assert len(lines(out)) == 12
