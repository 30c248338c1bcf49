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
    (found,) = [b for b in blocks if containing in b]
    return found


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
