"""Client side of the Triton `pipeline` / `pipeline_stream` contract (names in shelfsight/serving/contract.py).

    inputs   IMAGE UINT8 [-1], QUESTION BYTES [1]; optional SYSTEM BYTES, one input per generation
             parameter (MAX_NEW_TOKENS INT32, TEMPERATURE FP32, ...: params.RULES), ENHANCE BOOL;
             or, for several pictures and turns, MESSAGES BYTES [1] + IMAGES UINT8 [-1] + IMAGE_SIZES INT64 [-1]
    outputs  TEXT BYTES, PROMPT_TOKENS INT32, COMPLETION_TOKENS INT32, FINISH_REASON BYTES ("stop"|"length")

Used by the gateway's upstream, the benchmarks and the tests. Errors come back typed: the status name
the models put in front of their message (shelfsight/serving/tritonpy.py) wins over Triton's gRPC status,
which an ensemble reports as INTERNAL or INVALID_ARGUMENT whatever the cause.
"""
from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE
from tritonclient.utils import InferenceServerException

from shelfsight import errors
from shelfsight.conversation import Conversation
from shelfsight.serving import contract
from shelfsight.serving.contract import OUTPUTS, STREAM, UNARY

NUMPY_TYPE = {"BOOL": np.bool_, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32}
_GRPC_STATUS = {"UNAVAILABLE": errors.Unavailable, "DEADLINE_EXCEEDED": errors.DeadlineExceeded,
                "CANCELLED": errors.Cancelled, "NOT_FOUND": errors.Unavailable,  # model not loaded (yet)
                "INVALID_ARGUMENT": errors.InvalidArgument, "RESOURCE_EXHAUSTED": errors.ResourceExhausted}


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass(frozen=True)
class Item:
    """One side of a retrieval input: text and/or pictures (encoded files)."""
    text: str = ""
    pictures: tuple[bytes, ...] = ()


@dataclass
class Embedding:
    vector: np.ndarray  # [d] float32, unit norm
    prompt_tokens: int


@dataclass
class Delta:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "" until the last delta


def _tensor(name: str, dtype: str, value: np.ndarray):
    t = grpcclient.InferInput(name, list(value.shape), dtype)
    t.set_data_from_numpy(value)
    return t


def _text(name: str, value: str):
    return _tensor(name, "BYTES", np.array([[value.encode("utf-8")]], dtype=object))


def build_inputs(pictures: Sequence[bytes], conversation: Conversation, *, response_format=None,
                 stop: Sequence[str] | None = None, **params) -> list:
    """The contract's inputs for a conversation and its pictures: the classic form (IMAGE + QUESTION
    [+ SYSTEM]) when it is one picture and one question, else MESSAGES + IMAGES + IMAGE_SIZES;
    `response_format` (a shelfsight.formats.ResponseFormat) and `stop` when given."""
    classic = conversation.classic()
    if classic is not None and len(pictures) == 1:
        question, system = classic
        inputs = [_tensor(contract.IMAGE, "UINT8", np.frombuffer(pictures[0], dtype=np.uint8)[None]),
                  _text(contract.QUESTION, question)]
        if system:
            inputs.append(_text(contract.SYSTEM, system))
    else:
        inputs = [_text(contract.MESSAGES, conversation.to_json().decode())]
        if pictures:
            data, sizes = pack_pictures(pictures)
            inputs += [_tensor(contract.IMAGES, "UINT8", data[None]), _tensor(contract.IMAGE_SIZES, "INT64", sizes[None])]
    if response_format is not None:
        inputs.append(_text(contract.RESPONSE_FORMAT, response_format.to_json()))
    if stop:
        inputs.append(_text(contract.STOP, json.dumps(list(stop), ensure_ascii=False)))
    for field, value in params.items():
        if value is None:
            continue
        if field not in contract.OPTIONAL:
            raise errors.InvalidArgument(f"unknown generation parameter {field!r}")
        name, dtype = contract.OPTIONAL[field]
        inputs.append(_tensor(name, dtype, np.array([[value]], dtype=NUMPY_TYPE[dtype])))
    return inputs


