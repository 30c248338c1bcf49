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


def _varint(raw: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = raw[i]  # IndexError when truncated
        value |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return value, i
        shift += 7


def bad_utf8_field(raw: bytes, descriptor, prefix: str = "") -> str | None:
    """The dotted name of the first string field (nested messages included) whose bytes are not
    UTF-8, or None. Walks the wire format, so it works where the message itself cannot be parsed."""
    i = 0
    try:
        while i < len(raw):
            key, i = _varint(raw, i)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, i = _varint(raw, i)
            elif wire_type in (1, 5):
                i += 8 if wire_type == 1 else 4
            elif wire_type == 2:
                size, i = _varint(raw, i)
                payload, i = raw[i:i + size], i + size
                field = descriptor.fields_by_number.get(number)
                if field is None:
                    continue
                if field.type == field.TYPE_STRING:
                    try:
                        payload.decode("utf-8")
                    except UnicodeDecodeError:
                        return prefix + field.name
                elif field.type == field.TYPE_MESSAGE:
                    found = bad_utf8_field(payload, field.message_type, f"{prefix}{field.name}.")
                    if found:
                        return found
            else:
                return None
    except IndexError:
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
