"""The gateway's request check: an `Ask` (what any face read from its wire format) and what the served
model allows in, a `Checked` request or an InvalidArgument naming the field and the rule out.

Pure: no Triton, no metrics, no logging, no clock or randomness - the same request and limits always
give the same result, so every rule is unit-tested on its own (tests/test_validate.py). The faces
(gateway/vision_grpc.py, gateway/http_face.py) build the Ask; the core (gateway/answers.py) asks the
replicas for the limits, calls this, and does the accounting itself.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from shelfsight import params
from shelfsight.conversation import Conversation
from shelfsight.errors import InvalidArgument
from shelfsight.model import imaging
from shelfsight.model.imaging import ImageLimits
from shelfsight.params import GenerationParams, Limits

REQUEST_ID = re.compile(r"[\w.:/+=@-]{1,128}", re.ASCII)  # fullmatch: "$" would let a trailing newline into the log
POLICIES = ("use", "skip", "refresh")  # what a request may ask of the cache


@dataclass(frozen=True)
class Ask:
    """A request as a face read it, before any check: the pictures (encoded files, in the order the
    conversation places them), the conversation, and the generation parameters the client set."""
    pictures: tuple[bytes, ...]
    conversation: Conversation
    params: dict[str, Any] = field(default_factory=dict)  # params.FIELDS the client set; the rest take defaults
    policy: str = "use"
    enhance: bool = False
    request_id: str = ""
    stop: tuple[str, ...] = ()
    response_format: Any = None  # a shelfsight.formats.ResponseFormat, or None
    classic: bool = False  # read from image + question + system_prompt: errors name those fields


@dataclass(frozen=True)
class Checked:
    """A request the gateway accepted: its parameters resolved (defaults filled in)."""
    pictures: tuple[bytes, ...]
    conversation: Conversation
    params: GenerationParams
    enhance: bool
    policy: str  # use | skip | refresh
    request_id: str | None  # None: the client sent none (the core names the call)
    encoded: tuple[imaging.Encoded, ...] = ()  # per picture: format and size from the header (what decoding costs)
    stop: tuple[str, ...] = ()
    response_format: Any = None

    @property
    def image(self) -> bytes | None:
        """The picture, when there is exactly one (the perceptual cache compares one picture)."""
        return self.pictures[0] if len(self.pictures) == 1 else None


def request_id(given: str) -> str | None:
    """The client's request id, checked; None when it sent none."""
    if given and not REQUEST_ID.fullmatch(given):
        raise InvalidArgument("request_id must be 1-128 characters of letters, digits and . _ : / + = @ -")
    return given or None


def _pictures(ask: Ask, image_limits: ImageLimits) -> tuple[imaging.Encoded, ...]:
    """Each picture's bytes and header (empty, too large, not a known format, too many pixels, a header
    that goes on for ever): decoding is Triton's preprocess step, and the perceptual cache's."""
    n = len(ask.pictures)
    if ask.classic:
        return (imaging.check_encoded(ask.pictures[0], image_limits),)
    out = []
    for i, picture in enumerate(ask.pictures):
        try:
            out.append(imaging.check_encoded(picture, image_limits))
        except InvalidArgument as e:
            raise InvalidArgument(f"picture {i + 1} of {n}: {e.message}" if n > 1 else e.message) from None
    return tuple(out)


def validate(ask: Ask, limits: Limits, image_limits: ImageLimits, defaults: GenerationParams) -> Checked:
    """`ask` checked against the served model's text and image limits, its absent generation
    parameters taken from `defaults`. Raises InvalidArgument, the first rule broken: request id,
    pictures, texts, generation parameters, cache policy, stop sequences."""
    rid = request_id(ask.request_id)
    conv = ask.conversation
    if ask.classic:
        encoded = _pictures(ask, image_limits)
        question, system = conv.classic() or ("", None)
        params.check_text("question", question, limits.max_question_chars, required=True)
        params.check_text("system_prompt", system or "", limits.max_system_chars, required=False)
    else:
        conv.check(limits)
        if conv.pictures != len(ask.pictures):
            raise InvalidArgument(f"messages place {conv.pictures} pictures; {len(ask.pictures)} were sent")
        encoded = _pictures(ask, image_limits)
    effective = params.resolve(defaults, limits, **ask.params)
    if ask.policy not in POLICIES:
        raise InvalidArgument(f"cache_policy {ask.policy} is not one of {', '.join(p.upper() for p in POLICIES)}")
    return Checked(tuple(ask.pictures), conv, effective, bool(ask.enhance), ask.policy, rid, encoded,
                   params.check_stop(tuple(ask.stop)), ask.response_format)
