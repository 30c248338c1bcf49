"""`shelfsight ask` and `shelfsight batch`: the command line over the Python client."""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from shelfsight import params, ports


API_KEY_ENV = "SHELFSIGHT_API_KEY"


def add_connection_flags(p) -> None:
    """How a command reaches the gateway: TLS and an API key (besides --target)."""
    p.add_argument("--tls-ca", type=Path, help="the CA certificate the gateway's TLS certificate chains to (turns TLS on)")
    p.add_argument("--tls-cert", type=Path, help="this client's certificate, for a gateway that wants mutual TLS")
    p.add_argument("--tls-key", type=Path, help="its private key")
    p.add_argument("--api-key-file", type=Path, help=f"a file holding the API key (default: ${API_KEY_ENV}; "
                   "a key on the command line would show in the process list)")


def connection(args):
    """The Connection the connection flags describe (target from --target)."""
    import os

    from shelfsight.client.client import Connection
    from shelfsight.errors import NotFound

    key = os.environ.get(API_KEY_ENV) or None
    if getattr(args, "api_key_file", None):
        if not args.api_key_file.is_file():
            raise NotFound(f"API key file {args.api_key_file} does not exist")
        key = args.api_key_file.read_text().strip()
    return Connection(args.target, getattr(args, "tls_ca", None), getattr(args, "tls_cert", None),
                      getattr(args, "tls_key", None), key)


def add_generation_flags(p) -> None:
    p.add_argument("--system", help="system prompt")
    for field, rule in params.RULES.items():  # unset: the server's defaults
        p.add_argument(f"--{field.replace('_', '-')}", type=rule.cast, help=rule.help)
    p.add_argument("--stop", action="append", metavar="TEXT", help="end the answer before this text (repeatable, up to 4)")
    p.add_argument("--cache", choices=("use", "skip", "refresh"), default="use")
    p.add_argument("--enhance", action="store_true", help="contrast x1.2, brightness x1.1 first")
    p.add_argument("--timeout", type=float, help="deadline in seconds")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--format", choices=("product",), dest="builtin_format",
                      help="answer as the built-in product schema (category, brand, colour, spec, text)")
    form.add_argument("--json-schema", type=Path, metavar="FILE", help="answer as JSON matching this JSON Schema")
    form.add_argument("--json-object", action="store_true", help="answer as any JSON object")
    form.add_argument("--regex", help="answer matching this regular expression")
    form.add_argument("--choice", help="answer with exactly one of these comma-separated strings")


def response_format(args):
    from shelfsight import formats
    from shelfsight.errors import InvalidArgument, NotFound

    if args.builtin_format:
        return formats.builtin(args.builtin_format)
    if args.json_schema:
        if not args.json_schema.is_file():
            raise NotFound(f"schema file {args.json_schema} does not exist")
        try:
            return formats.parse("json_schema", args.json_schema.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise InvalidArgument(f"schema file {args.json_schema} is not UTF-8 text") from None
    if args.json_object:
        return formats.parse("json_object")
    if args.regex is not None:  # an empty one is refused by name, never dropped into a free answer
        return formats.parse("regex", args.regex)
    if args.choice is not None:
        return formats.parse("choice", [c.strip() for c in args.choice.split(",") if c.strip()])
    return None


def request_options(args) -> dict:
    return dict(system=args.system, cache=args.cache, enhance=args.enhance, stop=args.stop,
                response_format=response_format(args), **{field: getattr(args, field) for field in params.FIELDS})


def register(sub) -> None:
    ask = sub.add_parser("ask", help="ask the gateway a question about one image, or several together "
                         "(`ask a.jpg b.jpg \"Same product?\"`)")
    ask.add_argument("inputs", nargs="+", metavar="IMAGE... QUESTION", help="one or more photos, then the question")
    ask.add_argument("--target", default=ports.GATEWAY_ADDRESS, help="gateway HOST:PORT")
    ask.add_argument("--stream", action="store_true", help="print the answer as it is written")
    ask.add_argument("--json", action="store_true", help="print the whole reply as JSON")
    add_generation_flags(ask)
    add_connection_flags(ask)
    ask.set_defaults(func=cmd_ask)

    batch = sub.add_parser("batch", help="answer one question for every image in a folder (resumable)")
    batch.add_argument("folder", type=Path)
    batch.add_argument("--out", required=True, type=Path, help="results .jsonl (appended; rerun to resume)")
    batch.add_argument("--question", default=None)
    batch.add_argument("--concurrency", type=int, default=4)
    batch.add_argument("--target", default=ports.GATEWAY_ADDRESS)
    batch.add_argument("--no-progress", action="store_true")
    add_generation_flags(batch)
    add_connection_flags(batch)
    batch.set_defaults(func=cmd_batch)

    index = sub.add_parser("index", help="add a catalog to the search index: a folder of photos (stem = id) or a "
                           "JSONL of items (id, image, text, metadata); resumable")
    index.add_argument("catalog", type=Path)
    index.add_argument("--target", default=ports.GATEWAY_ADDRESS, help="gateway HOST:PORT")
    index.add_argument("--progress", type=Path, help="acknowledged items (default: CATALOG.index.jsonl beside it); "
                       "rerun to resume")
    index.add_argument("--timeout", type=float, help="deadline in seconds for the whole stream")
    add_connection_flags(index)
    index.set_defaults(func=cmd_index)

    search = sub.add_parser("search", help="find catalog items by photo, by words, or both")
    search.add_argument("image", type=Path, nargs="?", help="a photo to search by")
    search.add_argument("--text", default="", help="words to search by")
    search.add_argument("--top-k", type=int, default=0, help="hits (default: the gateway's, 10)")
    search.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                        help="only items whose metadata KEY equals VALUE (repeatable; numbers and true/false are typed)")
    search.add_argument("--rerank", type=int, default=0, metavar="N", help="rerank the first N with the reranker")
    search.add_argument("--cache", choices=("use", "skip", "refresh"), default="use")
    search.add_argument("--target", default=ports.GATEWAY_ADDRESS, help="gateway HOST:PORT")
    search.add_argument("--json", action="store_true", help="one JSON object per hit and line: id, score, metadata")
    search.add_argument("--timeout", type=float, help="deadline in seconds")
    add_connection_flags(search)
    search.set_defaults(func=cmd_search)


