"""The gRPC face of answering (`shelfsight.v1.ProductVision`): protobuf messages to the core's `Ask`
(gateway/validate.py) and the core's outcome back to protobuf. Nothing about caching, coalescing or
Triton lives here (gateway/answers.py); errors are the core's typed errors, which the interceptor
(gateway/server.py) turns into statuses.
"""
from __future__ import annotations

import time

from shelfsight import params
from shelfsight.conversation import PICTURE, Conversation, Turn
from shelfsight.errors import InvalidArgument
from shelfsight import formats
from shelfsight.gateway.answers import Answers, Outcome
from shelfsight.gateway.validate import Ask
from shelfsight.protos import pb, pb_grpc

STATUS = {"miss": pb.CACHE_STATUS_MISS, "exact": pb.CACHE_STATUS_EXACT, "perceptual": pb.CACHE_STATUS_PERCEPTUAL,
          "coalesced": pb.CACHE_STATUS_COALESCED}
# The policies the proto names (USE, SKIP, REFRESH): an old or hostile client can send any int32.
POLICIES = {value: name.removeprefix("CACHE_POLICY_").lower() for name, value in pb.CachePolicy.items()}


def format_of(m: pb.ResponseFormat) -> formats.ResponseFormat:
    kind = m.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument("response_format is set but names no format")
    if kind == "builtin":
        return formats.builtin(m.builtin)
    if kind == "json_object":
        return formats.parse("json_object")
    if kind == "choice":
        return formats.parse("choice", list(m.choice.values))
    return formats.parse(kind, getattr(m, kind))


def ask_of(request) -> Ask:
    """A RecognizeRequest as the core's Ask: the classic fields (image, question, system_prompt), or a
    conversation whose parts carry the pictures."""
    p = request.parameters
    common = dict(params={f: getattr(p, f) for f in params.FIELDS if p.HasField(f)},
                  policy=POLICIES.get(request.cache_policy, str(request.cache_policy)), enhance=request.enhance,
                  request_id=request.request_id, stop=tuple(p.stop),
                  response_format=format_of(request.response_format) if request.HasField("response_format")
                  else None)
    if not request.messages:
        return Ask((request.image,), Conversation.ask(request.question, request.system_prompt or None),
                   classic=True, **common)
    if request.image or request.question or request.system_prompt:
        raise InvalidArgument("messages carries the whole conversation: leave image, question and system_prompt "
                              "empty (put a system prompt in a system turn)")
    pictures, turns = [], []
    for i, m in enumerate(request.messages):
        parts = []
        for j, part in enumerate(m.content):
            kind = part.WhichOneof("kind")
            if kind == "image":
                pictures.append(part.image)
                parts.append(PICTURE)
            elif kind == "text":
                parts.append(part.text)
            else:
                raise InvalidArgument(f"messages[{i}].content[{j}] is neither text nor image")
        turns.append(Turn(m.role, tuple(parts)))
    return Ask(tuple(pictures), Conversation(tuple(turns)), **common)


def summary(o: Outcome) -> dict:
    """The fields every reply carries."""
    return dict(model_id=o.model_id, cache_status=STATUS[o.cache_status], finish_reason=o.finish_reason,
                usage=pb.Usage(prompt_tokens=o.prompt_tokens, completion_tokens=o.completion_tokens),
                request_id=o.request_id,
                timings=pb.Timings(total_seconds=o.total_seconds, upstream_seconds=o.upstream_seconds))


class ProductVisionServicer(pb_grpc.ProductVisionServicer):
    def __init__(self, core: Answers):
        self.core = core

    async def Recognize(self, request, context):
        t0 = time.perf_counter()
        c = self.core.check(ask_of(request))
        async with self.core.answer(c, context.time_remaining(), t0) as a:
            text = await a.text()
        return pb.RecognizeReply(text=text, **summary(a.outcome))

    async def RecognizeStream(self, request, context):
        t0 = time.perf_counter()
        c = self.core.check(ask_of(request))
        async with self.core.answer(c, context.time_remaining(), t0) as a:
            async for piece in a.pieces():
                yield pb.RecognizeChunk(text=piece)
        yield pb.RecognizeChunk(final=True, **summary(a.outcome))
