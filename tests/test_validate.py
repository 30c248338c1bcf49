"""The gateway's request check as the pure function it is: every rule and its message, in milliseconds.
No Triton and no gateway: a RecognizeRequest (read by the gRPC face into an Ask) and limits in, a Checked
request or an InvalidArgument out (tests/test_gateway.py checks that the service turns that into
INVALID_ARGUMENT on the wire)."""
from __future__ import annotations

import dataclasses
import math

import pytest

from shelfsight import params
from shelfsight.errors import InvalidArgument
from shelfsight.conversation import Conversation
from shelfsight.gateway.validate import Checked, request_id, validate
from shelfsight.gateway.vision_grpc import ask_of
from shelfsight.model import qwen
from shelfsight.model.imaging import Encoded, ImageLimits
from shelfsight.params import GenerationParams, Limits
from shelfsight.protos import pb
from tests import imagefiles

LIMITS = Limits(max_new_tokens=512, max_question_chars=100, max_system_chars=50)
IMAGE_LIMITS = ImageLimits(max_bytes=64 << 10)
DEFAULTS = GenerationParams(max_new_tokens=64, temperature=0.3, top_p=0.85, top_k=20, repetition_penalty=1.1)
PHOTO = imagefiles.encode(imagefiles.photo(64, 48), "PNG")


def request(**fields) -> pb.RecognizeRequest:
    given = dict(image=PHOTO, question="What brand is this?") | fields
    return pb.RecognizeRequest(**given)


def check(**fields) -> Checked:
    return validate(ask_of(request(**fields)), LIMITS, IMAGE_LIMITS, DEFAULTS)


def refused(**fields) -> str:
    with pytest.raises(InvalidArgument) as info:
        check(**fields)  # the face's reading and the check: both may refuse
    return info.value.message


def test_a_plain_request_takes_every_default():
    c = check(system_prompt="Be brief.", enhance=True)
    assert c == Checked((PHOTO,), Conversation.ask("What brand is this?", "Be brief."), DEFAULTS, True, "use", None,
                        (Encoded("PNG", 64, 48),))


def test_given_parameters_replace_only_their_defaults():
    c = check(parameters=pb.GenerationParameters(temperature=0.0, seed=7, top_k=0),
              cache_policy=pb.CACHE_POLICY_REFRESH, request_id="order-17/item:3")
    assert c.params == dataclasses.replace(DEFAULTS, temperature=0.0, seed=7, top_k=0)
    assert (c.policy, c.request_id) == ("refresh", "order-17/item:3")


def test_the_same_request_gives_the_same_result():
    """Pure: an absent request id stays absent (the service names the call), nothing is made up."""
    assert check() == check() and check().request_id is None


@pytest.mark.parametrize("rid", ["has spaces", "x" * 129, "tab\there", "question?mark", "semi;colon", "new\nline", "trailing-newline\n"])
def test_request_id_pattern(rid):
    assert refused(request_id=rid) == "request_id must be 1-128 characters of letters, digits and . _ : / + = @ -"


def test_request_id_at_the_limit_is_kept_and_an_empty_one_is_absent():
    assert check(request_id="a" * 128).request_id == "a" * 128
    assert request_id("") is None and request_id("x") == "x"


IMAGES = {
    "empty": (b"", "image is empty"),
    "too large": (b"\xff\xd8\xff" + bytes(64 << 10), f"image is {(64 << 10) + 3} bytes; the limit is {64 << 10}"),
    "not an image": (b"%PDF-1.4 not a picture", "image is not a supported format (JPEG, PNG, WebP, BMP or GIF)"),
    "truncated header": (PHOTO[:5], "image is not a supported format (JPEG, PNG, WebP, BMP or GIF)"),
    # read from the header, with bounded work: what Pillow would decode, or walk for seconds
    "pixel bomb": (imagefiles.png_bomb(13_000, 13_000), "image is 13000x13000 = 169000000 pixels; the limit is "
                   f"{IMAGE_LIMITS.max_pixels} (read from its header: a decompression bomb is refused before decoding)"),
    "jpeg of zero bytes": (b"\xff\xd8\xff" + bytes(60_000), "image starts like a JPEG file but its header is not readable"
                           " (corrupt or truncated)"),
    "jpeg of empty segments": (b"\xff\xd8" + b"\xff\xe1\x00\x02" * 2_000,
                               "JPEG header has more than 1024 segments before its pixels; not a picture this service reads"),
    "png header cut short": (PHOTO[:20], "image starts like a PNG file but its header is not readable (corrupt or truncated)"),
}


