"""The slot engine's parts: the scheduler and graph buckets (pure), the compact decoder step against the
reference runner on the same cache state, many requests at once against transformers' generate(),
seeded sampling across runners, and slots reused after requests finish, are cancelled or fail."""
from __future__ import annotations

import pytest
import torch

from shelfsight import errors
from shelfsight.engine import Engine, EngineConfig, Request, sampling
from shelfsight.engine.batch import Row
from shelfsight.engine.detokenize import IncrementalDetokenizer
from shelfsight.engine.graphs import StepGraphs, batch_buckets, kv_buckets, pick
from shelfsight.engine.prefill import VisionCache, prefill, vision
from shelfsight.engine.reference import ReferenceRunner
from shelfsight.engine.runner import SlotRunner
from shelfsight.engine.scheduler import Scheduler
from shelfsight.errors import ResourceExhausted
from shelfsight.params import GenerationParams
from tests.test_engine import QUESTIONS, Collect, images, setup, submit, transformers_answer  # noqa: F401


NO_METRICS = type("O", (), {"vision_cache": lambda *a: None})()


class FakeReq:  # the scheduler only reads these two attributes
    def __init__(self, n, cancelled=False):
        self.input_ids = torch.zeros(n)
        self.sink = type("S", (), {"is_cancelled": lambda self: cancelled})()


def test_scheduler_admits_lowest_free_slots_within_the_token_budget():
    s = Scheduler(slots=3, max_waiting=10, max_prefill_tokens=100)
    reqs = [FakeReq(60), FakeReq(30), FakeReq(30), FakeReq(10, cancelled=True), FakeReq(5)]
    for r in reqs:
        s.enqueue(r)
    admitted, cancelled = s.admit()
    assert [(r, slot) for r, slot in admitted] == [(reqs[0], 0), (reqs[1], 1)]  # 60 + 30; +30 > 100
    assert cancelled == [] and s.running == 2
    admitted, cancelled = s.admit()
    assert admitted == [(reqs[2], 2)] and s.running == 3
    assert s.admit() == ([], [])  # no free slot
    s.release(1)
    admitted, cancelled = s.admit()
    assert cancelled == [reqs[3]] and admitted == [(reqs[4], 1)]  # the freed slot, reused
    with pytest.raises(ValueError):
        s.release(1) or s.release(1)


def test_scheduler_first_request_always_fits_and_queue_is_bounded():
    s = Scheduler(slots=2, max_waiting=2, max_prefill_tokens=10)
    s.enqueue(FakeReq(500))
    s.enqueue(FakeReq(1))
    with pytest.raises(ResourceExhausted, match="retry later"):
        s.enqueue(FakeReq(1))
    admitted, _ = s.admit()
    assert len(admitted) == 1 and admitted[0][1] == 0
    assert len(s.drain()) == 1 and not s.waiting


def test_buckets():
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert kv_buckets(640) == [128, 256, 512, 640]
    assert pick([1, 2, 4, 8], 3) == 4 and pick([1, 2, 4, 8], 8) == 8
    with pytest.raises(ValueError):
        pick([1, 2], 3)


def test_step_graphs_disabled_run_eagerly_and_never_capture():
    calls = []
    g = StepGraphs(lambda B, L, greedy: calls.append((B, L, greedy)), enabled=False, harmless=None)
    g.warm_up([(4, 128, True)])
    g.run(2, 256, False)
    assert calls == [(2, 256, False)] and g.graphs == {}


def rows_for(reqs, slots, tokenizer):
    return [Row(r, s, sampling.seed_for(r.params), IncrementalDetokenizer(tokenizer)) for r, s in zip(reqs, slots)]


def slot_prefill(model, runner, rows, feats):
    """The slot runner's prefill (chunked by its config) until every row's prompt is in -> first tokens,
    and each row's last-position logits."""
    queue = runner.prefill_queue(model)
    queue.add(rows, feats)
    done, logits = [], []
    while len(queue):
        chunk = queue.step()
        assert not chunk.failed, chunk.error
        done += chunk.finished
        logits += [chunk.logits] if chunk.finished else []
    logits = torch.cat(logits)
    order = [[id(d) for d in done].index(id(r)) for r in rows]
    return runner.start([done[i] for i in order], logits[order]), logits[order]


