"""`shelfsight loadtest`: one scenario, headless, bounded in time, summarized.

Runs Locust in a child process (gevent wants a process of its own) and writes into --out:
Locust's CSV files and HTML report, plus summary.json and summary.md with requests/s,
p50/p95/p99, failures, time to first chunk for streams, and the cache hit ratio by level, read as
the change in the gateway's own /metrics over the run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from shelfsight import ports
from shelfsight.errors import InvalidArgument, Unavailable

HERE = Path(__file__).resolve().parent
SCENARIOS = {"cold": "ColdUser", "hot": "HotUser", "near_duplicate": "NearDuplicateUser", "mixed": "MixedUser"}


@dataclass(frozen=True)
class LoadJob:
    scenario: str
    target: str
    users: int
    spawn_rate: float
    duration: int
    out: Path
    metrics_url: str | None = None
    step: bool = False
    max_new_tokens: int = 32


def gateway_counters(url: str) -> dict[str, float]:
    """The gateway counters the summary needs, by series name with labels."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
    except OSError as e:
        raise Unavailable(f"cannot read the gateway's metrics at {url}: {e}") from None
    wanted = ("shelfsight_cache_lookups_total", "shelfsight_coalesced_requests_total", "grpc_server_handled_total",
              "shelfsight_tokens_total")
    out = {}
    for line in text.splitlines():
        if line.startswith(wanted):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def _delta(before: dict, after: dict, prefix: str, *must: str) -> float:
    return sum(v - before.get(k, 0.0) for k, v in after.items() if k.startswith(prefix) and all(m in k for m in must))


def cache_ratios(before: dict, after: dict) -> dict:
    lookups = _delta(before, after, "shelfsight_cache_lookups_total", 'level="exact"')
    exact = _delta(before, after, "shelfsight_cache_lookups_total", 'level="exact"', 'result="hit"')
    perceptual = _delta(before, after, "shelfsight_cache_lookups_total", 'level="perceptual"', 'result="hit"')
    coalesced = _delta(before, after, "shelfsight_coalesced_requests_total")
    answered = _delta(before, after, "grpc_server_handled_total", 'grpc_service="shelfsight.v1.ProductVision"')

    def ratio(x, n):
        return round(x / n, 4) if n else 0.0

    return {"requests_seen_by_gateway": int(answered), "cache_lookups": int(lookups), "exact_hits": int(exact),
            "perceptual_hits": int(perceptual), "coalesced": int(coalesced),
            "exact_hit_ratio": ratio(exact, lookups), "perceptual_hit_ratio": ratio(perceptual, lookups),
            "hit_ratio": ratio(exact + perceptual, lookups),
            "model_tokens": int(_delta(before, after, "shelfsight_tokens_total", 'kind="completion"', 'source="model"'))}


def _percentile(histogram: dict, q: float) -> float:
    """Locust keeps response times as a histogram {rounded ms: count}."""
    items = sorted((float(k), n) for k, n in histogram.items())
    total = sum(n for _, n in items)
    seen = 0
    for ms, n in items:
        seen += n
        if seen >= q * total:
            return ms
    return items[-1][0] if items else 0.0


def _summarize(entries: list[dict]) -> dict:
    histogram: dict = {}
    for e in entries:
        for k, n in e["response_times"].items():
            histogram[k] = histogram.get(k, 0) + n
    requests = sum(e["num_requests"] for e in entries)
    span = max((e["last_request_timestamp"] or 0) for e in entries) - min(e["start_time"] for e in entries)
    return {"requests": requests, "failures": sum(e["num_failures"] for e in entries),
            "rps": round(requests / span, 3) if span > 0 else 0.0,
            "p50_ms": _percentile(histogram, 0.50), "p95_ms": _percentile(histogram, 0.95),
            "p99_ms": _percentile(histogram, 0.99),
            "avg_tokens": round(sum(e["total_content_length"] for e in entries) / max(1, requests), 1)}


def read_stats(json_path: Path) -> dict:
    """Locust's final statistics (--json-file; its CSV is written on a timer and can miss the end).
    The aggregate covers the calls only, not the time-to-first-chunk events."""
    entries = json.loads(json_path.read_text())
    by_name = {f"{e['method']} {e['name']}": _summarize([e]) for e in entries}
    calls = [e for e in entries if e["method"] == "grpc"]
    return {"aggregate": _summarize(calls) if calls else None, "by_name": by_name}


