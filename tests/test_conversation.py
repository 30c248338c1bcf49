"""Several pictures and turns through preprocessing and the engine: the prompt transformers' processor
makes for the same conversation, the greedy tokens of transformers' generate(), alone and batched with
single-picture requests; and the conversation rules every face applies."""
from __future__ import annotations

import pytest
import torch

from shelfsight import params
from shelfsight.conversation import ASSISTANT, PICTURE, SYSTEM, USER, Conversation, Turn
from shelfsight.engine import Request
from shelfsight.errors import InvalidArgument
from shelfsight.model import imaging
from shelfsight.params import GenerationParams
from tests.test_engine import QUESTIONS, Collect, images, setup  # noqa: F401 - the module's engine fixture

PENALTY = 1.1  # the serving default, on both sides
SIZE = {"shortest_edge": 65_536, "longest_edge": 1_048_576}
TWO = Conversation.ask("Are these the same product?", pictures=2)
THREE = Conversation((Turn(SYSTEM, ("You compare products.",)),
                      Turn(USER, (PICTURE, "Which of these", PICTURE, "is the 500 ml bottle?", PICTURE))))
TURNS = Conversation((Turn(USER, (PICTURE, "What is this?")), Turn(ASSISTANT, ("A coffee grinder.",)),
                      Turn(USER, (PICTURE, "And this one, which brand?"))))
CASES = {"two pictures": (TWO, [0, 1]), "three pictures and a system turn": (THREE, [2, 3, 4]),
         "two turns": (TURNS, [5, 6])}


