"""Request bodies that do not parse as their protobuf message, told apart and named.

gRPC parses a request before any handler runs; a parse error there surfaced as UNKNOWN carrying the
protobuf exception text, with a traceback in the log and no metric. The interceptor parses through
`lenient()` instead, which hands the handler a `Malformed` value, so the call ends as
INVALID_ARGUMENT like any other bad input (counted, logged on one line), and the message names what is
wrong: the string field whose bytes are not UTF-8, or a body that is not the message at all.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Malformed:
    message: str


# Bounds that keep the walk linear and short whatever the body: a varint is at most 10 bytes in
# protobuf (a run of 0xFF bytes was read as one ever-growing integer, quadratic in its length: 600 KB
# took 16 s on the event loop), and a body that needs more fields than any request of ours has is
# not named field by field.
MAX_VARINT = 10
MAX_FIELDS = 1_000


class _Unreadable(Exception):
    """The walk gave up: truncated, an impossible varint, or past MAX_FIELDS."""


def _varint(raw: bytes, i: int) -> tuple[int, int]:
    value = 0
    for n in range(MAX_VARINT):
        if i + n >= len(raw):
            raise _Unreadable("truncated")
        b = raw[i + n]
        value |= (b & 0x7F) << (7 * n)
        if not b & 0x80:
            return value, i + n + 1
    raise _Unreadable("varint longer than 10 bytes")


def bad_utf8_field(raw: bytes, descriptor, prefix: str = "") -> str | None:
    """The dotted name of the first string field (nested messages included) whose bytes are not
    UTF-8, or None. Walks the wire format, so it works where the message itself cannot be parsed;
    linear in the body and at most MAX_FIELDS fields in all."""
    try:
        return _walk(raw, descriptor, prefix, [MAX_FIELDS])
    except _Unreadable:
        return None


def _walk(raw: bytes, descriptor, prefix: str, budget: list[int]) -> str | None:
    i = 0
    while i < len(raw):
        budget[0] -= 1
        if budget[0] < 0:
            raise _Unreadable("too many fields")
        key, i = _varint(raw, i)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, i = _varint(raw, i)
        elif wire_type in (1, 5):
            i += 8 if wire_type == 1 else 4
        elif wire_type == 2:
            size, i = _varint(raw, i)
            if i + size > len(raw):
                raise _Unreadable("truncated")
            field = descriptor.fields_by_number.get(number)
            start, i = i, i + size
            if field is None:
                continue
            if field.type == field.TYPE_STRING:
                try:
                    raw[start:i].decode("utf-8")
                except UnicodeDecodeError:
                    return prefix + field.name
            elif field.type == field.TYPE_MESSAGE:
                found = _walk(raw[start:i], field.message_type, f"{prefix}{field.name}.", budget)
                if found:
                    return found
        else:
            return None
    return None


def lenient(deserialize, descriptor):
    """A request deserializer that never raises: a body that does not parse becomes `Malformed`."""
    def parse(raw: bytes):
        try:
            return deserialize(raw)
        except Exception:  # noqa: BLE001 - every parse failure is the caller's bad input
            field = bad_utf8_field(raw, descriptor)
            if field:
                return Malformed(f"{field} is not valid UTF-8 text")
            return Malformed(f"the request body ({len(raw)} bytes) is not a valid {descriptor.full_name} "
                             "message (truncated or not protobuf)")
    return parse
