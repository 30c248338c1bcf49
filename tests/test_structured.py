"""Structured answers: response formats validated at the edge (shelfsight.formats), compiled into
grammars (engine/grammar.py), and the engine sampling under them on both runners with the tiny random
model: a random model under a grammar must still produce answers that satisfy it whenever it stops."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from shelfsight import formats, params, synth
from shelfsight.engine import Engine, EngineConfig, Request, sampling
from shelfsight.engine.grammar import literal
from shelfsight.errors import InvalidArgument
from shelfsight.formats import PRODUCT, PRODUCT_SCHEMA, ResponseFormat, parse
from shelfsight.model import imaging, qwen
from shelfsight.model.checkpoint import load_model
from shelfsight.model.preprocessing import load_preprocessor
from shelfsight.params import GenerationParams
from tests.test_engine import QUESTIONS, Collect, images

WAIT = 120  # seconds any one request may take here: a hang fails the test instead of stalling it

NESTED = {
    "type": "object",
    "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3,5}$"},
        "category": {"enum": ["digital", "home", "apparel"]},
        "stock": {"type": "integer", "minimum": 0, "maximum": 500},
        "rating": {"type": "number", "minimum": 0, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
        "size": {"type": "object", "properties": {"w": {"type": "integer", "minimum": 1, "maximum": 99},
                                                  "h": {"type": "integer", "minimum": 1, "maximum": 99}},
                 "required": ["w"], "additionalProperties": False},
        "on_sale": {"type": "boolean"},
        "note": {"type": ["string", "null"], "maxLength": 10},
    },
    "required": ["sku", "category", "stock", "tags", "size"],
    "additionalProperties": False,
}
REGEX = r"(red|green|blue)-[0-9]{2,4}( [a-z]{1,6}){0,3}"
CHOICES = ['say "hi"', "back\\slash", "a.b*c+?(d)[e]{f}|^$", "中文 🙂 café", "tab\there\nCafe\x01BAD", "(a|b)", "a"]


# ---- formats: validation at the edge ----
@pytest.mark.parametrize("kind,spec,message", [
    ("yaml", "x", "kind must be one of json_schema, json_object, regex, choice"),
    ("json_schema", "{not json", "the schema is not JSON"),
    ("json_schema", "[1, 2]", "must be a JSON object, got list"),
    ("json_schema", json.dumps({"enum": ["x" * 100] * 400}), "the limit is 32768"),
    ("json_schema", {"type": "foo"}, r"not a valid JSON Schema at /type"),
    ("json_schema", {"type": "array", "uniqueItems": True}, "'uniqueItems' .* is not supported"),
    ("json_schema", {"properties": {"a": {"not": {"const": 1}}}}, r"'not' \(at /properties/a\)"),
    ("json_schema", {"oneOf": [{"type": "integer"}, {"type": "string"}]}, "use anyOf"),
    ("json_schema", {"$ref": "https://example.com/s.json"}, "only local references"),
    ("json_schema", {"type": "string", "pattern": "^a+$", "maxLength": 4}, "put the length in the pattern"),
    ("json_object", {"type": "object"}, "takes no spec"),
    ("regex", "", "non-empty pattern"),
    ("regex", "a" * 5000, "the limit is 4096"),
    ("choice", [], "the choice list is empty"),
    ("choice", "red", "needs a list of strings"),
    ("choice", [str(i) for i in range(300)], "300 entries; the limit is 256"),
    ("choice", ["red", ""], "choice 1 is empty"),
    ("choice", ["red", 3], "choice 1 is not a string"),
    ("choice", ["x" * 300], "choice 0 is 300 characters"),
])
def test_parse_names_the_problem(kind, spec, message):
    with pytest.raises(InvalidArgument, match=message):
        parse(kind, spec)


def test_a_property_named_like_a_keyword_is_fine_and_formats_travel_as_json():
    schema = {"type": "object", "properties": {"not": {"type": "string", "maxLength": 3}, "if": {"type": "integer"}}}
    for fmt in (parse("json_schema", schema), parse("json_schema", json.dumps(schema, indent=2)),
                parse("json_object"), parse("regex", REGEX), parse("choice", CHOICES + ["a"])):
        assert ResponseFormat.from_json(fmt.to_json()) == fmt
    assert parse("json_schema", schema).spec == parse("json_schema", json.dumps(schema, indent=2)).spec
    assert list(json.loads(parse("json_schema", schema).spec)["properties"]) == ["not", "if"]  # order kept
    assert parse("choice", ["b", "a", "b"]).spec == ("b", "a")
    with pytest.raises(InvalidArgument, match="must be a JSON object"):
        ResponseFormat.from_json(b'{"kind": "regex"}')


def test_product_schema_is_what_the_study_scores():
    from evaluation import answers, scoring

    assert tuple(PRODUCT_SCHEMA["properties"]["category"]["enum"]) == synth.CATEGORIES
    assert tuple(PRODUCT_SCHEMA["properties"]) == answers.FIELDS == tuple(PRODUCT_SCHEMA["required"])
    assert parse("json_schema", PRODUCT_SCHEMA) == PRODUCT
    answer = {"category": "food_drink", "brand": "青禾", "colour": "green", "spec": "250 g", "text": "青禾 气泡水 250 g"}
    jsonschema.validate(answer, PRODUCT_SCHEMA)
    fields, how = answers.parse(json.dumps(answer, ensure_ascii=False))
    truth = {"category": "food_drink", "attributes": {"brand": "青禾", "colour": "green", "spec": "250 g"},
             "ocr_text": "青禾 气泡水 250 g"}
    assert how == "json" and scoring.score(fields, truth).total == pytest.approx(1.0)
    for bad in ({**answer, "category": "toys"}, {**answer, "brand": "x" * 13}, {**answer, "text": "a\\b"},
                {**answer, "spec": "🙂"}, {k: v for k, v in answer.items() if k != "text"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, PRODUCT_SCHEMA)


# ---- the tiny model, one engine per runner for the module ----
@pytest.fixture(scope="module")
def stack(tiny_checkpoint):
    from transformers import AutoProcessor

    torch.set_num_threads(2)
    model = load_model(tiny_checkpoint, dtype="float32")
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    pre = load_preprocessor(tiny_checkpoint, 65_536, 1_048_576, imaging.ImageLimits(), params.Limits())
    engines = {"slots": Engine(model, processor.tokenizer, EngineConfig(max_batch=16, max_waiting=128)),
               "reference": Engine(model, processor.tokenizer, EngineConfig(max_batch=8, runner="reference"))}
    for e in engines.values():
        e.start()
    prompts = [pre(data, QUESTIONS[i % 4]) for i, data in enumerate(images()[:4])]
    yield processor.tokenizer, engines, prompts
    for e in engines.values():
        e.stop()


def ask(engine, x, p: GenerationParams, fmt: ResponseFormat | None = None, sink=None) -> Collect:
    sink = sink or Collect()
    engine.submit(Request.of(x, p, sink, response_format=fmt))
    return sink


def finished(sinks: list[Collect]) -> list[Collect]:
    assert all(s.done.wait(WAIT) for s in sinks), "a request did not finish"
    assert all(s.error is None for s in sinks), [s.error for s in sinks if s.error]
    return sinks


def hot(seed: int, n: int = 256) -> GenerationParams:
    return GenerationParams(max_new_tokens=n, temperature=1.0, top_p=1.0, top_k=0, seed=seed)


def test_product_schema_fits_the_default_budget(stack):
    """Every token a grammar allows is at least one byte (special tokens are never allowed), so an
    answer takes at most as many tokens as its UTF-8 bytes. The product schema's longest answer, every
    string at its limit in 3-byte characters and sent one byte a token, is accepted by its grammar and
    takes 255 tokens with the stop token; one character more is refused. So 256 always suffices."""
    tokenizer, engines, _ = stack
    grammars = engines["slots"].grammars()
    vocab = grammars.info.decoded_vocab
    special = set(grammars.info.special_token_ids)
    assert all(len(vocab[i]) >= 1 for i in range(len(vocab)) if i not in special)
    byte_token = {vocab[i][0]: i for i in range(len(vocab)) if i not in special and len(vocab[i]) == 1}
    assert len(byte_token) == 256

    def worst(extra: int = 0, char: str = "中") -> str:
        doc = {"category": "books_stationery"} | {k: char * n for k, n in formats.PRODUCT_LENGTHS.items()}
        doc["text"] += char * extra
        return json.dumps(doc, ensure_ascii=False)  # the grammar's separators: ", " and ": "

    budget = GenerationParams().max_new_tokens
    for char in ("中", "ꙮ", "ঢ", "\uffef"):  # 3-byte characters (the last ones cost the most whole)
        text = worst(char=char)
        assert len(char.encode()) == 3 and len(tokenizer.encode(text)) + 1 <= len(text.encode()) + 1 <= budget
        m = grammars.matcher(grammars.compile(PRODUCT))
        assert all(m.accept_token(byte_token[b]) for b in text.encode())
        assert m.accept_token(qwen.IM_END_ID) and m.is_terminated()
    assert len(worst().encode()) + 1 == 255
    m = grammars.matcher(grammars.compile(PRODUCT))
    assert not m.accept_string(worst(extra=1))
    for refused in ('"🙂"', '"\\u4e2d"', '"a\\nb"'):  # 4-byte characters and escapes cannot appear
        m = grammars.matcher(grammars.compile(PRODUCT))
        assert m.accept_string('{"category": "home", "brand": ') and not m.accept_string(refused)


def test_grammars_compile_once_escape_choices_and_refuse_with_reasons(stack):
    _, engines, _ = stack
    g = engines["slots"].grammars()
    assert g.compile(PRODUCT) is g.compile(parse("json_schema", PRODUCT_SCHEMA))  # cached by text
    compiled = g.compile(parse("choice", CHOICES))
    for c in CHOICES:
        m = g.matcher(compiled)
        assert m.accept_string(c) and m.is_completed(), c
    for near in ("say hi", "a.b*c+?(d)[e]{f}|^", "(a|b)|", "back\\\\slash", "b"):
        m = g.matcher(compiled)
        assert not (m.accept_string(near) and m.is_completed()), near
    assert literal('q"b\\\nC') == '"q\\"b\\\\\\u000aC"'
    with pytest.raises(InvalidArgument, match="regex response format cannot be compiled: .*parenthesis"):
        g.compile(parse("regex", "a(b"))
    # valid JSON Schema, but not satisfiable: the metaschema cannot tell, xgrammar says why
    with pytest.raises(InvalidArgument, match="minLength 5 is greater than maxLength 2"):
        g.compile(parse("json_schema", {"type": "string", "minLength": 5, "maxLength": 2}))
    size, g.cache_size = g.cache_size, 2  # the cache bound
    try:
        for pattern in ("a", "b", "c"):
            g.compile(parse("regex", pattern))
        assert [json.loads(k)["spec"] for k in g._cache] == ["b", "c"]
    finally:
        g.cache_size = size


def test_bitmask_bias_equals_xgrammars_own_mask():
    import xgrammar as xgr

    torch.manual_seed(0)
    for vocab in (64, 1000, 151_936):
        words = (vocab + 31) // 32
        bitmask = torch.randint(-2**31, 2**31 - 1, (3, words), dtype=torch.int32)
        bitmask[1] = -1
        logits = torch.randn(3, vocab)
        theirs = logits.clone()
        xgr.apply_token_bitmask_inplace(theirs, bitmask, vocab_size=vocab)
        mine = logits + sampling.bitmask_bias(bitmask, vocab)
        assert torch.equal(mine, theirs) and torch.equal(mine[1], logits[1])


def valid(schema: dict, text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def test_nested_schema_answers_validate_alone_and_beside_free_requests(stack):
    """50 sampled answers (temperature 1, seeds 0..49) under a nested schema: every one that stops is
    valid; free requests in the same batches give the tokens they give alone."""
    _, engines, prompts = stack
    engine, fmt = engines["slots"], parse("json_schema", NESTED)
    free_p = [GenerationParams(max_new_tokens=24, temperature=0.9, seed=100 + i) for i in range(4)]
    alone = [finished([ask(engine, prompts[i], free_p[i])])[0] for i in range(4)]
    alone += [finished([ask(engine, prompts[i % 4], hot(i), fmt)])[0] for i in range(3)]
    constrained = [ask(engine, prompts[i % 4], hot(i), fmt) for i in range(50)]
    mixed = [ask(engine, prompts[i], free_p[i]) for i in range(4)]
    finished(constrained + mixed)
    assert [(s.text, s.usage) for s in mixed + constrained[:3]] == [(s.text, s.usage) for s in alone]
    stopped = [s for s in constrained if s.finish == "stop"]
    print(f"nested schema: {len(stopped)}/50 stopped, {50 - len(stopped)} at the token limit; "
          f"{sum(valid(NESTED, s.text) for s in stopped)}/{len(stopped)} of those valid")
    assert all(valid(NESTED, s.text) for s in stopped), [s.text for s in stopped if not valid(NESTED, s.text)]
    assert len(stopped) >= 45
    assert len({s.text for s in stopped}) > 40  # the seeds do steer the answers


@pytest.mark.parametrize("runner", ["slots", "reference"])
def test_regex_choice_and_product_answers_hold_on_both_runners(stack, runner):
    _, engines, prompts = stack
    engine = engines[runner]
    regex, choice = parse("regex", REGEX), parse("choice", CHOICES)
    sinks = {"regex": [ask(engine, prompts[i % 4], hot(i, 64), regex) for i in range(8)],
             "choice": [ask(engine, prompts[i % 4], hot(i), choice) for i in range(8)],
             "product": [ask(engine, prompts[i % 4], hot(i), PRODUCT) for i in range(8)],
             "object": [ask(engine, prompts[i % 4], hot(i, 64), parse("json_object")) for i in range(4)]}
    finished([s for group in sinks.values() for s in group])
    # the longest match is 31 bytes: every answer stops within its 64 tokens
    assert all(s.finish == "stop" and re.fullmatch(REGEX, s.text) for s in sinks["regex"]), [s.text for s in sinks["regex"]]
    assert all(s.finish == "stop" and s.text in CHOICES for s in sinks["choice"])
    assert len({s.text for s in sinks["choice"]}) > 1
    # the budget holds the whole product object: every answer stops, and is valid
    assert all(s.finish == "stop" and valid(PRODUCT_SCHEMA, s.text) for s in sinks["product"])
    for s in sinks["object"]:
        assert s.finish == "length" or isinstance(json.loads(s.text), dict)
        assert s.text.startswith("{")


def test_seeded_constrained_answers_are_batch_and_runner_invariant(stack):
    _, engines, prompts = stack
    slots, reference = engines["slots"], engines["reference"]
    fmt = parse("json_schema", NESTED)
    alone = finished([ask(slots, prompts[1], hot(7), fmt)])[0]
    crowd = [ask(slots, prompts[i % 4], hot(50 + i), fmt) if i % 2 else ask(slots, prompts[i % 4], hot(50 + i, 40))
             for i in range(10)]
    again = ask(slots, prompts[1], hot(7), fmt)
    other = ask(reference, prompts[1], hot(7), fmt)
    finished(crowd + [again, other])
    assert (again.text, again.usage) == (alone.text, alone.usage) == (other.text, other.usage)


@pytest.mark.parametrize("runner", ["slots", "reference"])
def test_greedy_answer_is_unchanged_by_a_grammar_that_admits_it(stack, runner):
    _, engines, prompts = stack
    engine = engines[runner]
    p = GenerationParams(max_new_tokens=16, temperature=0.0)
    free = finished([ask(engine, x, p) for x in prompts[:2]])
    for x, f in zip(prompts[:2], free):
        fmts = [parse("choice", [f.text, f.text + "!", "other"]), parse("regex", r"[\s\S]*")]
        for s in finished([ask(engine, x, p, fmt) for fmt in fmts]):
            assert (s.text, s.usage, s.finish) == (f.text, f.usage, f.finish)


def test_bad_formats_fail_at_submit_and_small_budgets_end_with_length(stack):
    _, engines, prompts = stack
    engine = engines["slots"]
    with pytest.raises(InvalidArgument, match="parenthesis"):
        ask(engine, prompts[0], hot(0), ResponseFormat("regex", "(red|green"))
    with pytest.raises(InvalidArgument, match="Unsupported type"):
        ask(engine, prompts[0], hot(0), ResponseFormat("json_schema", '{"type": "foo"}'))  # parse() skipped
    with pytest.raises(InvalidArgument, match="ResponseFormat"):
        ask(engine, prompts[0], hot(0), {"kind": "regex", "spec": "a"})
    short = finished([ask(engine, prompts[0], hot(0, 3), PRODUCT)])[0]
    assert short.finish == "length" and short.usage[1] == 3 and short.text.startswith("{")
    with pytest.raises(ValueError):
        json.loads(short.text)
    assert engine.load() == (0, 0)


def test_cancelled_constrained_rows_release_their_grammar(stack):
    _, engines, prompts = stack
    engine = engines["slots"]
    cancelled = [ask(engine, prompts[i], hot(i), PRODUCT, Collect(cancel_after=1)) for i in range(3)]
    for s in cancelled:
        assert s.done.wait(WAIT) and s.error is not None and s.error.code == "CANCELLED"
    after = finished([ask(engine, prompts[0], hot(3), PRODUCT)])[0]
    assert after.finish == "stop" and valid(PRODUCT_SCHEMA, after.text)
    assert engine.load() == (0, 0) and not engine.batch.rows()


def test_free_batches_run_the_whole_step_as_before(stack, monkeypatch):
    """Once no running row is constrained, steps are not split (same graph, same code path)."""
    _, engines, prompts = stack
    engine = engines["slots"]
    finished([ask(engine, prompts[0], hot(1), PRODUCT)])

    def split(*_):
        raise AssertionError("a free batch was split")

    monkeypatch.setattr(engine.runner, "launch_forward", split)
    free = finished([ask(engine, x, GenerationParams(max_new_tokens=8, temperature=0.0)) for x in prompts])
    assert all(s.usage[1] == 8 or s.finish == "stop" for s in free)