def make_requests(pre, n, p):
    out = []
    for i, data in enumerate(images()[:n]):
        x = pre(data, QUESTIONS[i % 4])
        out.append(Request.of(x, p, Collect()))
    return out


@pytest.mark.parametrize("penalty", [1.0, 1.1])
def test_decode_step_logits_equal_the_reference_runner(setup, penalty):
    model, processor, pre, _ = setup
    p = GenerationParams(max_new_tokens=8, temperature=0.0, repetition_penalty=penalty)
    reqs = make_requests(pre, 3, p)
    slots = [0, 2, 5]  # gaps: slots 1, 3, 4 are padding rows of the step
    with torch.inference_mode():
        feats = vision(model, reqs, VisionCache(0), NO_METRICS)
        pre_out = prefill(model, reqs, feats)
        ref, new = ReferenceRunner(model), SlotRunner(model, EngineConfig(max_batch=8, max_model_len=2048))
        ref_rows, new_rows = rows_for(reqs, slots, processor.tokenizer), rows_for(reqs, slots, processor.tokenizer)
        for r, n, d in zip(ref_rows, pre_out.lengths, pre_out.deltas):
            r.length, r.delta = n, d
        first, logits = slot_prefill(model, new, new_rows, feats)
        # the compact prefill (decoder weights, K/V straight into the slots) against transformers' forward
        assert torch.allclose(logits, pre_out.logits, atol=1e-4, rtol=1e-4), float((logits - pre_out.logits).abs().max())
        assert [(r.length, r.delta) for r in new_rows] == [(r.length, r.delta) for r in ref_rows]
        assert ref.start(ref_rows, pre_out) == first
        for _ in range(4):
            a, b = ref.logits(ref_rows), new.logits(new_rows)
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), float((a - b).abs().max())
            # the runners then step on (the K/V just written are written again, identically)
            ta, tb = ref.decode(ref_rows, True), new.decode(new_rows, True)
            ref._mask = ref._mask[:, :-1]  # undo the extra column logits() added
            for layer in ref._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, :-1], layer.values[:, :, :-1]
            assert ta == tb
            for r in ref_rows + new_rows:
                r.length += 1


@pytest.mark.parametrize("chunk", [512, 45])
def test_many_at_once_equal_transformers_generate(setup, chunk):
    """45: prompts (about 280 tokens) prefill over several iterations, interleaved with decode steps of
    the rows already running, chunks cutting through pictures and across requests."""
    model, processor, pre, _ = setup
    engine = Engine(model, processor.tokenizer, EngineConfig(max_batch=8, max_waiting=64, prefill_chunk_tokens=chunk))
    engine.start()
    try:
        data = images() + images()[:3]  # 11 requests for 8 slots: three wait for a free one
        for penalty in (1.0, 1.1):
            p = GenerationParams(max_new_tokens=12, temperature=0.0, repetition_penalty=penalty)
            sinks = [submit(engine, pre, d, QUESTIONS[(i + 1) % 4], p) for i, d in enumerate(data)]
            assert all(s.done.wait(120) for s in sinks)
            for i, (d, s) in enumerate(zip(data, sinks)):
                expected, n = transformers_answer(model, processor, d, QUESTIONS[(i + 1) % 4], 12, penalty)
                assert s.error is None and (s.text, s.usage[1]) == (expected, n), i
        assert engine.load() == (0, 0)
    finally:
        engine.stop()