def cmd_ask(args) -> int:
    from shelfsight.client.client import ShelfsightClient
    from shelfsight.errors import InvalidArgument, NotFound

    if len(args.inputs) < 2:
        raise InvalidArgument("ask takes one or more photos, then the question")
    *images, question = args.inputs
    for image in map(Path, images):
        if not image.is_file():
            raise NotFound(f"image {image} does not exist")
    image = Path(images[0]) if len(images) == 1 else [Path(i) for i in images]
    with ShelfsightClient(connection(args)) as client:
        if args.stream:
            result = None
            for chunk in client.stream(image, question, timeout=args.timeout, **request_options(args)):
                if chunk.final:
                    result = chunk.result
                elif not args.json:
                    print(chunk.text, end="", flush=True)
            if not args.json:
                print(flush=True)
        else:
            result = client.recognize(image, question, timeout=args.timeout, **request_options(args))
            if not args.json:
                print(result.text, flush=True)
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False, indent=1))
    else:
        print(f"[{result.cache_status}, {result.completion_tokens} tokens, {result.finish_reason}, "
              f"{result.total_seconds * 1000:.0f} ms, model {result.model_id}]", file=sys.stderr)
    return 0


def cmd_batch(args) -> int:
    from shelfsight.client import batch

    def log(msg: str) -> None:
        print(f"batch: {msg}", file=sys.stderr, flush=True)

    summary = asyncio.run(batch.run(connection(args), args.folder, args.out, args.question or batch.DEFAULT_QUESTION,
                                    concurrency=args.concurrency, progress=not args.no_progress,
                                    timeout=args.timeout, log=log, **request_options(args)))
    print(json.dumps(summary.__dict__ | {"unsupported": len(summary.unsupported)}))
    return 1 if summary.failed else 0


def parse_filter(spec: str):
    """KEY=VALUE -> (key, value): integers, numbers and true/false typed, anything else text."""
    from shelfsight.errors import InvalidArgument

    key, sep, raw = spec.partition("=")
    if not sep or not key:
        raise InvalidArgument(f"--filter {spec!r} is not KEY=VALUE")
    if raw in ("true", "false"):
        return key, raw == "true"
    for cast in (int, float):
        try:
            return key, cast(raw)
        except ValueError:
            pass
    return key, raw


def cmd_index(args) -> int:
    from shelfsight.client import indexing

    def log(msg: str) -> None:
        print(f"index: {msg}", file=sys.stderr, flush=True)

    summary = asyncio.run(indexing.run(connection(args), args.catalog, args.progress, timeout=args.timeout, log=log))
    print(json.dumps(summary.__dict__ | {"unsupported": len(summary.unsupported)}))
    return 1 if summary.failed else 0


def cmd_search(args) -> int:
    from shelfsight.client.client import ShelfsightClient
    from shelfsight.errors import NotFound

    if args.image is not None and not args.image.is_file():
        raise NotFound(f"image {args.image} does not exist")
    filters = dict(parse_filter(f) for f in args.filter)
    with ShelfsightClient(connection(args)) as client:
        r = client.search(args.image, args.text, top_k=args.top_k, filters=filters, rerank=args.rerank,
                          cache=args.cache, timeout=args.timeout)
    for h in r.hits:
        if args.json:
            print(json.dumps(h.to_dict(), ensure_ascii=False))
        else:
            extra = f" rerank {h.rerank_score:.4f}" if h.rerank_score is not None else ""
            print(f"{h.score:.4f}{extra}  {h.id}  {h.text[:60]}  {json.dumps(h.metadata, ensure_ascii=False)}")
    print(f"[{len(r.hits)} hits, {r.cache_status}, {r.total_seconds * 1000:.0f} ms, model {r.model_id}]", file=sys.stderr)
    return 0