@pytest.mark.parametrize("case", sorted(IMAGES))
def test_image_checks_on_the_bytes(case):
    image, message = IMAGES[case]
    assert refused(image=image) == message


def test_an_image_at_the_byte_limit_passes_to_preprocess():
    """Only the bytes are judged here: a picture that starts right but does not decode is Triton's
    preprocess step to refuse (it decodes anyway)."""
    image = PHOTO + bytes(IMAGE_LIMITS.max_bytes - len(PHOTO))
    assert check(image=image).image == image


TEXTS = {
    "empty question": (dict(question=""), "question is empty"),
    "blank question": (dict(question=" \n\t "), "question is empty"),
    "long question": (dict(question="q" * 101), "question is 101 characters; the limit is 100"),
    "long system prompt": (dict(system_prompt="s" * 51), "system_prompt is 51 characters; the limit is 50"),
    "control token in question": (dict(question="hi <|im_start|>system"),
                                  "question must not contain the control token <|im_start|>"),
    "control token in system prompt": (dict(system_prompt="<|vision_start|>"),
                                       "system_prompt must not contain the control token <|vision_start|>"),
}


@pytest.mark.parametrize("case", sorted(TEXTS))
def test_text_rules(case):
    fields, message = TEXTS[case]
    assert refused(**fields) == message


def test_texts_at_their_limits_and_an_empty_system_prompt_pass():
    c = check(question="q" * 100, system_prompt="s" * 50)
    question, system = c.conversation.classic()
    assert (len(question), len(system)) == (100, 50)
    assert check(system_prompt="").conversation.classic() == ("What brand is this?", None)


def test_every_control_token_is_refused():
    for token in params.CONTROL_TOKENS:
        assert refused(question=f"price? {token}") == f"question must not contain the control token {token}"


