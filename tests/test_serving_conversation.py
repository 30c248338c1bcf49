"""Several pictures and turns through a real tritonserver: the MESSAGES form of the contract, on both
ensembles, equal to transformers' generate(), batched with classic requests, and refused clearly when
it is malformed or over a limit."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from shelfsight import errors
from shelfsight.conversation import ASSISTANT, PICTURE, USER, Conversation, Turn
from shelfsight.model import imaging
from shelfsight.model.checkpoint import load_model
from shelfsight.serving import contract
from shelfsight.serving.pipeline import PipelineClient, pack_pictures
from tests.conftest import run
from tests.test_serving import GREEDY, QUESTIONS, pictures

TWO = Conversation.ask("Are these the same product?", pictures=2)
TURNS = Conversation((Turn(USER, (PICTURE, "What is this?")), Turn(ASSISTANT, ("A coffee grinder.",)),
                      Turn(USER, (PICTURE, PICTURE, "Which of these two is it?"))))


def expected(checkpoint, conv: Conversation, images: list[bytes]) -> str:
    from transformers import AutoProcessor

    model = load_model(checkpoint, dtype="float32")
    processor = AutoProcessor.from_pretrained(checkpoint)
    text = processor.apply_chat_template(conv.messages(), add_generation_prompt=True, tokenize=False)
    inp = processor(text=[text], images=[imaging.decode(p) for p in images],
                    size={"shortest_edge": 65_536, "longest_edge": 1_048_576}, return_tensors="pt")
    ids = model.generate(**inp, max_new_tokens=GREEDY["max_new_tokens"], do_sample=False, repetition_penalty=1.1)
    return processor.tokenizer.decode(ids[0, inp["input_ids"].shape[1]:], skip_special_tokens=True)


async def converse(server, images, conv, stream: bool, **params):
    client = PipelineClient(server.grpc_url)
    try:
        if stream:
            return "".join([d.text async for d in client.converse_stream(images, conv, **params)])
        return (await client.converse(images, conv, **params)).text
    finally:
        await client.close()


def test_conversations_equal_transformers_generate_on_both_ensembles(triton, tiny_checkpoint):
    cases = [(TWO, pictures()[:2]), (TURNS, pictures()[2:5])]
    for conv, images in cases:
        want = expected(tiny_checkpoint, conv, images)
        assert run(converse(triton, images, conv, stream=False, **GREEDY)) == want
        assert run(converse(triton, images, conv, stream=True, **GREEDY)) == want


def test_conversations_batched_with_classic_requests(triton):
    images = pictures()

    async def alone():
        return ([await converse(triton, images[:2], TWO, True, **GREEDY)],
                [(await PipelineClient(triton.grpc_url).infer(images[5], QUESTIONS[1], **GREEDY)).text])

    async def together():
        client = PipelineClient(triton.grpc_url)
        try:
            return await asyncio.gather(converse(triton, images[:2], TWO, True, **GREEDY),
                                        client.infer(images[5], QUESTIONS[1], **GREEDY),
                                        converse(triton, images[:2], TWO, False, **GREEDY))
        finally:
            await client.close()
    (two,), (single,) = run(alone())
    got = run(together())
    assert [got[0], got[1].text, got[2]] == [two, single, two]


def stock_infer(server, inputs: dict):
    """The contract through a stock tritonclient, as a platform service would call it."""
    tensors = []
    for name, (dtype, value) in inputs.items():
        t = grpcclient.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        tensors.append(t)
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        return c.infer(contract.UNARY, tensors)


def test_stock_client_sends_a_conversation(triton):
    images = pictures()[:2]
    data, sizes = pack_pictures(images)
    result = stock_infer(triton, {
        contract.MESSAGES: ("BYTES", np.array([[TWO.to_json()]], dtype=object)),
        contract.IMAGES: ("UINT8", data[None]), contract.IMAGE_SIZES: ("INT64", sizes[None]),
        "TEMPERATURE": ("FP32", np.array([[0.0]], np.float32)), "MAX_NEW_TOKENS": ("INT32", np.array([[20]], np.int32))})
    assert result.as_numpy(contract.TEXT)[0, 0].decode() == run(converse(triton, images, TWO, False, **GREEDY))


@pytest.mark.parametrize("inputs, message", [
    (lambda imgs: {contract.MESSAGES: ("BYTES", np.array([[TWO.to_json()]], dtype=object)),
                   contract.IMAGE: ("UINT8", np.frombuffer(imgs[0], np.uint8)[None])}, "send IMAGE in it, not beside it"),
    (lambda imgs: {contract.MESSAGES: ("BYTES", np.array([[TWO.to_json()]], dtype=object)),
                   contract.IMAGES: ("UINT8", np.frombuffer(imgs[0], np.uint8)[None]),
                   contract.IMAGE_SIZES: ("INT64", np.array([[5, 7]], np.int64))}, "do not add up"),
    (lambda imgs: {contract.MESSAGES: ("BYTES", np.array([[TWO.to_json()]], dtype=object)),
                   contract.IMAGES: ("UINT8", np.frombuffer(imgs[0], np.uint8)[None]),
                   contract.IMAGE_SIZES: ("INT64", np.array([[len(imgs[0])]], np.int64))}, "place 2 pictures; 1 were sent"),
    (lambda imgs: {contract.MESSAGES: ("BYTES", np.array([[b"[{"]], dtype=object))}, "messages is not valid JSON"),
    (lambda imgs: {contract.MESSAGES: ("BYTES", np.array([[Conversation.ask("q", pictures=9).to_json()]], dtype=object)),
                   contract.IMAGES: ("UINT8", np.frombuffer(imgs[0] * 9, np.uint8)[None]),
                   contract.IMAGE_SIZES: ("INT64", np.array([[len(imgs[0])] * 9], np.int64))}, "9 pictures; the limit is 8"),
    (lambda imgs: {contract.QUESTION: ("BYTES", np.array([[b"q"]], dtype=object))}, "IMAGE and QUESTION, or MESSAGES"),
])
def test_malformed_conversations_are_invalid_argument(triton, inputs, message):
    with pytest.raises(Exception) as e:
        stock_infer(triton, inputs(pictures()[:1]))
    typed = errors.parse(str(e.value))
    assert isinstance(typed, errors.InvalidArgument) and message in typed.message, str(e.value)


def test_pictures_over_the_model_length_are_refused_with_their_token_counts(triton):
    big = pictures()[7]  # 1024x768: 768 visual tokens each at the default bounds
    conv = Conversation.ask("Compare them.", pictures=6)
    with pytest.raises(errors.InvalidArgument, match=r"\(\d+ of them for 6 picture\(s\)\) \+ max_new_tokens 20; "
                                                     r"the model length is 4096"):
        run(converse(triton, [big] * 6, conv, False, **GREEDY))
