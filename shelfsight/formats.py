"""Structured answers: the response format a request may ask for, validated at the edge.

A ResponseFormat is what travels (gateway -> preprocess -> generate, as to_json's text); the engine
compiles it into a grammar (shelfsight.engine.grammar) and samples only tokens the grammar allows.
Kinds:
    json_schema  spec = the schema as canonical JSON text (property order kept: it is the answer's order)
    json_object  spec = "" (any JSON object)
    regex        spec = the pattern; the whole answer matches it
    choice       spec = tuple of literal strings; the answer is exactly one of them

parse() refuses what the grammar engine would not enforce (so an answer that ends with "stop" always
satisfies the format): schema keywords xgrammar 0.2.9 accepts but ignores (measured by sampling random
walks through its grammars: uniqueItems, contains, if/then/else, dependentRequired, overlapping oneOf,
allOf with several branches, not), remote $ref, and a string pattern beside minLength/maxLength (xgrammar
then drops the length bound: put the bound in the pattern, e.g. "^[a-z]{0,20}$").

No torch, xgrammar or gRPC here: the gateway validates with this module alone.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from shelfsight.errors import InvalidArgument

KINDS = ("json_schema", "json_object", "regex", "choice")
MAX_SCHEMA_BYTES = 32 << 10
MAX_SCHEMA_DEPTH = 32  # nested schemas (objects in arrays in objects ...)
MAX_REGEX_CHARS = 4096
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 256

# Accepted by xgrammar but not enforced by its grammar (see the module docstring).
UNENFORCED = ("not", "if", "then", "else", "uniqueItems", "contains", "minContains", "maxContains",
              "dependentRequired", "dependentSchemas", "dependencies", "unevaluatedItems",
              "unevaluatedProperties", "$dynamicRef", "$recursiveRef")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_ONE = ("additionalProperties", "additionalItems", "items", "propertyNames")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")


@dataclass(frozen=True)
class ResponseFormat:
    kind: str
    spec: str | tuple[str, ...]

    @property
    def key(self) -> str:
        """One text per distinct format (what compiled grammars are cached by)."""
        return self.to_json()

    def to_json(self) -> str:
        spec = list(self.spec) if self.kind == "choice" else self.spec
        return json.dumps({"kind": self.kind, "spec": spec}, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> "ResponseFormat":
        """to_json's inverse, checked again (the engine may be called directly, not only through the
        gateway)."""
        try:
            doc = json.loads(raw)
        except (ValueError, TypeError):
            doc = None
        if not isinstance(doc, dict) or set(doc) != {"kind", "spec"}:
            raise InvalidArgument('a response format must be a JSON object {"kind": ..., "spec": ...}')
        return parse(doc["kind"], doc["spec"])


def parse(kind: str, spec: Any = None) -> ResponseFormat:
    """Check a response format; errors say what is wrong. json_schema takes the schema as JSON text or
    as a dict; choice a list of strings; regex a pattern; json_object nothing (None or "")."""
    if kind not in KINDS:
        raise InvalidArgument(f"response format kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "json_object":
        if spec not in (None, "", {}):
            raise InvalidArgument("a json_object response format takes no spec")
        return ResponseFormat(kind, "")
    if kind == "json_schema":
        return ResponseFormat(kind, _schema_text(spec))
    if kind == "regex":
        if not isinstance(spec, str) or not spec:
            raise InvalidArgument("a regex response format needs a non-empty pattern")
        if len(spec) > MAX_REGEX_CHARS:
            raise InvalidArgument(f"the regex is {len(spec)} characters; the limit is {MAX_REGEX_CHARS}")
        return ResponseFormat(kind, spec)
    return ResponseFormat(kind, _choices(spec))


def _choices(spec: Any) -> tuple[str, ...]:
    if isinstance(spec, str) or not isinstance(spec, (list, tuple)):
        raise InvalidArgument("a choice response format needs a list of strings")
    if not spec:
        raise InvalidArgument("the choice list is empty")
    if len(spec) > MAX_CHOICES:
        raise InvalidArgument(f"the choice list has {len(spec)} entries; the limit is {MAX_CHOICES}")
    for i, c in enumerate(spec):
        if not isinstance(c, str):
            raise InvalidArgument(f"choice {i} is not a string: {c!r}")
        if not c:
            raise InvalidArgument(f"choice {i} is empty")
        if len(c) > MAX_CHOICE_CHARS:
            raise InvalidArgument(f"choice {i} is {len(c)} characters; the limit is {MAX_CHOICE_CHARS}")
    return tuple(dict.fromkeys(spec))  # a repeated choice adds nothing; order kept


def _schema_text(spec: Any) -> str:
    if isinstance(spec, (str, bytes)):
        if len(spec) > MAX_SCHEMA_BYTES:
            raise InvalidArgument(f"the schema is {len(spec)} bytes; the limit is {MAX_SCHEMA_BYTES}")
        try:
            schema = json.loads(spec)
        except (ValueError, RecursionError) as e:
            raise InvalidArgument(f"the schema is not JSON: {e}") from None
    else:
        schema = spec
    if not isinstance(schema, dict):
        raise InvalidArgument(f"the schema must be a JSON object, got {type(schema).__name__}")
    text = canonical(schema)
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise InvalidArgument(f"the schema is {len(text.encode())} bytes; the limit is {MAX_SCHEMA_BYTES}")
    _check_keywords(schema, "", 0)
    _check_meta(schema)
    return text


def canonical(schema: dict) -> str:
    """Compact JSON, keys in the order given (the order properties are generated in)."""
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))


def _check_meta(schema: dict) -> None:
    """The schema against its draft's metaschema: catches wrong types of keywords ({"type": "foo"},
    "maxLength": -1) with the validator's own message."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/" + "/".join(str(p) for p in e.absolute_path)
        raise InvalidArgument(f"the schema is not a valid JSON Schema at {where}: {e.message}") from None


