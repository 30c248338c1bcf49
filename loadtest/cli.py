"""`shelfsight loadtest`: run one Locust scenario against a gateway and summarize it."""
from __future__ import annotations

import json
from pathlib import Path

from shelfsight import ports


def register(sub) -> None:
    from shelfsight.loadtest.runner import LoadJob

    p = sub.add_parser("loadtest", help="run a Locust scenario headless and write a summary")
    p.add_argument("--scenario", required=True, choices=("cold", "hot", "near_duplicate", "mixed"))
    p.add_argument("--target", default=ports.GATEWAY_ADDRESS, help="gateway HOST:PORT")
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--spawn-rate", type=float, default=2.0)
    p.add_argument("--duration", type=int, default=30, help="seconds")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--metrics", help=f"gateway metrics URL (default: http://TARGET_HOST:{ports.GATEWAY_METRICS}/metrics)")
    p.add_argument("--step", action="store_true", help="step-shaped load instead of a constant user count")
    p.add_argument("--max-new-tokens", type=int, default=LoadJob.max_new_tokens)
    p.set_defaults(func=cmd_loadtest)


def cmd_loadtest(args) -> int:
    from shelfsight.loadtest.runner import LoadJob, run

    summary = run(LoadJob(scenario=args.scenario, target=args.target, users=args.users, spawn_rate=args.spawn_rate,
                          duration=args.duration, out=args.out, metrics_url=args.metrics, step=args.step,
                          max_new_tokens=args.max_new_tokens))
    print((args.out / "summary.md").read_text())
    failures = (summary.get("aggregate") or {}).get("failures", 0)
    print(json.dumps({"failures": failures, "hit_ratio": summary["cache"]["hit_ratio"]}))
    return 1 if failures else 0
