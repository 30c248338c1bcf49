"""`shelfsight export ...`: build checkpoints and lay out the Triton repository."""
from __future__ import annotations

import json
import os
from pathlib import Path


def register(sub) -> None:
    export = sub.add_parser("export", help="build, quantize and package checkpoints")
    esub = export.add_subparsers(dest="export_command", required=True, parser_class=type(export))

    tiny = esub.add_parser("tiny", help="write a random-weight Qwen3-VL checkpoint in the real format")
    tiny.add_argument("--out", required=True, type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--shape", choices=("tiny", "2b"), default="tiny",
                      help="tiny (~20 M parameters) or the exact Qwen3-VL-2B shape (for GPU benchmarks)")
    tiny.add_argument("--device", default="cpu", help="where to initialise the weights (cuda for 2b)")
    tiny.add_argument("--kind", choices=("generator", "embedding", "reranker"), default="generator",
                      help="which Qwen3-VL format: the instruct generator, Qwen3-VL-Embedding or Qwen3-VL-Reranker")
    tiny.add_argument("--force", action="store_true", help="replace a non-empty --out")
    tiny.set_defaults(func=cmd_tiny)

    q = esub.add_parser("quantize", help="bf16 / int8 / int4 (GPTQ) checkpoint with a fidelity manifest")
    q.add_argument("--model", required=True, type=Path, help="a bf16 Qwen3-VL checkpoint directory")
    q.add_argument("--scheme", required=True, choices=("bf16", "int8", "int4"))
    q.add_argument("--out", required=True, type=Path)
    q.add_argument("--calibration", type=Path,
                   help="folder of product photos (+ optional questions.jsonl / questions.txt); "
                        "default: built-in synthetic product renders")
    q.add_argument("--samples", type=int, help="calibration samples (default: QuantizeJob's)")
    q.add_argument("--heldout", type=int, help="synthetic held-out samples for fidelity")
    q.add_argument("--device", help="cpu or cuda (default: QuantizeJob's)")
    q.add_argument("--force", action="store_true", help="replace a non-empty --out")
    q.set_defaults(func=cmd_quantize)

    r = esub.add_parser("repository", help="lay out the Triton model repository for a checkpoint")
    r.add_argument("--model", type=Path, help="the generator: a Qwen3-VL checkpoint (bf16, int8 or int4)")
    r.add_argument("--out", required=True, type=Path)
    add_repository_flags(r)
    r.add_argument("--force", action="store_true", help="replace a non-empty --out")
    r.set_defaults(func=cmd_repository)


def add_repository_flags(p) -> None:
    """How the repository is laid out: `export repository` and `serve --model` take the same flags."""
    from shelfsight.engine import PRESETS
    from shelfsight.export.repository import RepositoryJob  # no torch: cheap for every command

    job = RepositoryJob
    p.add_argument("--device", choices=tuple(PRESETS), default=job.device,
                   help="where `generate` runs (shelfsight/engine/config.py PRESETS)")
    p.add_argument("--preprocess-instances", type=int, default=job.preprocess_instances)
    p.add_argument("--collect-instances", type=int, default=job.collect_instances,
                   help="instances of the unary `collect` step; one keeps any number of answers in flight")
    p.add_argument("--max-batch", type=int, default=job.max_batch, help="rows the engine decodes together")
    p.add_argument("--max-pixels", type=int, default=job.max_pixels,
                   help="resize pictures to at most this many pixels (1,024 visual tokens by default)")
    p.add_argument("--min-pixels", type=int, default=job.min_pixels)
    p.add_argument("--max-new-tokens", type=int, default=job.max_new_tokens, help="default answer length")
    p.add_argument("--embedding", type=Path, help="a Qwen3-VL-Embedding checkpoint: serve `embed` (catalog search)")
    p.add_argument("--reranker", type=Path, help="a Qwen3-VL-Reranker checkpoint: serve `rerank`")
    p.add_argument("--dimensions", type=int, default=job.dimensions,
                   help="the embedding's Matryoshka size (0: the model's full width)")


def repository_job(args, model: Path, out: Path, force: bool = False):
    from shelfsight.export.repository import RepositoryJob

    return RepositoryJob(model=model, out=out, embedding=args.embedding, reranker=args.reranker,
                         dimensions=args.dimensions, device=args.device, preprocess_instances=args.preprocess_instances,
                         collect_instances=args.collect_instances, max_batch=args.max_batch,
                         min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                         max_new_tokens=args.max_new_tokens, force=force)


def cmd_tiny(args) -> int:
    from shelfsight.export import tiny
    from shelfsight.export.staging import Staging

    with Staging(args.out, args.force) as staging:
        tiny.build(staging.path, shape=args.shape, seed=args.seed, device=args.device, kind=args.kind)
    print(f"wrote a random {args.shape} Qwen3-VL {args.kind} checkpoint (seed {args.seed}) to {args.out}")
    return 0


def cmd_quantize(args) -> int:
    import sys

    from shelfsight.export.quantize import QuantizeJob, run

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sizes = {k: getattr(args, k) for k in ("samples", "heldout", "device") if getattr(args, k) is not None}
    manifest = run(QuantizeJob(model=args.model, scheme=args.scheme, out=args.out, calibration=args.calibration,
                               force=args.force, **sizes),
                   log=lambda msg: print(msg, file=sys.stderr))
    summary = {k: manifest[k] for k in ("scheme", "method", "time_s", "fidelity")}
    if "fidelity_rtn" in manifest:
        summary["fidelity_rtn"] = manifest["fidelity_rtn"]
    print(json.dumps(summary, indent=1))
    return 0


def cmd_repository(args) -> int:
    from shelfsight.export.repository import build

    m = build(repository_job(args, args.model, args.out, args.force))
    names = [f"{kind} {s.model_id} ({s.scheme})" for kind in ("generator", "embedding", "reranker")
             if (s := getattr(m, kind)) is not None]
    print(f"wrote {args.out}: {', '.join(names)} on {m.device}, {m.dtype}")
    return 0