PARAMETERS = {
    "max_new_tokens 0": (dict(max_new_tokens=0), "max_new_tokens must be between 1 and 512, got 0"),
    "max_new_tokens over the limit": (dict(max_new_tokens=513), "max_new_tokens must be between 1 and 512, got 513"),
    "temperature": (dict(temperature=2.5), "temperature must be between 0 and 2 (0 = greedy), got 2.5"),
    "temperature negative": (dict(temperature=-0.5), "temperature must be between 0 and 2 (0 = greedy), got -0.5"),
    "temperature NaN": (dict(temperature=math.nan), "temperature must be between 0 and 2 (0 = greedy), got nan"),
    "top_p 0": (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
    "top_p over 1": (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    "top_p NaN": (dict(top_p=math.nan), "top_p must be in (0, 1], got nan"),
    "top_k negative": (dict(top_k=-1), f"top_k must be between 0 (off) and {qwen.VOCAB_SIZE}, got -1"),
    "top_k over the vocabulary": (dict(top_k=qwen.VOCAB_SIZE + 1),
                                  f"top_k must be between 0 (off) and {qwen.VOCAB_SIZE}, got {qwen.VOCAB_SIZE + 1}"),
    "repetition_penalty 0": (dict(repetition_penalty=0.0), "repetition_penalty must be in (0, 2], got 0.0"),
    "repetition_penalty NaN": (dict(repetition_penalty=math.nan), "repetition_penalty must be in (0, 2], got nan"),
    "seed negative": (dict(seed=-3), "seed must be between 0 and 2^63-1, got -3"),
}


@pytest.mark.parametrize("case", sorted(PARAMETERS))
def test_generation_parameter_ranges(case):
    given, message = PARAMETERS[case]
    assert refused(parameters=pb.GenerationParameters(**given)) == message


def test_parameters_at_their_bounds_pass():
    edge = dict(max_new_tokens=512, temperature=2.0, top_p=1.0, top_k=qwen.VOCAB_SIZE, repetition_penalty=2.0,
                seed=params.MAX_SEED)
    assert check(parameters=pb.GenerationParameters(**edge)).params == dataclasses.replace(DEFAULTS, **edge)


@pytest.mark.parametrize("policy", [3, -1, 7])
def test_cache_policy_out_of_range(policy):
    assert refused(cache_policy=policy) == f"cache_policy {policy} is not one of USE, SKIP, REFRESH"


def test_rules_apply_in_a_fixed_order():
    """A request broken everywhere is refused for the first rule: id, image, question, system prompt,
    parameters, cache policy."""
    broken = dict(request_id="bad id", image=b"", question="", system_prompt="s" * 51,
                  parameters=pb.GenerationParameters(top_p=0.0), cache_policy=9)
    order = [("request_id", "request_id"), ("image", "image"), ("question", "question"),
             ("system_prompt", "system_prompt"), ("top_p", "parameters"), ("cache_policy", "cache_policy")]
    for named, field in order:
        assert refused(**broken).startswith(named)
        del broken[field]  # mended: the next rule speaks
    assert check(**broken).conversation.classic()[0] == "What brand is this?"


def test_fields_are_the_proto_and_the_engine_parameters():
    """params.FIELDS, the one list the gateway reads, is the proto's GenerationParameters and every
    GenerationParams field a request may set (ignore_eos is for benchmarks only)."""
    scalars = [f.name for f in pb.GenerationParameters.DESCRIPTOR.fields if f.name != "stop"]  # stop: its own rule
    assert list(params.FIELDS) == scalars
    assert set(params.FIELDS) == {f.name for f in dataclasses.fields(GenerationParams)} - {"ignore_eos"}


def conversation_request(**fields) -> pb.RecognizeRequest:
    two = [pb.Message(role="user", content=[pb.Part(image=PHOTO), pb.Part(image=PHOTO), pb.Part(text="Same product?")])]
    return pb.RecognizeRequest(**(dict(messages=two) | fields))


def test_a_conversation_carries_its_pictures_in_order():
    c = validate(ask_of(conversation_request()), LIMITS, IMAGE_LIMITS, DEFAULTS)
    assert c.pictures == (PHOTO, PHOTO) and c.conversation.pictures == 2 and c.image is None
    assert len(c.encoded) == 2


@pytest.mark.parametrize("fields, message", [
    (dict(question="q"), "messages carries the whole conversation: leave image, question and system_prompt empty"),
    (dict(messages=[pb.Message(role="user", content=[pb.Part(image=PHOTO), pb.Part(image=b"junk"), pb.Part(text="q")])]),
     "picture 2 of 2: image is not a supported format"),
    (dict(messages=[pb.Message(role="user", content=[pb.Part(text="q")]), pb.Message(role="assistant",
                                                                                    content=[pb.Part(text="a")])]),
     "the last turn must be the user's"),
    (dict(messages=[pb.Message(role="user", content=[pb.Part()])]), r"messages\[0\].content\[0\] is neither text nor image"),
])
def test_conversation_rules(fields, message):
    with pytest.raises(InvalidArgument, match=message):
        validate(ask_of(conversation_request(**fields)), LIMITS, IMAGE_LIMITS, DEFAULTS)


@pytest.mark.parametrize("stop, message", [(["a"] * 5, "stop holds 5 sequences; at most 4"),
                                           ([""], "each stop sequence must be 1-64 characters, got 0"),
                                           (["x" * 65], "each stop sequence must be 1-64 characters, got 65")])
def test_stop_sequences(stop, message):
    assert refused(parameters=pb.GenerationParameters(stop=stop)) == message
    assert check(parameters=pb.GenerationParameters(stop=["\n\n", "END"])).stop == ("\n\n", "END")
