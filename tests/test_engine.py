"""The engine, in process (no Triton): parity with transformers' generate(), batch invariance,
seeded sampling, cancellation, limits and the vision-feature cache."""
from __future__ import annotations

import dataclasses

import threading

import pytest
import torch

from shelfsight import errors, params
from shelfsight.engine import Engine, EngineConfig, Request
from shelfsight.errors import InvalidArgument, ResourceExhausted
from shelfsight.model import imaging
from shelfsight.model.checkpoint import load_model
from shelfsight.model.preprocessing import load_preprocessor
from shelfsight.params import GenerationParams
from tests import imagefiles

SIZES = [(448, 448), (320, 640), (800, 600), (256, 256), (500, 333), (640, 640), (300, 900), (1024, 768)]
QUESTIONS = ["What brand is this product?", "List every product you see.", "Read the label.", "What colour is it?"]


class Collect:
    def __init__(self, cancel_after: int | None = None):
        self.text, self.done, self.finish, self.error = "", threading.Event(), None, None
        self.usage, self.deltas, self.cancel_after = None, 0, cancel_after

    def is_cancelled(self):
        return self.cancel_after is not None and self.deltas >= self.cancel_after

    def send(self, delta, prompt, completion, finish):
        self.text += delta
        self.deltas += 1
        if finish:
            self.finish, self.usage = finish, (prompt, completion)
            self.done.set()

    def fail(self, error):
        self.error = error
        self.done.set()


@pytest.fixture(scope="module")
def setup(tiny_checkpoint):
    from transformers import AutoProcessor

    torch.set_num_threads(2)
    model = load_model(tiny_checkpoint, dtype="float32")  # what CPU serving computes in
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    pre = load_preprocessor(tiny_checkpoint, 65_536, 1_048_576, imaging.ImageLimits(), params.Limits())
    engine = Engine(model, processor.tokenizer, EngineConfig(max_batch=8, max_waiting=64))
    engine.start()
    yield model, processor, pre, engine
    engine.stop()


def images():
    return [imagefiles.encode(imagefiles.photo(w, h, seed=i), "JPEG", quality=90) for i, (w, h) in enumerate(SIZES)]


def submit(engine, pre, data, question, p: GenerationParams, sink=None):
    x = pre(data, question)
    sink = sink or Collect()
    engine.submit(Request.of(x, p, sink))
    return sink


def transformers_answer(model, processor, data, question, max_new_tokens, repetition_penalty):
    picture = imaging.decode(data)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inp = processor(text=[text], images=[picture], size={"shortest_edge": 65_536, "longest_edge": 1_048_576},
                    return_tensors="pt")
    out = model.generate(**inp, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=repetition_penalty)
    new = out[0, inp["input_ids"].shape[1]:]
    return processor.tokenizer.decode(new, skip_special_tokens=True), len(new)


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.1])
def test_greedy_parity_with_transformers_generate(setup, repetition_penalty):
    model, processor, pre, engine = setup
    answers = set()
    for i, data in enumerate(images()[:4]):
        q = QUESTIONS[i % 4]
        expected, n = transformers_answer(model, processor, data, q, 20, repetition_penalty)
        sink = submit(engine, pre, data, q, GenerationParams(max_new_tokens=20, temperature=0.0,
                                                             repetition_penalty=repetition_penalty))
        assert sink.done.wait(60) and sink.error is None
        assert sink.text == expected
        assert sink.usage[1] == n
        answers.add(sink.text)
    assert len(answers) == 4  # the random model's answers do depend on the input


def test_concurrent_equals_sequential(setup):
    _, _, pre, engine = setup
    data = images()
    p = GenerationParams(max_new_tokens=24, temperature=0.0)
    sequential = []
    for i, d in enumerate(data):
        sink = submit(engine, pre, d, QUESTIONS[i % 4], p)
        assert sink.done.wait(60)
        sequential.append(sink.text)
    engine.vision_cache = type(engine.vision_cache)(0)  # recompute vision features in the batch too
    sinks = [submit(engine, pre, d, QUESTIONS[i % 4], p) for i, d in enumerate(data)]
    assert all(s.done.wait(120) for s in sinks)
    assert [s.text for s in sinks] == sequential
    assert len(set(sequential)) == len(sequential)