def test_chunked_prefill_writes_what_one_pass_writes(setup):
    """A prompt prefilled in chunks (the last one shared with the next request's first tokens) leaves
    the same K/V in its slot and the same last-position logits as one pass over the whole prompt."""
    model, processor, pre, _ = setup
    p = GenerationParams(max_new_tokens=4, temperature=0.0)
    reqs = make_requests(pre, 3, p)
    with torch.inference_mode():
        feats = vision(model, reqs, VisionCache(0), NO_METRICS)
        got = {}
        for chunk in (0, 45):
            runner = SlotRunner(model, EngineConfig(max_batch=4, max_model_len=1024, prefill_chunk_tokens=chunk))
            rows = rows_for(reqs, [2, 0, 1], processor.tokenizer)
            first, logits = slot_prefill(model, runner, rows, feats)
            n = [r.length for r in rows]
            kv = [torch.cat([c[r.slot, :, :k].flatten() for c in runner.decoder.k + runner.decoder.v])
                  for r, k in zip(rows, n)]
            got[chunk] = (first, logits, kv)
        assert got[0][0] == got[45][0]
        assert torch.allclose(got[0][1], got[45][1], atol=1e-4, rtol=1e-4)
        for a, b in zip(got[0][2], got[45][2]):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), float((a - b).abs().max())


def test_seeded_sampling_is_the_same_on_both_runners(setup):
    model, processor, pre, engine = setup
    reference = Engine(model, processor.tokenizer, EngineConfig(max_batch=4, runner="reference"))
    reference.start()
    try:
        p = GenerationParams(max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=40, seed=77)
        data = images()[2]
        a = submit(engine, pre, data, QUESTIONS[1], p)
        noise = [submit(engine, pre, d, QUESTIONS[0], GenerationParams(max_new_tokens=6, temperature=1.0))
                 for d in images()[:3]]
        b = submit(reference, pre, data, QUESTIONS[1], p)
        assert all(s.done.wait(60) for s in [a, b] + noise)
        assert a.text == b.text and a.usage == b.usage
    finally:
        reference.stop()


class Broken(Collect):
    """A request whose picture has the wrong patch width: its prefill fails, alone."""


def test_slots_are_reused_after_finish_cancel_and_failure(setup):
    model, processor, pre, _ = setup
    engine = Engine(model, processor.tokenizer, EngineConfig(max_batch=3, max_waiting=64, vision_cache_bytes=0))
    engine.start()
    try:
        p = GenerationParams(max_new_tokens=10, temperature=0.0, repetition_penalty=1.1)
        data = images()
        expected = []
        for i in range(4):
            s = submit(engine, pre, data[i], QUESTIONS[i % 4], p)
            assert s.done.wait(60)
            expected.append(s.text)
        x = pre(data[5], QUESTIONS[0])
        broken = Collect()
        # right in size and type, but on the meta device: the vision pass fails on it (a broken forward)
        engine.submit(Request(torch.from_numpy(x.input_ids), torch.empty(x.pixels.size, dtype=torch.uint8, device="meta"),
                              torch.from_numpy(x.image_grid_thw), ("broken",), p, broken))
        cancelled = [submit(engine, pre, data[6], QUESTIONS[1], GenerationParams(max_new_tokens=40, temperature=0.0),
                            Collect(cancel_after=2)) for _ in range(2)]
        again = [submit(engine, pre, data[i], QUESTIONS[i % 4], p) for i in range(4)]
        assert all(s.done.wait(120) for s in [broken] + cancelled + again)
        assert isinstance(broken.error, errors.Unavailable) and "prefill failed" in str(broken.error)
        assert all(isinstance(c.error, errors.Cancelled) for c in cancelled)
        assert [s.text for s in again] == expected
        assert engine.load() == (0, 0)
        assert engine.scheduler.free == [0, 1, 2]
    finally:
        engine.stop()


def test_fused_int4_linears_equal_their_parts():
    from shelfsight.model.gptq import rtn_quantize
    from shelfsight.model.qlinear import Int4Linear, fuse

    torch.manual_seed(0)
    x = torch.randn(5, 256)
    # q|k|v-like widths join into one module; widths that split the kernel's n-tiles (the CPU packing
    # tiles n by 64) fail the join's self-check and fall back to running the parts in turn
    for widths, joined in (((128, 64, 64), True), ((64, 32, 32), False)):
        parts = [Int4Linear(rtn_quantize(torch.randn(n, 256), 4, 128), torch.device("cpu")) for n in widths]
        fused = fuse(parts)
        assert isinstance(fused, Int4Linear) == joined
        assert torch.allclose(fused(x), torch.cat([m(x) for m in parts], -1), atol=1e-3)


