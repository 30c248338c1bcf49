"""The Triton ensemble on a real tritonserver with the tiny model: parity with transformers, streaming,
concurrency, per-request errors, metrics, and the launcher's start/stop behaviour."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from shelfsight import errors
from shelfsight.model import imaging
from shelfsight.model.checkpoint import load_model
from shelfsight.serving.pipeline import PipelineClient
from tests import imagefiles
from tests.conftest import ROOT, make_repository, run, running_triton, scrape

SIZES = [(448, 448), (320, 640), (800, 600), (256, 256), (500, 333), (640, 640), (300, 900), (1024, 768)]
QUESTIONS = ["What brand is this product?", "List every product you see.", "Read the label.", "What colour is it?"]
GREEDY = dict(temperature=0.0, max_new_tokens=20)


def pictures():
    return [imagefiles.encode(imagefiles.photo(w, h, seed=10 + i), "JPEG", quality=90) for i, (w, h) in enumerate(SIZES)]


async def ask(server, image, question, **params):
    client = PipelineClient(server.grpc_url)
    try:
        return await client.infer(image, question, **params)
    finally:
        await client.close()


async def ask_stream(server, image, question, **params):
    client = PipelineClient(server.grpc_url)
    try:
        return [d async for d in client.stream(image, question, **params)]
    finally:
        await client.close()


def transformers_answers(checkpoint, reference: bool, images, questions, repetition_penalty):
    from transformers import AutoProcessor

    model = load_model(checkpoint, dtype="float32", reference=reference)
    processor = AutoProcessor.from_pretrained(checkpoint)
    out = []
    for data, q in zip(images, questions):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        inp = processor(text=[text], images=[imaging.decode(data)],
                        size={"shortest_edge": 65_536, "longest_edge": 1_048_576}, return_tensors="pt")
        ids = model.generate(**inp, max_new_tokens=GREEDY["max_new_tokens"], do_sample=False,
                             repetition_penalty=repetition_penalty)[0, inp["input_ids"].shape[1]:]
        out.append((processor.tokenizer.decode(ids, skip_special_tokens=True), len(ids)))
    return out


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.1])
def test_bf16_pipeline_matches_transformers_generate(triton, tiny_checkpoint, repetition_penalty):
    images, questions = pictures()[:3], QUESTIONS[:3]
    expected = transformers_answers(tiny_checkpoint, False, images, questions, repetition_penalty)
    for data, q, (text, n) in zip(images, questions, expected):
        answer = run(ask(triton, data, q, repetition_penalty=repetition_penalty, **GREEDY))
        assert answer.text == text
        assert answer.completion_tokens == n and answer.finish_reason == "length"


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_pipeline_matches_dequantized_reference(exports, scheme, tmp_path):
    checkpoint = exports[scheme][0]
    images, questions = pictures()[:3], QUESTIONS[:3]
    expected = transformers_answers(checkpoint, True, images, questions, 1.0)
    with running_triton(make_repository(checkpoint, tmp_path / "repo")) as server:
        for data, q, (text, n) in zip(images, questions, expected):
            answer = run(ask(server, data, q, repetition_penalty=1.0, **GREEDY))
            assert answer.text == text and answer.completion_tokens == n


def test_stream_text_equals_unary_text(triton):
    for data, q in zip(pictures()[:3], QUESTIONS):
        unary = run(ask(triton, data, q, **GREEDY))
        deltas = run(ask_stream(triton, data, q, **GREEDY))
        assert len(deltas) > 1  # really streamed
        assert "".join(d.text for d in deltas) == unary.text
        assert deltas[-1].finish_reason == unary.finish_reason
        assert deltas[-1].completion_tokens == unary.completion_tokens
        assert all(not d.finish_reason for d in deltas[:-1])


def test_eight_concurrent_equal_eight_sequential(triton):
    images = pictures()
    sequential = [run(ask(triton, d, QUESTIONS[i % 4], **GREEDY)).text for i, d in enumerate(images)]

    async def together():
        client = PipelineClient(triton.grpc_url)
        try:
            return await asyncio.gather(*[client.infer(d, QUESTIONS[i % 4], **GREEDY) for i, d in enumerate(images)])
        finally:
            await client.close()

    concurrent = [a.text for a in run(together())]
    assert concurrent == sequential
    assert len(set(sequential)) == len(sequential)


def test_abandoned_stream_leaves_nothing_half_open(triton):
    """A client that stops reading and cancels: its answer still ends (Triton 2.51 does not pass the
    cancel into ensemble steps, so it decodes to its token limit), the engine frees the row, Triton
    completes the request, and the server keeps answering."""
    async def cancel_early():
        client = PipelineClient(triton.grpc_url)
        try:
            got = 0
            async for _ in client.stream(pictures()[2], QUESTIONS[0], temperature=0.0, max_new_tokens=120):
                got += 1
                if got == 3:
                    break  # the consumer leaves: the call is cancelled
        finally:
            await client.close()

    run(cancel_early())
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        metrics = scrape(triton.metrics_url)
        pending = sum(v for k, v in metrics.items() if k.startswith("nv_inference_pending_request_count"))
        running = sum(v for k, v in metrics.items() if k.startswith("shelfsight_engine_requests_running"))
        if pending == 0 and running == 0:
            break
        time.sleep(0.25)
    assert pending == 0 and running == 0
    assert run(ask(triton, pictures()[0], "still serving?", **GREEDY)).completion_tokens == 20


def test_defaults_come_from_the_manifest(triton):
    answer = run(ask(triton, pictures()[0], QUESTIONS[0]))  # no parameters at all
    assert answer.completion_tokens == 256 and answer.finish_reason == "length"  # random weights never stop


BAD_REQUESTS = {
    "empty bytes": (b"", "q", {}, "image is empty"),
    "not an image": (b"%PDF-1.7 not a picture", "q", {}, "not a supported format"),
    "truncated jpeg": ("truncate", "q", {}, "could not be decoded"),
    "decompression bomb": (imagefiles.png_bomb(), "q", {}, "decompression bomb"),
    "oversized": (imagefiles.encode(imagefiles.photo(7000, 6000, 1), "JPEG", quality=30), "q", {},
                  "pixels; the limit is 40000000"),
    "empty question": ("ok", "  ", {}, "question is empty"),
    "temperature": ("ok", "q", {"temperature": 3.0}, "temperature must be between 0 and 2"),
    "top_p": ("ok", "q", {"top_p": 0.0}, "top_p must be in (0, 1]"),
    "max_new_tokens": ("ok", "q", {"max_new_tokens": 0}, "max_new_tokens must be between 1 and 2048"),
    "repetition_penalty": ("ok", "q", {"repetition_penalty": -1.0}, "repetition_penalty must be in (0, 2]"),
    "seed": ("ok", "q", {"seed": -5}, "seed must be between 0 and 2^63-1"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_their_own_clear_error(triton, case):
    image, question, params, message = BAD_REQUESTS[case]
    good = pictures()[0]
    image = {"ok": good, "truncate": good[: len(good) // 3]}.get(image, image) if isinstance(image, str) else image
    with pytest.raises(errors.InvalidArgument) as info:
        run(ask(triton, image, question, **params))
    assert message in info.value.message
    assert run(ask(triton, good, "still serving?", **GREEDY)).completion_tokens == 20


def test_bad_request_in_a_batch_does_not_spoil_the_others(triton):
    images = pictures()[:4]

    async def mixed():
        client = PipelineClient(triton.grpc_url)
        try:
            calls = [client.infer(d, QUESTIONS[0], **GREEDY) for d in images]
            calls.insert(2, client.infer(b"garbage", QUESTIONS[0], **GREEDY))
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await client.close()

    results = run(mixed())
    assert isinstance(results[2], errors.InvalidArgument)
    assert all(r.completion_tokens == 20 for i, r in enumerate(results) if i != 2)


def test_engine_and_triton_metrics(triton):
    def scrape():
        with urllib.request.urlopen(triton.metrics_url) as r:
            return r.read().decode()

    def value(text, prefix):
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))

    before = scrape()
    run(ask(triton, pictures()[1], QUESTIONS[1], **GREEDY))
    after = scrape()
    assert value(after, 'nv_inference_count{model="pipeline"') - value(before, 'nv_inference_count{model="pipeline"') == 1
    assert value(after, "shelfsight_engine_generation_tokens_total") - value(before, "shelfsight_engine_generation_tokens_total") == 20
    assert value(after, "shelfsight_engine_time_to_first_token_seconds_count") > value(before, "shelfsight_engine_time_to_first_token_seconds_count")


def test_launcher_fails_fast_with_the_reason(tiny_checkpoint, tmp_path):
    repo = make_repository(tiny_checkpoint, tmp_path / "repo")
    manifest = (repo / "shelfsight.json").read_text().replace(str(tiny_checkpoint), str(tmp_path / "gone"))
    (repo / "shelfsight.json").write_text(manifest)
    from shelfsight.serving.tritonserver import TritonServer, TritonSettings

    t0 = time.monotonic()
    with pytest.raises(errors.Unavailable) as info:
        TritonServer(TritonSettings(repo=repo, startup_timeout=120)).start()
    assert time.monotonic() - t0 < 100
    assert "gone" in info.value.message and "does not exist" in info.value.message


def test_triton_command_stops_cleanly_on_sigterm(tiny_checkpoint, tmp_path):
    repo = make_repository(tiny_checkpoint, tmp_path / "repo")
    from shelfsight.serving.tritonserver import free_port

    proc = subprocess.Popen([sys.executable, "-m", "shelfsight", "triton", "--repo", str(repo),
                             "--grpc-port", str(free_port()), "--http-port", str(free_port()),
                             "--metrics-port", str(free_port())],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    line = proc.stdout.readline()
    assert "tritonserver ready" in line, line
    prefix = line.split("shm prefix ")[1].split(";")[0]
    assert [f for f in os.listdir("/dev/shm") if f.startswith(prefix)]  # the stubs' regions exist...
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    # exit code 0 from Triton too: its exit timeout leaves the stubs time to finalize
    assert proc.returncode == 0 and "tritonserver stopped (exit code 0)" in out, out
    log_path = Path(line.split("; log ")[1].split(";")[0])
    assert not log_path.parent.exists()  # a clean stop leaves no /tmp/shelfsight-triton-* folder behind
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(prefix)]  # ...and are gone
    assert not [p for p in Path("/proc").glob("[0-9]*") if _is_triton_of(p, repo)]


def _is_triton_of(proc_dir: Path, repo: Path) -> bool:
    try:
        return str(repo) in (proc_dir / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
