"""The README's OpenAI examples, run as written (only their environment variables point them at the
session's gateway): the Python one with the official client, the curl one through bash."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.test_gateway import photo


def block(language: str, containing: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"README.md has {len(found)} {language} blocks containing {containing!r}, not one"
    return found[0]


def test_the_python_example(gateway, tmp_path):
    image = tmp_path / "product.jpg"
    image.write_bytes(photo(730))
    env = os.environ | {"SHELFSIGHT_URL": f"http://127.0.0.1:{gateway.http_port}/v1", "PHOTO": str(image)}
    out = subprocess.run([sys.executable, "-c", block("python", "from openai import OpenAI")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "CompletionUsage(" in out.stdout and "completion_tokens=" in out.stdout


def test_the_curl_example(gateway):
    if not shutil.which("curl"):
        pytest.fail("curl is missing: scripts/system-deps installs it")
    env = os.environ | {"SHELFSIGHT_URL": f"http://127.0.0.1:{gateway.http_port}/v1",
                        "MODEL": gateway.upstream.model().model_id}
    out = subprocess.run(["bash", "-c", block("sh", "curl -sN")], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    events = [e for e in out.stdout.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_the_security_example(triton, tmp_path):
    """The README's keys, serve and ask lines: the key is made by its command, the gateway runs with the
    settings its serve line parses to (the tiny model instead of its checkpoint), the ask line as written."""
    import shlex

    import trustme

    from shelfsight.app.cli import build_parser
    from shelfsight.gateway.cli import settings_from
    from tests.conftest import running_gateway

    lines = [" ".join(part.strip() for part in cmd.split("\\\n")) for cmd in
             re.split(r"\n(?=#|\S+=|shelfsight)", block("sh", "shelfsight keys add"))]
    keys_line, serve_line, ask_line = [line for line in lines if line.startswith(("shelfsight", "SHELFSIGHT"))]
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "gateway.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "gateway.key"))
    (tmp_path / "photo.jpg").write_bytes(photo(740))
    env = os.environ | {"PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-c", keys_line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and (tmp_path / "shop-web.key").read_text().startswith("ss-"), out.stderr
    args = build_parser().parse_args(shlex.split(serve_line)[1:])
    settings = settings_from(args, triton.grpc_url)
    with running_gateway(triton.grpc_url, port=0, host="127.0.0.1", http_port=0,
                         **{f: getattr(settings, f) if not str(getattr(settings, f)).endswith((".pem", ".key", ".json"))
                            else tmp_path / str(getattr(settings, f)) for f in
                            ("tls_cert", "tls_key", "api_keys", "cache_scope")}) as gw:
        run = ask_line.replace("gateway.example:50051", f"127.0.0.1:{gw.port}")
        out = subprocess.run(["bash", "-c", run], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "[miss" in out.stderr and "tokens" in out.stderr
