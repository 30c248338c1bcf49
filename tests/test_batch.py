"""`shelfsight batch`: interrupted and resumed, every image is answered exactly once; failures are
kept apart and retried; files it does not read are counted and named, never skipped in silence."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from tests import imagefiles
from shelfsight.client import batch as batch_module
from tests.conftest import ROOT, shelfsight


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
    assert summary["unsupported"] == 1 and "1 file not asked about" in done.stderr and "notes.txt" in done.stderr
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


def test_scan_separates_images_from_other_files(tmp_path):
    for name in ("a.JPG", "sub/b.png", "album.jpg/c.webp", "notes.txt", "sub/readme.md", ".DS_Store"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    images, others = batch_module.scan(tmp_path)
    rel = lambda paths: [p.relative_to(tmp_path).as_posix() for p in paths]  # noqa: E731
    assert rel(images) == ["a.JPG", "album.jpg/c.webp", "sub/b.png"]  # a folder named *.jpg is not a file
    assert rel(others) == [".DS_Store", "notes.txt", "sub/readme.md"]


def test_batch_names_the_files_it_leaves_out(tmp_path):
    """No server needed: every image is already answered, so nothing is asked (the channel is lazy)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "p0.jpg").write_bytes(imagefiles.encode(imagefiles.photo(64, 64, seed=1), "JPEG"))
    for i in range(12):
        (folder / f"spec{i:02d}.pdf").write_bytes(b"%PDF")
    out = folder / "results.jsonl"  # inside the folder: its own files are not reported
    out.write_text(json.dumps({"image": "p0.jpg", "question": batch_module.DEFAULT_QUESTION, "text": "x"}) + "\n")
    r = shelfsight("batch", str(folder), "--out", str(out), "--target", "127.0.0.1:9", "--no-progress")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert (summary["total"], summary["skipped"], summary["answered"], summary["unsupported"]) == (1, 1, 0, 12)
    note = [ln for ln in r.stderr.splitlines() if "not asked about" in ln]
    assert len(note) == 1 and note[0].startswith("batch: 12 files not asked about")
    assert "spec00.pdf" in note[0] and "spec09.pdf" in note[0] and "and 2 more" in note[0]
    assert "results" not in note[0]


def test_batch_of_a_folder_without_images_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    r = shelfsight("batch", str(tmp_path), "--out", str(tmp_path / "r.jsonl"), "--target", "127.0.0.1:9")
    assert r.returncode == 2
    assert r.stderr.strip() == (f"shelfsight: error: image folder {tmp_path} holds no image files; 1 file not "
                                "asked about (not .jpg/.jpeg/.png/.webp/.bmp/.gif): notes.txt")
    assert not (tmp_path / "r.jsonl").exists()