def test_seeded_sampling_is_reproducible_in_any_company(setup):
    _, _, pre, engine = setup
    data = images()
    seeded = GenerationParams(max_new_tokens=16, temperature=1.0, top_p=0.95, top_k=0, seed=1234)
    alone = submit(engine, pre, data[0], QUESTIONS[0], seeded)
    assert alone.done.wait(60)
    crowd = [submit(engine, pre, d, QUESTIONS[1], GenerationParams(max_new_tokens=16, temperature=1.0))
             for d in data[1:5]]
    again = submit(engine, pre, data[0], QUESTIONS[0], seeded)
    other = submit(engine, pre, data[0], QUESTIONS[0], GenerationParams(max_new_tokens=16, temperature=1.0,
                                                                        top_p=0.95, top_k=0, seed=99))
    for s in crowd + [again, other]:
        assert s.done.wait(60)
    assert again.text == alone.text
    assert other.text != alone.text


def test_length_finish_and_usage(setup):
    _, _, pre, engine = setup
    sink = submit(engine, pre, images()[3], QUESTIONS[0], GenerationParams(max_new_tokens=5, temperature=0.0))
    assert sink.done.wait(60)
    assert sink.finish == "length" and sink.usage[1] == 5 and sink.usage[0] > 64


def test_cancelled_request_leaves_the_others_alone(setup):
    _, _, pre, engine = setup
    data = images()
    p = GenerationParams(max_new_tokens=30, temperature=0.0)
    cancelled = submit(engine, pre, data[0], QUESTIONS[0], p, Collect(cancel_after=2))
    others = [submit(engine, pre, d, QUESTIONS[1], p) for d in data[1:4]]
    assert all(s.done.wait(60) for s in others)
    assert all(s.finish == "length" and s.usage[1] == 30 for s in others)
    # the cancelled request still gets a last word (Triton completes a decoupled request only then)
    assert cancelled.done.wait(10) and isinstance(cancelled.error, errors.Cancelled)
    assert cancelled.deltas <= 3 and cancelled.finish is None
    assert engine.load() == (0, 0)


def test_inconsistent_requests_are_refused_at_submit(setup):
    _, _, pre, engine = setup
    x = pre(images()[0], QUESTIONS[0])
    p = GenerationParams(max_new_tokens=4, temperature=0.0)
    ids = torch.from_numpy(x.input_ids)
    grid = torch.from_numpy(x.image_grid_thw)
    with pytest.raises(InvalidArgument, match="image-token runs"):
        engine.submit(Request(ids[:-30], torch.from_numpy(x.pixels), grid, ("k",), p, Collect()))
    with pytest.raises(InvalidArgument, match=rf"pixels must be {x.pixels.size} bytes .* got 10 torch.uint8"):
        engine.submit(Request(ids, torch.from_numpy(x.pixels[:10]), grid, ("k",), p, Collect()))
    with pytest.raises(InvalidArgument, match=f"got {x.pixels.size} torch.float32"):  # patches are not pixels
        engine.submit(Request(ids, torch.from_numpy(x.pixels).float(), grid, ("k",), p, Collect()))
    with pytest.raises(InvalidArgument, match=r"\[\[1, 3, 4\]\] is not a multiple of the model's merge size 2"):
        engine.submit(Request(ids, torch.zeros(12 * 16 * 16 * 3, dtype=torch.uint8), torch.tensor([[1, 3, 4]]), ("k",),
                              p, Collect()))
    with pytest.raises(InvalidArgument, match="1 image keys for 2 pictures"):
        engine.submit(Request(ids, torch.from_numpy(x.pixels), grid.repeat(2, 1), ("k",), p, Collect()))
    with pytest.raises(InvalidArgument, match="exceeds the model length"):
        engine.submit(Request(ids, torch.from_numpy(x.pixels), grid, ("k",),
                              GenerationParams(max_new_tokens=40_000), Collect()))


def test_queue_bound(tiny_checkpoint, setup):
    model, processor, pre, _ = setup
    small = Engine(model, processor.tokenizer, EngineConfig(max_batch=1, max_waiting=2))  # not started
    p = GenerationParams(max_new_tokens=2, temperature=0.0)
    data = images()[0]
    submit(small, pre, data, "q", p)
    submit(small, pre, data, "q", p)
    with pytest.raises(ResourceExhausted, match="retry later"):
        submit(small, pre, data, "q", p)


def test_vision_cache_reuses_features_without_changing_answers(setup, monkeypatch):
    _, _, pre, engine = setup
    hits = []
    monkeypatch.setattr(engine.observer.inner, "vision_cache", hits.append)
    monkeypatch.setattr(engine, "vision_cache", type(engine.vision_cache)(64 << 20))
    data, p = images()[5], GenerationParams(max_new_tokens=12, temperature=0.0)
    first = submit(engine, pre, data, QUESTIONS[2], p)
    assert first.done.wait(60)
    second = submit(engine, pre, data, QUESTIONS[2], p)
    assert second.done.wait(60)
    assert hits[-2:] == [False, True]
    assert second.text == first.text