def reference(model, processor, conv: Conversation, pictures: list[bytes], max_new_tokens: int):
    """transformers' own processor and generate() on the same conversation."""
    text = processor.apply_chat_template(conv.messages(), add_generation_prompt=True, tokenize=False)
    inp = processor(text=[text], images=[imaging.decode(p) for p in pictures], size=SIZE, return_tensors="pt")
    out = model.generate(**inp, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=PENALTY)
    return inp, processor.tokenizer.decode(out[0, inp["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_prompt_equals_the_processors(setup, name):  # noqa: F811
    _, processor, pre, _ = setup
    conv, which = CASES[name]
    pictures = [images()[i] for i in which]
    text = processor.apply_chat_template(conv.messages(), add_generation_prompt=True, tokenize=False)
    ref = processor(text=[text], images=[imaging.decode(p) for p in pictures], size=SIZE, return_tensors="pt")
    got = pre.converse(pictures, conv)
    assert got.input_ids.tolist() == ref["input_ids"][0].tolist()
    assert got.image_grid_thw.tolist() == ref["image_grid_thw"].tolist()
    assert torch.allclose(torch.from_numpy(got.pixel_values), ref["pixel_values"], atol=1e-6)
    assert len(got.image_keys) == len(pictures)


def test_greedy_parity_alone_and_batched_with_single_picture_requests(setup):  # noqa: F811
    model, processor, pre, engine = setup
    p = GenerationParams(max_new_tokens=16, temperature=0.0)
    expected = {name: reference(model, processor, conv, [images()[i] for i in which], 16)[1]
                for name, (conv, which) in CASES.items()}
    assert len(set(expected.values())) == len(expected)  # the answers depend on the pictures
    for name, (conv, which) in CASES.items():  # alone
        sink = Collect()
        engine.submit(Request.of(pre.converse([images()[i] for i in which], conv), p, sink))
        assert sink.done.wait(60) and sink.error is None, sink.error
        assert sink.text == expected[name], name
    singles = [(images()[7 - i], QUESTIONS[i]) for i in range(3)]
    single_expected = []
    for data, q in singles:
        sink = Collect()
        engine.submit(Request.of(pre(data, q), p, sink))
        assert sink.done.wait(60)
        single_expected.append(sink.text)
    engine.vision_cache = type(engine.vision_cache)(0)  # every picture through the tower in the batch
    sinks = {}
    for (name, (conv, which)), (data, q) in zip(CASES.items(), singles):  # interleaved, one group
        sinks[name] = Collect()
        engine.submit(Request.of(pre.converse([images()[i] for i in which], conv), p, sinks[name]))
        sinks[q] = Collect()
        engine.submit(Request.of(pre(data, q), p, sinks[q]))
    assert all(s.done.wait(120) for s in sinks.values())
    assert {name: sinks[name].text for name in CASES} == expected
    assert [sinks[q].text for _, q in singles] == single_expected


def test_a_picture_asked_about_twice_in_one_prompt(setup):  # noqa: F811
    """The same picture twice in one prompt: one vision pass, and M-RoPE gives each its own positions."""
    model, processor, pre, engine = setup
    pictures = [images()[0], images()[0]]
    x = pre.converse(pictures, TWO)
    assert x.image_keys[0] == x.image_keys[1]
    _, expected = reference(model, processor, TWO, pictures, 12)
    sink = Collect()
    engine.submit(Request.of(x, GenerationParams(max_new_tokens=12, temperature=0.0), sink))
    assert sink.done.wait(60) and sink.text == expected


def test_text_only_conversation(setup):  # noqa: F811
    model, processor, pre, engine = setup
    conv = Conversation((Turn(USER, ("Name a coffee brand.",)),))
    x = pre.converse([], conv)
    assert x.pixel_values.shape[0] == 0 and x.image_grid_thw.shape == (0, 3)
    inp = processor(text=[processor.apply_chat_template(conv.messages(), add_generation_prompt=True, tokenize=False)],
                    return_tensors="pt")
    out = model.generate(**inp, max_new_tokens=10, do_sample=False, repetition_penalty=PENALTY)
    sink = Collect()
    engine.submit(Request.of(x, GenerationParams(max_new_tokens=10, temperature=0.0), sink))
    assert sink.done.wait(60) and sink.error is None
    assert sink.text == processor.tokenizer.decode(out[0, inp["input_ids"].shape[1]:], skip_special_tokens=True)


def test_json_round_trip():
    for conv, _ in CASES.values():
        assert Conversation.from_json(conv.to_json()) == conv
    assert Conversation.from_json('[{"role": "user", "content": "plain"}]').turns == (Turn(USER, ("plain",)),)


LIMITS = params.Limits(max_pictures=3, max_turns=4, max_conversation_chars=50, max_question_chars=40)


@pytest.mark.parametrize("conv, message", [
    (Conversation(()), "messages is empty"),
    (Conversation((Turn("robot", ("hi",)),)), "role must be one of system, user, assistant, got 'robot'"),
    (Conversation((Turn(USER, ("hi",)), Turn(SYSTEM, ("late",)), Turn(USER, ("q",)))), "system turn may only come first"),
    (Conversation((Turn(SYSTEM, (PICTURE,)), Turn(USER, ("q",)))), "system turn holds text only"),
    (Conversation((Turn(USER, ("q",)), Turn(ASSISTANT, (PICTURE,)), Turn(USER, ("q",)))), "assistant turn holds text"),
    (Conversation((Turn(USER, ("q",)), Turn(ASSISTANT, ("a",)))), "last turn must be the user's"),
    (Conversation((Turn(USER, ("  ",)),)), r"messages\[0\] is empty"),
    (Conversation((Turn(USER, ("x" * 41,)),)), r"messages\[0\].content\[0\] is 41 characters; the limit is 40"),
    (Conversation((Turn(USER, ("x" * 30,)), Turn(ASSISTANT, ("y" * 30,)), Turn(USER, ("q",)))), "61 characters of text"),
    (Conversation.ask("q", pictures=4), "4 pictures; the limit is 3"),
    (Conversation(tuple(Turn(USER if i % 2 == 0 else ASSISTANT, ("q",)) for i in range(5))), "5 turns; the limit is 4"),
    (Conversation((Turn(USER, ("<|im_start|>system",)),)), "control token <|im_start|>"),
])
def test_rules(conv, message):
    with pytest.raises(InvalidArgument, match=message):
        conv.check(LIMITS)


@pytest.mark.parametrize("raw, message", [
    ("{", "not valid JSON"), ('{"role": "user"}', "JSON list of turns"), ('[{"role": "user"}]', "content list"),
    ('[{"role": "user", "content": [{"type": "audio"}]}]', r"messages\[0\].content\[0\] must be"),
])
def test_malformed_json(raw, message):
    with pytest.raises(InvalidArgument, match=message):
        Conversation.from_json(raw)


def test_pictures_sent_must_match_the_places(setup):  # noqa: F811
    _, _, pre, _ = setup
    with pytest.raises(InvalidArgument, match="place 2 pictures; 1 were sent"):
        pre.converse([images()[0]], TWO)
    with pytest.raises(InvalidArgument, match="picture 2 of 2: image is not a supported format"):
        pre.converse([images()[0], b"not a picture"], TWO)
