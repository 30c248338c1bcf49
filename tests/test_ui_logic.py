"""The web UI's logic without a browser: JSON answers as tables, staging batch uploads (zips included,
hostile names refused), errors in words, and the `shelfsight ui` command line."""
from __future__ import annotations

import csv
import json
import re
import socket
import subprocess
import sys
import urllib.request
import zipfile

import pytest

from shelfsight import errors
from shelfsight.ui import ask, batch
from tests.conftest import ROOT
from tests.imagefiles import encode, photo


def test_json_answers_become_tables_wherever_the_json_sits():
    assert ask.json_table('{"brand": "Velora", "colour": "blue"}') == (
        ["field", "value"], [["brand", "Velora"], ["colour", "blue"]])
    fenced = 'Here you go:\n```json\n[{"name": "soap", "count": 2}, {"name": "tea"}]\n```'
    assert ask.json_table(fenced) == (["name", "count"], [["soap", "2"], ["tea", ""]])
    assert ask.json_table('The product is {"brand": "Kumo", "spec": {"ml": 500}} I think.') == (
        ["field", "value"], [["brand", "Kumo"], ["spec", '{"ml": 500}']])
    assert ask.json_table("A blue storage box by Velora.") is None
    assert ask.json_table("{broken json") is None and ask.json_table("[]") is None


def test_controls_default_to_the_serving_defaults_and_become_request_arguments():
    from shelfsight.params import GenerationParams

    served = GenerationParams()
    req = ask.Controls().request()
    assert (req["temperature"], req["top_p"], req["max_new_tokens"], req["repetition_penalty"]) == (
        served.temperature, served.top_p, served.max_new_tokens, served.repetition_penalty)
    assert req["seed"] is None and req["cache"] == "use" and req["enhance"] is False


def test_controls_read_and_fill_the_page_widgets():
    # the page's widgets give strings and floats; the request gets the parameters' own types
    c = ask.Controls.from_page(0.5, 0.9, 12.0, 1.05, " 7 ", True, "skip", False)
    assert c.request() == dict(temperature=0.5, top_p=0.9, max_new_tokens=12, repetition_penalty=1.05, seed=7,
                               enhance=True, cache="skip", response_format=None)
    from shelfsight import formats

    assert ask.Controls(structured=True).request()["response_format"] == formats.PRODUCT
    assert type(c.request()["max_new_tokens"]) is int
    assert ask.Controls.from_page(*c.to_page()) == c  # reopening a history entry fills the same widgets
    assert ask.Controls.from_page(0.3, 0.85, 256, 1.1, "", False, "use").seed is None
    with pytest.raises(errors.InvalidArgument, match="seed must be a whole number .* got 'x7'"):
        ask.Controls.from_page(0.3, 0.85, 256, 1.1, "x7", False, "use")


def test_errors_are_told_in_words_without_internals():
    target = "127.0.0.1:1"
    assert ask.explain(errors.InvalidArgument("top_p must be in (0, 1], got 0.0"), target) == \
        "That cannot be asked: top_p must be in (0, 1], got 0.0."
    down = ask.explain(errors.Unavailable("failed to connect to all addresses; last error: UNKNOWN: ipv4:..."), target)
    assert "127.0.0.1:1 is not answering right now (it cannot be reached)" in down and "ipv4" not in down
    assert "model is not ready" in ask.explain(errors.Unavailable("model is not ready"), target)
    assert "busy" in ask.explain(errors.ResourceExhausted("64 requests in flight"), target)
    assert "within 30 s" in ask.explain(errors.DeadlineExceeded("deadline"), target, timeout=30)
    odd = ask.explain(KeyError("secret internals"), target)
    assert "KeyError" in odd and "secret internals" not in odd


def test_a_photo_is_shown_upright_and_a_non_photo_is_named():
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees the other way
    seen = ask.as_model_sees(encode(photo(300, 180, seed=1), "JPEG", exif=exif.tobytes()))
    assert seen.size == (180, 300) and seen.mode == "RGB"
    with pytest.raises(errors.InvalidArgument, match="not a supported format"):
        ask.as_model_sees(b"%PDF-1.7 not a photo")
    with pytest.raises(errors.InvalidArgument, match="no photo yet"):
        ask.read_photo(None)