def _check_keywords(node: Any, where: str, depth: int) -> None:
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        raise InvalidArgument(f"the schema at {where or '/'} must be an object or a boolean")
    if depth > MAX_SCHEMA_DEPTH:
        raise InvalidArgument(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    here = where or "/"
    for key in UNENFORCED:
        if key in node:
            raise InvalidArgument(f"schema keyword {key!r} (at {here}) is not supported for structured answers")
    for key in ("oneOf", "allOf"):
        if isinstance(node.get(key), list) and len(node[key]) > 1:
            hint = "; use anyOf" if key == "oneOf" else ""
            raise InvalidArgument(f"schema keyword {key!r} with several branches (at {here}) is not supported{hint}")
    if "pattern" in node and ("minLength" in node or "maxLength" in node):
        raise InvalidArgument(f"a string pattern with minLength/maxLength (at {here}) is not supported: "
                              "put the length in the pattern, e.g. ^[a-z]{0,20}$")
    ref = node.get("$ref")
    if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
        raise InvalidArgument(f"only local references ('#/...') are supported, got $ref {ref!r} at {here}")
    for key in _SUBSCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            for name, sub in node[key].items():
                _check_keywords(sub, f"{where}/{key}/{name}", depth + 1)
    for key in _SUBSCHEMA_ONE:
        if isinstance(node.get(key), (dict, bool)):
            _check_keywords(node[key], f"{where}/{key}", depth + 1)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(node.get(key), list):
            for i, sub in enumerate(node[key]):
                _check_keywords(sub, f"{where}/{key}/{i}", depth + 1)


# ---- the built-in product schema ----
# The reference study's answer (evaluation/run.py asks for it; evaluation/answers.py reads it;
# evaluation/scoring.py scores category, brand/colour/spec and the package text).
CATEGORIES = ("digital", "home", "apparel", "beauty", "food_drink", "books_stationery")
# Longest value per string field, in characters. The default budget (256 new tokens) must hold the
# whole object even with every string at its longest in the costliest characters: every token the
# grammar allows is at least one byte, so tokens <= UTF-8 bytes of the answer. The pattern keeps
# strings to the Basic Multilingual Plane without escapes or control characters (<= 3 bytes a
# character), so the answer is at most 83 bytes of fixed JSON (with "books_stationery") + 3 x 57,
# plus the stop token: 255 (tests/test_structured.py counts it with the real tokenizer). The study's
# data has brand <= 11, colour <= 6, spec <= 11 and package text <= 35 (median 18) characters.
PRODUCT_LENGTHS = {"brand": 12, "colour": 8, "spec": 12, "text": 25}
_CHAR = r"[ -!#-\[\]-\uD7FF\uE000-\uFFFD]"  # printable BMP, no quote, backslash or control character


def _bounded_string(n: int, what: str) -> dict:
    # the bound lives in the pattern: beside a pattern, xgrammar ignores maxLength
    return {"type": "string", "description": f"{what}, at most {n} characters", "pattern": f"^{_CHAR}{{0,{n}}}$"}


PRODUCT_SCHEMA: dict = {  # read-only: PRODUCT is its canonical form
    "type": "object",
    "properties": {
        "category": {"type": "string", "enum": list(CATEGORIES)},
        "brand": _bounded_string(PRODUCT_LENGTHS["brand"], "brand name"),
        "colour": _bounded_string(PRODUCT_LENGTHS["colour"], "main colour"),
        "spec": _bounded_string(PRODUCT_LENGTHS["spec"], "size, capacity or model"),
        "text": _bounded_string(PRODUCT_LENGTHS["text"], "the text printed on the package"),
    },
    "required": ["category", "brand", "colour", "spec", "text"],
    "additionalProperties": False,
}
PRODUCT = ResponseFormat("json_schema", canonical(PRODUCT_SCHEMA))
BUILTIN = {"product": PRODUCT}  # the schemas shelfsight ships, by the name a request gives


def builtin(name: str) -> ResponseFormat:
    if name not in BUILTIN:
        raise InvalidArgument(f"no built-in response format {name!r}; there is {', '.join(BUILTIN)}")
    return BUILTIN[name]
