"""The OpenAI HTTP API's shapes, as pydantic models: what the HTTP face (gateway/http_face.py) reads
and writes. Only protocol here - no gateway, cache or Triton.

Every field a client may send is named below with what shelfsight does with it (docs/openai.md lists
them): supported fields map onto the request the core answers; fields shelfsight cannot honour are
refused with a 400 naming them (never silently dropped when dropping them would change the answer);
fields that do not change an answer (user, metadata, store, service_tier, parallel_tool_calls) are
accepted and ignored. Unknown fields are ignored, as OpenAI's own server and vLLM do.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag


class Loose(BaseModel):
    """Unknown fields are accepted (new client versions add fields) and ignored. Known ones are strict,
    as OpenAI's server is: `"max_tokens": true` or `"stream": "yes"` is a 400, not 1 token or a stream
    (an integer is still a number for the float fields)."""
    model_config = ConfigDict(extra="allow", strict=True)


# ---- requests ----

class ImageURL(Loose):
    url: str
    detail: str | None = None  # "auto" | "low" | "high": accepted; the serving pixel bounds decide


class TextPart(Loose):
    type: Literal["text"]
    text: str


class ImagePart(Loose):
    type: Literal["image_url"]
    image_url: ImageURL


class OtherPart(Loose):
    type: str  # input_audio, file, video_url...: refused by name


def _part_kind(part) -> str | None:
    """Which model a content part is read as, by its type: a malformed text or image_url part is then
    reported as that part's error ("text: Input should be a valid string"), not as an unknown type."""
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    if not isinstance(kind, str):  # (a list or an object: OtherPart's type says it must be a string)
        return None if kind is None else "other-part"
    return {"text": "text-part", "image_url": "image-part"}.get(kind, "other-part")


PART_TAGS = ("text-part", "image-part", "other-part")  # (the HTTP face leaves them out of error locations)
Part = Annotated[Union[Annotated[TextPart, Tag("text-part")], Annotated[ImagePart, Tag("image-part")],
                       Annotated[OtherPart, Tag("other-part")]],
                 Discriminator(_part_kind, custom_error_type="part_type",
                               custom_error_message="a content part needs a type: text or image_url")]


class Message(Loose):
    role: str  # system | developer (as system) | user | assistant; tool and function are refused
    content: str | list[Part] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None


class StreamOptions(Loose):
    include_usage: bool = False


class ResponseFormat(Loose):
    type: str  # text | json_object | json_schema
    json_schema: dict[str, Any] | None = None  # {"name", "schema", "strict"}


class ChatCompletionRequest(Loose):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # preferred over max_tokens when both are given
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    n: int | None = None  # only 1
    logprobs: bool | None = None  # refused when true
    top_logprobs: int | None = None  # refused when set
    tools: list[Any] | None = None  # refused when non-empty
    tool_choice: Any = None  # refused unless "none"
    functions: list[Any] | None = None  # refused when non-empty
    function_call: Any = None
    logit_bias: dict[str, float] | None = None  # refused when non-empty
    presence_penalty: float | None = None  # refused when non-zero
    frequency_penalty: float | None = None  # refused when non-zero
    modalities: list[str] | None = None  # only ["text"]
    audio: Any = None  # refused when set
    prediction: Any = None  # refused when set
    # vendor extras, in the body as vLLM takes them (the openai client's extra_body)
    top_k: int | None = None
    repetition_penalty: float | None = None
    cache: str | None = None  # use | skip | refresh
    enhance: bool | None = None
    request_id: str | None = None


class EmbeddingRequest(Loose):
    model: str
    input: str | list[str] | None = None
    messages: list[Message] | None = None  # vLLM's multimodal style: one user turn of image and text parts
    encoding_format: str = "float"  # float | base64
    dimensions: int | None = None
    instruction: str | None = None  # vendor extra: the embedding instruction (default: the model's)


# ---- responses ----

def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(cid: str, created: int, model: str, text: str, finish: str, prompt: int, completion_tokens: int,
               vendor: dict) -> dict:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish}],
            "usage": usage(prompt, completion_tokens), "shelfsight": vendor}


def chunk(cid: str, created: int, model: str, delta: dict, finish: str | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(cid: str, created: int, model: str, prompt: int, completion_tokens: int, vendor: dict) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": model, "choices": [], "usage": usage(prompt, completion_tokens), "shelfsight": vendor}


# OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}, by HTTP status
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error", 415: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 500: "internal_error", 503: "service_unavailable",
               504: "timeout_error"}


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "internal_error"), "param": param,
                      "code": code}}
