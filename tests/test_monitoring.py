"""Monitoring, checked against the live stack: every metric the dashboard and the alert rules name is
exposed by the gateway or Triton (found by parsing the PromQL), a real Prometheus scrapes both and
answers the dashboard's queries with data, and the alert rules load."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from shelfsight.client import ShelfsightClient
from shelfsight.errors import InvalidArgument
from shelfsight.serving.tritonserver import free_port
from tests import imagefiles
from tests.conftest import ROOT, scrape

MONITORING = ROOT / "monitoring"
# Series Prometheus makes itself for every target; no exporter exposes them.
PROMETHEUS_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def alert_queries() -> list[tuple[str, str]]:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [(r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


def metric_names(expr: str) -> set[str]:
    """Every series name an expression selects, from its parsed syntax tree."""
    import promql_parser

    names: set[str] = set()

    def walk(node):
        kind = type(node).__name__
        if kind == "VectorSelector":
            if node.name:
                names.add(node.name)
            return
        for attr in ("lhs", "rhs", "expr", "args", "vector_selector", "param"):
            child = getattr(node, attr, None)
            for c in child if isinstance(child, list) else [child]:
                if c is not None and type(c).__module__.startswith("promql_parser"):
                    walk(c)

    walk(promql_parser.parse(expr))
    return names


def make_traffic(gateway) -> None:
    """Enough calls that every series exists: misses, hits, a stream, an error."""
    photo = imagefiles.encode(imagefiles.photo(320, 320, seed=777), "JPEG")
    with ShelfsightClient(f"127.0.0.1:{gateway.port}") as c:
        for _ in range(2):
            c.recognize(photo, "What brand?", temperature=0.0, max_new_tokens=6)
        list(c.stream(photo, "Read the label.", temperature=0.0, max_new_tokens=6))
        with pytest.raises(InvalidArgument):
            c.recognize(b"", "q")


def test_queries_parse_and_name_only_exposed_metrics(gateway, triton):
    make_traffic(gateway)
    exposed = {k.split("{", 1)[0] for k in scrape(f"http://127.0.0.1:{gateway.metrics_port}/metrics")}
    exposed |= {k.split("{", 1)[0] for k in scrape(triton.metrics_url)}
    queries = dashboard_queries() + alert_queries()
    assert len(queries) >= 20
    used = set()
    for title, expr in queries:
        names = metric_names(expr)
        assert names, f"{title}: selects no metric"
        missing = names - exposed - PROMETHEUS_SYNTHETIC
        assert not missing, f"{title}: {sorted(missing)} are not exposed by the gateway or Triton"
        used |= names
    # the dashboard covers both halves of the stack
    assert any(n.startswith("grpc_server_") for n in used) and any(n.startswith("nv_inference_") for n in used)
    assert any(n.startswith("shelfsight_engine_") for n in used)


def test_alert_rules_are_valid():
    r = subprocess.run(["promtool", "check", "rules", str(MONITORING / "alerts.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 6 rules found" in r.stdout


def query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture
def prometheus(gateway, triton, tmp_path):
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: `make env` installs it (scripts/system-deps)"
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(MONITORING / "alerts.yml")]
    targets = {"shelfsight-gateway": f"127.0.0.1:{gateway.metrics_port}",
               "triton": triton.metrics_url.split("//")[1].split("/")[0]}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{base}/api/v1/targets", timeout=2) as r:
                    active = json.loads(r.read())["data"]["activeTargets"]
                if len(active) == 2 and all(t["health"] == "up" for t in active):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("prometheus never scraped both targets")
        yield base
    finally:
        proc.terminate()
        proc.wait(20)


def test_real_prometheus_answers_the_dashboard(prometheus, gateway):
    make_traffic(gateway)
    time.sleep(4)  # a few scrapes after the traffic, so rate() has two points
    make_traffic(gateway)
    time.sleep(4)
    empty = []
    for title, expr in dashboard_queries():
        answer = query(prometheus, expr)
        assert answer["status"] == "success", (title, answer)
        if not answer["data"]["result"]:
            empty.append(title)
    # traffic just flowed through both halves: these panels must show data
    for must in ("Requests/s by method and status", "Recognize latency p50 / p95 / p99", "Cache hit ratio by level",
                 "Output tokens/s", "Average batch size (inferences / executions)",
                 "Triton requests/s: success and failure", "Engine: running and waiting requests"):
        assert must not in empty, f"{must} returned no data"
    up = query(prometheus, 'up{job="shelfsight-gateway"}')["data"]["result"]
    assert up and up[0]["value"][1] == "1"
    with urllib.request.urlopen(f"{prometheus}/api/v1/rules", timeout=10) as r:
        rules = [rule["name"] for g in json.loads(r.read())["data"]["groups"] for rule in g["rules"]]
    assert sorted(rules) == sorted(name for name, _ in alert_queries())