def test_responses_are_paced_but_the_text_is_whole(setup):
    """Each response is an IPC round trip through Triton's stub: a stream gets its first token at once,
    then at most one response per `stream_interval`, and the last; the text is the same."""
    model, processor, pre, engine = setup
    data, p = images()[0], GenerationParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    every = Engine(model, processor.tokenizer, EngineConfig(max_batch=2, stream_interval=0.0))
    paced = Engine(model, processor.tokenizer, EngineConfig(max_batch=2, stream_interval=3600.0))
    for e in (every, paced):
        e.start()
    try:
        a, b = submit(every, pre, data, QUESTIONS[0], p), submit(paced, pre, data, QUESTIONS[0], p)
        assert a.done.wait(120) and b.done.wait(120)
    finally:
        every.stop()
        paced.stop()
    assert (b.text, b.usage, b.finish) == (a.text, a.usage, a.finish) and a.usage[1] == 24
    assert b.deltas == 2 and a.deltas > 10  # first token and the rest at the end, against one per token


@pytest.mark.parametrize("cache_bytes", [0, 64 << 20])
def test_one_vision_pass_for_a_picture_asked_twice_in_one_group(setup, monkeypatch, cache_bytes):
    """Two questions about the same photo prefilled together run the vision tower once; with the
    vision cache off no lookups are counted (there was nothing to look up)."""
    from shelfsight.engine.prefill import VisionCache, vision

    model, _, pre, _ = setup
    calls, seen = [], []
    real = model.model.get_image_features
    monkeypatch.setattr(model.model, "get_image_features",
                        lambda pv, grid, **kw: calls.append(grid.shape[0]) or real(pv, grid, **kw))
    observer = type("Rec", (), {"vision_cache": lambda self, hit: seen.append(hit)})()
    data, other = images()[3], images()[4]
    reqs = []
    for picture, question in ((data, QUESTIONS[0]), (other, QUESTIONS[1]), (data, QUESTIONS[2])):
        x = pre(picture, question)
        reqs.append(Request.of(x, GenerationParams(), Collect()))
    assert reqs[0].image_keys == reqs[2].image_keys != reqs[1].image_keys
    with torch.inference_mode():
        feats = vision(model, reqs, VisionCache(cache_bytes), observer)
    assert calls == [2]  # one pass, two pictures
    assert feats[2][0] is feats[0][0] and not torch.equal(feats[1][0][0][:1], feats[0][0][0][:1])
    assert seen == ([False, False, False] if cache_bytes else [])
    # pictures without keys (a direct caller of `generate` may leave image_key out) are never shared or
    # cached: in one call or across calls, each keeps its own features
    cache, calls[:] = VisionCache(cache_bytes or 1 << 20), []
    keyless = [dataclasses.replace(r, image_keys=("",)) for r in reqs]
    with torch.inference_mode():
        first = vision(model, keyless[:2], cache, observer)
        second = vision(model, keyless[1:], cache, observer)
    assert calls == [2, 2] and cache.used == 0
    assert torch.equal(first[1][0][0], second[0][0][0]) and torch.equal(second[1][0][0], feats[0][0][0])
    assert not torch.equal(second[0][0][0][:1], second[1][0][0][:1])


def test_stop_sequences_end_the_answer_before_them_and_are_never_sent(setup):
    _, _, pre, engine = setup
    x = pre(images()[2], QUESTIONS[2])
    p = GenerationParams(max_new_tokens=30, temperature=0.0)
    whole = Collect()
    engine.submit(Request.of(x, p, whole))
    assert whole.done.wait(60) and len(whole.text) > 12
    stop = whole.text[8:11]  # three characters from inside the answer
    first = whole.text.find(stop)
    pieces = []

    class Pieces(Collect):
        def send(self, delta, prompt, completion, finish):
            pieces.append(delta)
            super().send(delta, prompt, completion, finish)

    cut = Pieces()
    engine.submit(Request.of(x, p, cut, stop=("never appears", stop)))
    assert cut.done.wait(60) and cut.error is None
    assert cut.text == whole.text[:first] and cut.finish == "stop"
    assert not any(stop in piece for piece in pieces)  # no part of it was streamed, then taken back
    assert cut.usage[1] < whole.usage[1]  # generation stopped there