def render_markdown(job: LoadJob, stats: dict, cache: dict, returncode: int) -> str:
    a = stats["aggregate"] or {}
    lines = [f"# Load test: {job.scenario}", "",
             f"{'step load' if job.step else f'{job.users} users (spawn {job.spawn_rate}/s)'}, {job.duration}s, "
             f"target {job.target}, greedy, {job.max_new_tokens} new tokens", "",
             "| requests | failures | req/s | p50 ms | p95 ms | p99 ms | tokens/answer |", "|---|---|---|---|---|---|---|",
             f"| {a.get('requests', 0)} | {a.get('failures', 0)} | {a.get('rps', 0)} | {a.get('p50_ms', 0)} | "
             f"{a.get('p95_ms', 0)} | {a.get('p99_ms', 0)} | {a.get('avg_tokens', 0)} |", "",
             "| call | requests | failures | req/s | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|---|---|---|"]
    for name, s in sorted(stats["by_name"].items()):
        lines.append(f"| {name} | {s['requests']} | {s['failures']} | {s['rps']} | {s['p50_ms']} | {s['p95_ms']} | "
                     f"{s['p99_ms']} |")
    lines += ["", "Cache, from the gateway's metrics over the run:", "",
              "| lookups | exact hits | perceptual hits | coalesced | exact ratio | perceptual ratio | hit ratio |",
              "|---|---|---|---|---|---|---|",
              f"| {cache['cache_lookups']} | {cache['exact_hits']} | {cache['perceptual_hits']} | {cache['coalesced']} | "
              f"{cache['exact_hit_ratio']:.1%} | {cache['perceptual_hit_ratio']:.1%} | {cache['hit_ratio']:.1%} |", "",
              f"Locust exit code {returncode}. Files: locust_final.json, locust_stats.csv, report.html."]
    return "\n".join(lines) + "\n"


def run(job: LoadJob) -> dict:
    if job.scenario not in SCENARIOS:
        raise InvalidArgument(f"unknown scenario {job.scenario!r}; choose one of {', '.join(SCENARIOS)}")
    for name in ("users", "duration"):
        if getattr(job, name) < 1:
            raise InvalidArgument(f"--{name} must be at least 1")
    if job.spawn_rate <= 0:
        raise InvalidArgument("--spawn-rate must be positive")
    metrics_url = job.metrics_url or f"http://{job.target.rsplit(':', 1)[0]}:{ports.GATEWAY_METRICS}/metrics"
    job.out.mkdir(parents=True, exist_ok=True)
    before = gateway_counters(metrics_url)
    files = str(HERE / "locustfile.py") + ("," + str(HERE / "shapes.py") if job.step else "")
    cmd = [sys.executable, "-m", "locust", "-f", files, "--headless", "--host", job.target,
           "-u", str(job.users), "-r", str(job.spawn_rate), "-t", f"{job.duration}s", "--stop-timeout", "30",
           "--csv", str(job.out / "locust"), "--html", str(job.out / "report.html"), "--only-summary",
           "--json-file", str(job.out / "locust_final"),
           "--loglevel", "WARNING", SCENARIOS[job.scenario]]
    env = dict(os.environ, SHELFSIGHT_MAX_NEW_TOKENS=str(job.max_new_tokens), SHELFSIGHT_STEP_DURATION=str(job.duration))
    with open(job.out / "locust.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            timeout=job.duration + 120).returncode
    stats_file = job.out / "locust_final.json"
    if not stats_file.exists():
        tail = (job.out / "locust.log").read_text(errors="replace")[-1500:]
        raise Unavailable(f"locust produced no statistics (exit code {rc}):\n{tail}")
    stats = read_stats(stats_file)
    cache = cache_ratios(before, gateway_counters(metrics_url))
    summary = {"scenario": job.scenario, "target": job.target, "users": job.users, "spawn_rate": job.spawn_rate,
               "duration_s": job.duration, "step": job.step, "max_new_tokens": job.max_new_tokens,
               "locust_exit_code": rc, **stats, "cache": cache}
    (job.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (job.out / "summary.md").write_text(render_markdown(job, stats, cache, rc))
    return summary
