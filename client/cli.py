"""`shelfsight ask` and `shelfsight batch`: the command line over the Python client."""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from shelfsight import params, ports


def add_generation_flags(p) -> None:
    p.add_argument("--system", help="system prompt")
    for field, rule in params.RULES.items():  # unset: the server's defaults
        p.add_argument(f"--{field.replace('_', '-')}", type=rule.cast, help=rule.help)
    p.add_argument("--cache", choices=("use", "skip", "refresh"), default="use")
    p.add_argument("--enhance", action="store_true", help="contrast x1.2, brightness x1.1 first")
    p.add_argument("--timeout", type=float, help="deadline in seconds")


def request_options(args) -> dict:
    return dict(system=args.system, cache=args.cache, enhance=args.enhance,
                **{field: getattr(args, field) for field in params.FIELDS})


def register(sub) -> None:
    ask = sub.add_parser("ask", help="ask the gateway a question about one image")
    ask.add_argument("image", type=Path)
    ask.add_argument("question")
    ask.add_argument("--target", default=ports.GATEWAY_ADDRESS, help="gateway HOST:PORT")
    ask.add_argument("--stream", action="store_true", help="print the answer as it is written")
    ask.add_argument("--json", action="store_true", help="print the whole reply as JSON")
    add_generation_flags(ask)
    ask.set_defaults(func=cmd_ask)

    batch = sub.add_parser("batch", help="answer one question for every image in a folder (resumable)")
    batch.add_argument("folder", type=Path)
    batch.add_argument("--out", required=True, type=Path, help="results .jsonl (appended; rerun to resume)")
    batch.add_argument("--question", default=None)
    batch.add_argument("--concurrency", type=int, default=4)
    batch.add_argument("--target", default=ports.GATEWAY_ADDRESS)
    batch.add_argument("--no-progress", action="store_true")
    add_generation_flags(batch)
    batch.set_defaults(func=cmd_batch)


def cmd_ask(args) -> int:
    from shelfsight.client.client import ShelfsightClient
    from shelfsight.errors import NotFound

    if not args.image.is_file():
        raise NotFound(f"image {args.image} does not exist")
    with ShelfsightClient(args.target) as client:
        if args.stream:
            result = None
            for chunk in client.stream(args.image, args.question, timeout=args.timeout, **request_options(args)):
                if chunk.final:
                    result = chunk.result
                elif not args.json:
                    print(chunk.text, end="", flush=True)
            if not args.json:
                print(flush=True)
        else:
            result = client.recognize(args.image, args.question, timeout=args.timeout, **request_options(args))
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

    summary = asyncio.run(batch.run(args.target, args.folder, args.out, args.question or batch.DEFAULT_QUESTION,
                                    concurrency=args.concurrency, progress=not args.no_progress,
                                    timeout=args.timeout, log=log, **request_options(args)))
    print(json.dumps(summary.__dict__ | {"unsupported": len(summary.unsupported)}))
    return 1 if summary.failed else 0