def pack_pictures(pictures: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Encoded pictures -> (their bytes concatenated [N] uint8, each one's length [n] int64)."""
    data = np.frombuffer(b"".join(pictures), dtype=np.uint8)
    return data, np.array([len(p) for p in pictures], dtype=np.int64)


def _outputs(result) -> tuple[str, int, int, str]:
    text, prompt, completion, finish = (result.as_numpy(name).reshape(-1)[0] for name in OUTPUTS)
    return text.decode("utf-8"), int(prompt), int(completion), finish.decode()


def to_error(exc: Exception) -> errors.ShelfsightError:
    if isinstance(exc, errors.ShelfsightError):
        return exc
    rpc = isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None))
    message = (exc.details() or exc.code().name) if rpc else \
        exc.message() if isinstance(exc, InferenceServerException) else str(exc)
    dead = STUB_DEAD.search(message or "")
    if dead:
        return errors.ModelProcessLost(f"the model server lost a model process ({dead.group(0)}); retry shortly")
    if rpc:  # raised by the stream iterator itself (deadline, connection) rather than wrapped by tritonclient
        return errors.parse(message) or _GRPC_STATUS.get(exc.code().name, errors.Internal)(f"triton: {message}")
    typed = errors.parse(message or "")
    if typed is not None:
        return typed
    if any(s in (message or "") for s in ("not ready", "shutting down", "failed to connect", "Connection refused")):
        return errors.Unavailable(f"triton: {message}")  # starting, stopping or gone: retry later
    status = (exc.status() or "") if isinstance(exc, InferenceServerException) else ""
    status = status.replace("StatusCode.", "")
    return _GRPC_STATUS.get(status, errors.Internal)(f"triton: {message or exc}")


# gRPC's default reconnect backoff grows to 120 s while a server is down, so a client could wait
# tens of seconds after Triton was back (measured: 38 s). Cap it at 1 s: a reconnect attempt per second
# to one local address costs nothing.
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]
# What Triton's Python backend says about a model whose stub process died: the model is broken until
# it is restarted, which is UNAVAILABLE (retry elsewhere or later), not an internal error of the request.
STUB_DEAD = re.compile(r"Stub process '[^']*' is not healthy|Stub process is not healthy")
# How long a finished stream may take to end its call after the final answer (Triton does it at once:
# median 0.2 ms, at most 3.3 ms at 32 streams on one channel); past it the call is cancelled after all.
END_OF_CALL_SECONDS = 5.0


def _retrieval_inputs(texts: dict[str, str], pictures: Sequence[bytes], **scalars) -> list:
    """Every input of `embed` / `rerank`, empty where unused, so that all requests batch together."""
    data, sizes = pack_pictures(pictures)
    inputs = [_text(name, value) for name, value in texts.items()]
    inputs += [_tensor(contract.IMAGES, "UINT8", data[None]), _tensor(contract.IMAGE_SIZES, "INT64", sizes[None])]
    inputs += [_tensor(name, "INT32", np.array([[value]], np.int32)) for name, value in scalars.items()]
    return inputs


class RetrievalCalls:
    """The `embed` and `rerank` models over the same channel (mixed into PipelineClient)."""

    _client: grpcclient.InferenceServerClient

    async def _one(self, model: str, inputs: list, outputs: Sequence[str], timeout: float | None, request_id: str):
        try:
            result = await self._client.infer(model, inputs, outputs=[grpcclient.InferRequestedOutput(n) for n in outputs],
                                              request_id=request_id, client_timeout=timeout)
        except Exception as e:
            raise to_error(e) from None
        return [result.as_numpy(n) for n in outputs]

    async def embed(self, items: Sequence[Item], *, instruction: str = "", dimensions: int = 0,
                    timeout: float | None = None, request_id: str = "") -> list[Embedding]:
        """One embedding per item, in order (one Triton request each: its batcher encodes them together)."""
        async def one(item: Item) -> Embedding:
            inputs = _retrieval_inputs({contract.CONTENT: item.text, contract.INSTRUCTION: instruction}, item.pictures,
                                       **{contract.DIMENSIONS: dimensions})
            vec, tokens = await self._one(contract.EMBED, inputs, (contract.EMBEDDING, contract.PROMPT_TOKENS),
                                          timeout, request_id)
            return Embedding(vec.reshape(-1).astype(np.float32), int(tokens.reshape(-1)[0]))
        return list(await asyncio.gather(*(one(i) for i in items)))

    async def rerank(self, query: Item, documents: Sequence[Item], *, instruction: str = "",
                     timeout: float | None = None, request_id: str = "") -> list[float]:
        """The relevance of each document to the query, in order."""
        async def one(doc: Item) -> float:
            inputs = _retrieval_inputs({contract.QUERY: query.text, contract.DOCUMENT: doc.text,
                                        contract.INSTRUCTION: instruction}, query.pictures + doc.pictures,
                                       **{contract.QUERY_IMAGES: len(query.pictures)})
            score, _ = await self._one(contract.RERANK, inputs, (contract.SCORE, contract.PROMPT_TOKENS), timeout,
                                       request_id)
            return float(score.reshape(-1)[0])
        return list(await asyncio.gather(*(one(d) for d in documents)))

    async def model_info(self, model: str) -> dict | None:
        """The public JSON a model's config carries (export/repository.py public_json), or None when
        this Triton does not serve `model`."""
        try:
            config = await self._client.get_model_config(model, as_json=True)
        except Exception:  # noqa: BLE001 - not served (or not reachable: the caller checks readiness)
            return None
        raw = config["config"].get("parameters", {}).get("shelfsight", {}).get("string_value")
        return json.loads(raw) if raw else None