def test_a_graph_warm_up_run_leaves_running_slots_untouched(setup):
    """Capturing a graph mid-serving first runs the step once eagerly, under `_harmless`: that run
    must not move any running request's state (K/V, next token, seen tokens); only the spare slot."""
    model, processor, pre, _ = setup
    p = GenerationParams(max_new_tokens=8, temperature=0.7, repetition_penalty=1.1, seed=3)
    reqs = make_requests(pre, 2, p)
    with torch.inference_mode():
        runner = SlotRunner(model, EngineConfig(max_batch=4, max_model_len=1024))
        rows = rows_for(reqs, [0, 1], processor.tokenizer)
        slot_prefill(model, runner, rows, vision(model, reqs, VisionCache(0), NO_METRICS))
        runner.decode(rows, False)
        for r in rows:
            r.length += 1

        def state():
            return ([k[:4].clone() for k in runner.decoder.k], [v[:4].clone() for v in runner.decoder.v],
                    runner.tokens[:4].clone(), runner.seen[:4].clone(), runner.meta.clone())

        before = state()
        for B in (4, 2):
            for greedy in (True, False):
                with runner._harmless(B):
                    runner._step(B, 256, greedy)
        after = state()
        for a, b in zip(before, after):
            for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
                assert torch.equal(x, y)
        assert runner.decoder.k[0][4].abs().sum() > 0  # the spare slot took the writes


def test_fused_kernels_that_fail_at_start_fall_back_to_torch_ops(setup):
    """Where the fused kernels pass their self-check but cannot run at the model's shapes, warm-up
    switches the decoder back to the torch ops instead of failing every request later. (Here the
    kernels fail for want of a GPU.)"""
    model, *_ = setup
    runner = SlotRunner(model, EngineConfig(max_batch=2, max_model_len=256))
    runner.decoder.fused = True
    runner.warm_up()
    assert runner.decoder.fused is False


def test_a_failing_prompt_in_a_packed_prefill_fails_alone(setup, monkeypatch):
    """When the packed forward of a chunk fails, each request is tried alone: only the one whose forward
    fails gets the error, the others finish with the tokens they would have had, and nothing is left in
    the queue. A group whose preparation fails queues none of its rows (no slot twice)."""
    model, processor, pre, _ = setup
    p = GenerationParams(max_new_tokens=4, temperature=0.0)
    reqs = make_requests(pre, 3, p)
    with torch.inference_mode():
        feats = vision(model, reqs, VisionCache(0), NO_METRICS)
        clean = SlotRunner(model, EngineConfig(max_batch=4, max_model_len=1024))
        want, _ = slot_prefill(model, clean, rows_for(reqs, [0, 1, 2], processor.tokenizer), feats)
        runner = SlotRunner(model, EngineConfig(max_batch=4, max_model_len=1024))
        real = runner.decoder.extend

        def extend(x, cos, sin, segments, deep=()):
            if any(s == 1 for s, _, _ in segments):
                raise RuntimeError("slot 1 is cursed")
            return real(x, cos, sin, segments, deep)

        monkeypatch.setattr(runner.decoder, "extend", extend)
        queue = runner.prefill_queue(model)
        rows = rows_for(reqs, [0, 1, 2], processor.tokenizer)
        queue.add(rows, feats)
        chunk = queue.step(decoding=False)
        assert [r.slot for r in chunk.failed] == [1] and "cursed" in str(chunk.error)
        assert [r.slot for r in chunk.finished] == [0, 2] and len(queue) == 0
        assert runner.start(chunk.finished, chunk.logits) == [want[0], want[2]]
        with pytest.raises(ValueError, match="picture tokens"):
            queue.add(rows_for(reqs[:2], [0, 1], processor.tokenizer), [feats[0], []])
        assert len(queue) == 0
