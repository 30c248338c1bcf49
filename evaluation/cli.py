"""`shelfsight dataset synth|validate` and `shelfsight eval [compare]`."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

from shelfsight import ports


def register(sub) -> None:
    ds = sub.add_parser("dataset", help="evaluation datasets")
    dsub = ds.add_subparsers(dest="dataset_command", required=True, parser_class=type(ds))
    synth = dsub.add_parser("synth", help="render a deterministic synthetic product dataset with ground truth")
    synth.add_argument("--out", required=True, type=Path)
    synth.add_argument("--per-category", type=int, default=4, help="products per category (x4 variants)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--latin-only", action="store_true", help="no Chinese/Japanese labels")
    synth.add_argument("--force", action="store_true")
    synth.set_defaults(func=cmd_synth)
    val = dsub.add_parser("validate", help="check a dataset's manifest and files")
    val.add_argument("folder", type=Path)
    val.set_defaults(func=cmd_validate)

    ev = sub.add_parser("eval", help="score the served model on a dataset (resumable); `eval compare A B`; "
                        "`eval search DATASET`: the dataset as a retrieval benchmark of catalog search")
    ev.add_argument("--dataset", type=Path)
    ev.add_argument("--target", default=ports.GATEWAY_ADDRESS)
    ev.add_argument("--out", type=Path)
    ev.add_argument("--concurrency", type=int, default=4)
    ev.add_argument("--seed", type=int, default=0, help="sampling seed (the study's settings sample)")
    ev.add_argument("--timeout", type=float)
    ev.add_argument("--max-new-tokens", type=int, help="override the study's answer length (e.g. for quick CPU runs)")
    ev.add_argument("--no-progress", action="store_true")
    ev.add_argument("--free-text", action="store_true",
                    help="ask the study's way (JSON described in the question, parsed tolerantly) instead of "
                         "constraining answers to the built-in product schema")
    from shelfsight.client.cli import add_connection_flags

    add_connection_flags(ev)
    ev.add_argument("--rerank", type=int, default=10, help="eval search: also rerank the first N (0: no rerank runs)")
    ev.add_argument("--modes", default="image,text,hybrid", help="eval search: which queries to run")
    ev.add_argument("--keep", action="store_true", help="eval search: keep the indexed evaluation items")
    ev.add_argument("compare", nargs="*", metavar="compare RUN_A RUN_B | search DATASET",
                    help="instead of running: show two runs side by side, or evaluate catalog search")
    ev.set_defaults(func=cmd_eval)


def cmd_synth(args) -> int:
    from shelfsight.evaluation.dataset import synthesize
    from shelfsight.export.staging import Staging

    with Staging(args.out, args.force) as staging:
        n = synthesize(staging.path, per_category=args.per_category, seed=args.seed,
                       scripts=("latin",) if args.latin_only else ("latin", "latin", "zh", "ja"))
    print(f"wrote {n} images and manifest.jsonl to {args.out}")
    return 0


def cmd_validate(args) -> int:
    from collections import Counter

    from shelfsight.evaluation.dataset import load

    items = load(args.folder)
    print(json.dumps({"images": len(items), "categories": Counter(i.category for i in items),
                      "variants": Counter(i.variant for i in items)}))
    return 0


def cmd_eval(args) -> int:
    from shelfsight.client.cli import connection
    from shelfsight.errors import InvalidArgument
    from shelfsight.evaluation import run

    if args.compare and args.compare[0] == "search":
        from shelfsight.evaluation import search

        if len(args.compare) != 2:
            raise InvalidArgument("usage: shelfsight eval search DATASET [--out DIR] [--rerank N]")
        out = args.out or Path("runs") / "search"
        asyncio.run(search.run(Path(args.compare[1]), connection(args), out, rerank=args.rerank,
                               modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
                               concurrency=args.concurrency, keep=args.keep, timeout=args.timeout))
        print((out / "search-report.md").read_text(), end="")
        return 0
    if args.compare:
        if len(args.compare) != 3 or args.compare[0] != "compare":
            raise InvalidArgument("usage: shelfsight eval compare RUN_A RUN_B")
        print(run.compare(Path(args.compare[1]), Path(args.compare[2])), end="")
        return 0
    if not args.dataset or not args.out:
        raise InvalidArgument("--dataset and --out are required (or: shelfsight eval compare RUN_A RUN_B)")
    report = asyncio.run(run.run(args.dataset, connection(args), args.out, concurrency=args.concurrency, seed=args.seed,
                                 progress=not args.no_progress, timeout=args.timeout,
                                 max_new_tokens=args.max_new_tokens, free_text=args.free_text))
    print((args.out / "report.md").read_text(), end="")
    return 1 if report["missing"] else 0
