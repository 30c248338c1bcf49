"""Glue shared by the Triton Python-backend adapters in model_repository/*/1/model.py.

Only importable inside Triton's Python stub (it needs `triton_python_backend_utils`). Errors travel as
"CODE: message" with CODE a gRPC status name, because Triton reports an error raised inside an
ensemble step as INTERNAL: the gateway reads the code back out of the message (errors.parse).
"""
from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from shelfsight.errors import InvalidArgument, ShelfsightError
from shelfsight.serving import contract

# gRPC status name -> TritonError code (Triton has no RESOURCE_EXHAUSTED; the text keeps the name)
_TRITON_CODES = {"INVALID_ARGUMENT": "INVALID_ARG", "NOT_FOUND": "NOT_FOUND", "ALREADY_EXISTS": "ALREADY_EXISTS",
                 "UNAVAILABLE": "UNAVAILABLE", "RESOURCE_EXHAUSTED": "UNAVAILABLE", "CANCELLED": "CANCELLED",
                 "FAILED_PRECONDITION": "INVALID_ARG"}


def triton_error(e: Exception) -> "pb_utils.TritonError":
    if not isinstance(e, ShelfsightError):
        e = ShelfsightError(f"{type(e).__name__}: {e}")
    code = getattr(pb_utils.TritonError, _TRITON_CODES.get(e.code, "INTERNAL"), pb_utils.TritonError.INTERNAL)
    return pb_utils.TritonError(f"{e.code}: {e.message}", code)


def error_response(e: Exception) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(error=triton_error(e))


def array(request, name: str) -> np.ndarray | None:
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def scalar(request, name: str, cast):
    """An optional one-value input, cast to a Python type; None when absent."""
    a = array(request, name)
    if a is None:
        return None
    if a.size != 1:
        raise InvalidArgument(f"{name} must hold exactly one value, got {a.size}")
    return cast(a.reshape(-1)[0])


def text(request, name: str, required: bool = False) -> str | None:
    raw = scalar(request, name, lambda v: v)
    if raw is None:
        if required:
            raise InvalidArgument(f"{name} is missing")
        return None
    try:
        return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError:
        raise InvalidArgument(f"{name} is not valid UTF-8") from None


def pictures(request, data_name: str, sizes_name: str) -> list[bytes]:
    """The encoded pictures of a request: their bytes concatenated in `data_name`, each one's length in
    `sizes_name` (both absent: none)."""
    data, sizes = array(request, data_name), array(request, sizes_name)
    if data is None and sizes is None:
        return []
    if data is None or sizes is None:
        raise InvalidArgument(f"{data_name} and {sizes_name} go together")
    data, sizes = data.reshape(-1), sizes.reshape(-1)
    if (sizes < 0).any() or int(sizes.sum()) != data.size:
        raise InvalidArgument(f"{sizes_name} {sizes.tolist()[:8]} do not add up to the {data.size} bytes of {data_name}")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [data[bounds[i]:bounds[i + 1]].tobytes() for i in range(sizes.size)]


def tensor(name: str, value: np.ndarray) -> "pb_utils.Tensor":
    return pb_utils.Tensor(name, value)


def answer(text: bytes, prompt_tokens: int, completion_tokens: int, finish_reason: bytes) -> "pb_utils.InferenceResponse":
    """The contract's four outputs (contract.OUTPUTS), one response: a delta of `generate`'s stream or
    `collect`'s whole answer. finish_reason is b"" until the last response."""
    return pb_utils.InferenceResponse([
        tensor(contract.TEXT, np.array([[text]], dtype=object)),
        tensor(contract.PROMPT_TOKENS, np.array([[prompt_tokens]], dtype=np.int32)),
        tensor(contract.COMPLETION_TOKENS, np.array([[completion_tokens]], dtype=np.int32)),
        tensor(contract.FINISH_REASON, np.array([[finish_reason]], dtype=object)),
    ])


def model_dir_repo(args: dict):
    """The repository root of a model, from the args Triton passes to initialize()."""
    from pathlib import Path

    return Path(args["model_repository"]).parent
