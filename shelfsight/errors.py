"""Typed errors, shared end to end: raised inside, turned into a gRPC status at the gateway, a Triton
per-request error inside models, exit code 2 at the command line, and one exception class per kind in
the client. The `code` names are gRPC status names so that each boundary maps them without a table."""
from __future__ import annotations

import re


class ShelfsightError(Exception):
    """Base class. `code` is the gRPC status name that this failure travels as."""

    code = "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgument(ShelfsightError):
    """The caller sent something unusable: bad image, bad parameter, bad path or option."""

    code = "INVALID_ARGUMENT"


class NotFound(ShelfsightError):
    code = "NOT_FOUND"


class AlreadyExists(ShelfsightError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(ShelfsightError):
    """The system is not in a state to do this (e.g. a checkpoint that is not Qwen3-VL)."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(ShelfsightError):
    """Over a limit that protects the service: too many requests in flight, image too large.
    `retry_after`: seconds after which retrying may succeed, when known (sent to the client)."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class Unauthenticated(ShelfsightError):
    """No API key, or one the gateway does not know (or has revoked)."""

    code = "UNAUTHENTICATED"


class PermissionDenied(ShelfsightError):
    """A known key without the right to this method."""

    code = "PERMISSION_DENIED"


class Unavailable(ShelfsightError):
    """A dependency (Triton, the model) is down or not ready; retrying later may work."""

    code = "UNAVAILABLE"


class ModelProcessLost(Unavailable):
    """A model's process died under a running Triton: that model fails until Triton is restarted."""


class CacheUnavailable(Unavailable):
    """The shared result cache (Redis) failed an operation. `reachable` is False when it could not be
    reached or did not answer in time (the gateway then stops asking it for a while), True when it
    answered with an error (out of memory, a read-only replica). Never reaches a client: the cache is an
    optimisation, and the gateway answers from the model without it."""

    def __init__(self, message: str, reachable: bool = False):
        super().__init__(message)
        self.reachable = reachable


class DeadlineExceeded(ShelfsightError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(ShelfsightError):
    code = "CANCELLED"


class Internal(ShelfsightError):
    code = "INTERNAL"


BY_CODE = {cls.code: cls for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition,
                                     ResourceExhausted, Unavailable, DeadlineExceeded, Cancelled,
                                     Unauthenticated, PermissionDenied, Internal)}


def from_code(code: str, message: str) -> ShelfsightError:
    """Rebuild a typed error from its code name (e.g. parsed out of a Triton error message)."""
    return BY_CODE.get(code, Internal)(message)


def from_grpc(e) -> ShelfsightError:
    """A failed gRPC call (grpc.RpcError: its code() and details()) as its typed error."""
    code = e.code().name if e.code() else "UNKNOWN"
    return from_code(code, e.details() or code)


_CODED = re.compile(r"\b(" + "|".join(BY_CODE) + r"): (.*)", re.S)


def parse(message: str) -> ShelfsightError | None:
    """Recover a typed error from text of the form "...CODE: message" (Triton error strings), or None."""
    m = _CODED.search(message or "")
    return from_code(m.group(1), m.group(2).strip()) if m else None