def test_staging_takes_photos_and_zips_leaves_out_the_rest_and_refuses_escaping_names(tmp_path):
    up = tmp_path / "uploads"
    up.mkdir()
    (up / "a.png").write_bytes(encode(photo(64, 64, seed=1), "PNG"))
    (up / "notes.txt").write_text("not a photo")
    with zipfile.ZipFile(up / "shelf.zip", "w") as z:
        z.writestr("shelf/b.jpg", encode(photo(64, 64, seed=2), "JPEG"))
        z.writestr("../../escape.jpg", encode(photo(64, 64, seed=3), "JPEG"))
        z.writestr("__MACOSX/shelf/._b.jpg", b"resource fork")
        z.writestr("shelf/readme.md", "hello")
    (up / "broken.zip").write_bytes(b"PK not really")
    items, skipped = batch.stage([str(up / n) for n in ("a.png", "notes.txt", "shelf.zip")], tmp_path / "staged")
    assert [name for name, _ in items] == ["a.png", "escape.jpg", "shelf__b.jpg"]
    assert all(p.parent == tmp_path / "staged" for _, p in items)  # nothing written outside the batch
    assert not (tmp_path / "escape.jpg").exists()
    assert skipped == ["notes.txt", "shelf.zip/shelf/readme.md"]
    with pytest.raises(errors.InvalidArgument, match="broken.zip is not a readable zip"):
        batch.stage([str(up / "broken.zip")], tmp_path / "other")
    with pytest.raises(errors.InvalidArgument, match=r"no photos to ask about.*notes.txt"):
        batch.stage([str(up / "notes.txt")], tmp_path / "none")


def test_batch_table_and_exports_follow_the_results_file(tmp_path):
    out = tmp_path / batch.RESULTS
    items = [("a.png", tmp_path / "a.png"), ("b.png", tmp_path / "b.png"), ("c.png", tmp_path / "c.png")]
    answer = {"image": "a.png", "question": "Q", "text": "soap, 2 bars", "cache_status": "miss", "prompt_tokens": 9,
              "completion_tokens": 4, "finish_reason": "stop", "seconds": 0.123, "model_id": "m"}
    out.write_text(json.dumps(answer) + "\n" + '{"image": "c.png", "quest')  # the last line is mid-write
    (tmp_path / "results.errors.jsonl").write_text(json.dumps(
        {"image": "b.png", "question": "Q", "error": "INVALID_ARGUMENT", "message": "image is empty"}) + "\n")
    results, failures = batch.read_rows(out, "Q")
    assert batch.table(items, results, failures) == [
        ["a.png", "soap, 2 bars", "miss", 4, 0.12, ""],
        ["b.png", "", "", "", "", "INVALID_ARGUMENT: image is empty"],
        ["c.png", "", "", "", "", ""]]
    csv_path, jsonl_path = batch.export(results, failures, out)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["image"], r["text"], r["error"]) for r in rows] == [("a.png", "soap, 2 bars", ""),
                                                                    ("b.png", "", "INVALID_ARGUMENT")]
    assert len(jsonl_path.read_text().splitlines()) == 2


def test_history_exports_as_jsonl_without_server_paths(tmp_path):
    entry = {"time": "10:00:00", "photo": "p.jpg", "photo_path": "/tmp/gradio/abc/p.jpg", "question": "Q",
             "answer": "A" * 100, "controls": {}, "meta": {"cache_status": "exact"}}
    assert ask.history_rows([entry])[0][3].endswith("...") and ask.history_rows([entry])[0][4] == "exact"
    lines = ask.history_jsonl([entry, entry], tmp_path / "h.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "photo_path" not in json.loads(lines[0]) and json.loads(lines[0])["answer"] == "A" * 100


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_ui_command_serves_on_loopback_and_names_a_taken_port():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "shelfsight", "ui", "--target", "127.0.0.1:1", "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert re.match(rf"web UI on http://127\.0\.0\.1:{port}/ \(gateway 127\.0\.0\.1:1\)", line), line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as r:
            assert r.status == 200 and b"shelfsight workbench" in r.read()
        taken = subprocess.run([sys.executable, "-m", "shelfsight", "ui", "--port", str(port)], cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
        assert taken.returncode == 2 and f"the web UI cannot listen on 127.0.0.1:{port}" in taken.stderr
        assert "Traceback" not in taken.stderr
    finally:
        proc.terminate()
        proc.wait(30)
