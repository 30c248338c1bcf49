"""The gateway's request check: a RecognizeRequest and what the served model allows in, a `Checked`
request or an InvalidArgument naming the field and the rule out.

Pure: no Triton, no metrics, no logging, no clock or randomness - the same request and limits always
give the same result, so every rule is unit-tested on its own (tests/test_validate.py). The service
(gateway/service.py) asks the replicas for the limits, calls this, and does the accounting itself.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from shelfsight import params
from shelfsight.errors import InvalidArgument
from shelfsight.model import imaging
from shelfsight.model.imaging import ImageLimits
from shelfsight.params import GenerationParams, Limits
from shelfsight.protos import pb

REQUEST_ID = re.compile(r"[\w.:/+=@-]{1,128}")  # fullmatch: "$" would let a trailing newline into the log
# The policies the proto names (USE, SKIP, REFRESH): an old or hostile client can send any int32.
POLICIES = {value: name.removeprefix("CACHE_POLICY_") for name, value in pb.CachePolicy.items()}


@dataclass(frozen=True)
class Checked:
    """A request the gateway accepted: its parameters resolved (defaults filled in)."""
    image: bytes
    question: str
    system: str
    params: GenerationParams
    enhance: bool
    policy: int
    request_id: str | None  # None: the client sent none (the service names the call)
    encoded: imaging.Encoded | None = None  # format and pixel size from the header (what decoding costs)


def request_id(given: str) -> str | None:
    """The client's request id, checked; None when it sent none."""
    if given and not REQUEST_ID.fullmatch(given):
        raise InvalidArgument("request_id must be 1-128 characters of letters, digits and . _ : / + = @ -")
    return given or None


def validate(request, limits: Limits, image_limits: ImageLimits, defaults: GenerationParams) -> Checked:
    """`request` (pb.RecognizeRequest) checked against the served model's text and image limits,
    its absent generation parameters taken from `defaults`. Raises InvalidArgument, the first rule
    broken: request id, image, question, system prompt, generation parameters, cache policy."""
    rid = request_id(request.request_id)
    # The bytes and the header alone (empty, too large, not a known format, too many pixels, a header
    # that goes on for ever): decoding is Triton's preprocess step, and the perceptual cache's.
    encoded = imaging.check_encoded(request.image, image_limits)
    params.check_text("question", request.question, limits.max_question_chars, required=True)
    params.check_text("system_prompt", request.system_prompt, limits.max_system_chars, required=False)
    p = request.parameters
    effective = params.resolve(defaults, limits, **{f: getattr(p, f) for f in params.FIELDS if p.HasField(f)})
    if request.cache_policy not in POLICIES:
        raise InvalidArgument(f"cache_policy {request.cache_policy} is not one of {', '.join(POLICIES.values())}")
    return Checked(request.image, request.question, request.system_prompt, effective, request.enhance,
                   request.cache_policy, rid, encoded)