class PipelineClient(RetrievalCalls):
    """asyncio client of the contract over Triton's gRPC endpoint: the pipeline ensembles, and the
    retrieval models where the repository serves them."""

    def __init__(self, url: str):
        self.url = url
        self._client = grpcclient.InferenceServerClient(url, channel_args=CHANNEL_ARGS)

    async def close(self) -> None:
        await self._client.close()

    async def ready(self) -> bool:
        try:
            return bool(await self._client.is_model_ready(UNARY, client_timeout=2)
                        and await self._client.is_model_ready(STREAM, client_timeout=2))
        except Exception:
            return False

    async def serving_info(self) -> dict:
        """The client-facing manifest the repository put in the `pipeline` config (model id,
        generation defaults, limits)."""
        try:
            config = await self._client.get_model_config(UNARY, as_json=True)
        except Exception as e:
            raise to_error(e) from None
        raw = config["config"].get("parameters", {}).get("shelfsight", {}).get("string_value")
        if not raw:
            raise errors.FailedPrecondition(f"the `{UNARY}` model at {self.url} carries no shelfsight parameters; "
                                            "lay the repository out with `shelfsight export repository`")
        return json.loads(raw)

    async def infer(self, image: bytes, question: str, system: str | None = None, **kw) -> Answer:
        """One picture, one question: the classic request."""
        return await self.converse([image], Conversation.ask(question, system), **kw)

    def stream(self, image: bytes, question: str, system: str | None = None, **kw) -> AsyncIterator[Delta]:
        return self.converse_stream([image], Conversation.ask(question, system), **kw)

    async def converse(self, pictures: Sequence[bytes], conversation: Conversation, *,
                       timeout: float | None = None, request_id: str = "", **params) -> Answer:
        try:
            result = await self._client.infer(UNARY, build_inputs(pictures, conversation, **params),
                                              outputs=[grpcclient.InferRequestedOutput(n) for n in OUTPUTS],
                                              request_id=request_id, client_timeout=timeout)
        except Exception as e:
            raise to_error(e) from None
        return Answer(*_outputs(result))

    async def converse_stream(self, pictures: Sequence[bytes], conversation: Conversation, *,
                              timeout: float | None = None, request_id: str = "", **params) -> AsyncIterator[Delta]:
        inputs = build_inputs(pictures, conversation, **params)

        async def requests():
            yield {"model_name": STREAM, "inputs": inputs, "request_id": request_id}

        responses = self._client.stream_infer(requests(), stream_timeout=timeout)
        try:
            async for result, error in responses:
                if error is not None:
                    raise to_error(error)
                delta = Delta(*_outputs(result))
                if delta.finish_reason:
                    await _end_of_call(responses)
                    yield delta
                    return
                yield delta
            raise errors.Internal("the stream ended without a final answer")
        except errors.ShelfsightError:
            raise
        except Exception as e:
            raise to_error(e) from None
        finally:
            responses.cancel()  # ends the call if the consumer stopped early (no-op once finished)


async def _end_of_call(responses) -> None:
    """Let Triton end a stream whose final answer came, before anyone cancels it.

    The request side was closed after the one request, so Triton ends the call (status OK) right after
    the final response. Cancelling it first races with that: Triton 2.51's stream handler then marks the
    finished request "cancellation issued" and waits for a completion callback that already happened, so
    it never frees the request, and the `pipeline_stream` model it holds never unloads: every stop after
    real load ran into Triton's exit timeout and exited 1 ("Exit timeout expired"). Measured: 7 of 48
    finished streams leaked so. Nothing comes after the final answer; anything that does is not ours.
    """
    try:
        async with asyncio.timeout(END_OF_CALL_SECONDS):
            async for _ in responses:
                pass
    except Exception:  # noqa: BLE001 - the answer is complete; how the call ended does not change it
        pass
