"""Who may call, against the real stack (tritonserver + gateway on the tiny model): real TLS with
certificates made here (trustme), mutual TLS, certificate reload, API keys (none, wrong, revoked with the
file reloaded, right, lacking a right) on both faces, per-client limits, the cache's scope, Triton's
restricted APIs, and Redis with a password over TLS."""
from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import trustme

from shelfsight import errors
from shelfsight.client import ShelfsightClient
from shelfsight.client.client import Connection
from shelfsight.client.catalog import CatalogItem
from shelfsight.gateway.settings import CacheSettings
from shelfsight.serving.tritonserver import ADMIN_HEADER, free_port
from tests.conftest import ROOT, running_gateway, shelfsight
from tests.test_gateway import GREEDY, metric, photo, target

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, the gateway's certificate (127.0.0.1, localhost), a client certificate, and a stranger CA."""
    folder = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("shop-web@example")
    files = {"ca": folder / "ca.pem", "other": folder / "other.pem", "cert": folder / "server.pem",
             "key": folder / "server.key", "client_cert": folder / "client.pem", "client_key": folder / "client.key"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    other.cert_pem.write_to_path(str(files["other"]))
    server.cert_chain_pems[0].write_to_path(str(files["cert"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    client.cert_chain_pems[0].write_to_path(str(files["client_cert"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    files["ca_obj"] = ca
    return files


def ask(conn, **kw) -> str:
    with ShelfsightClient(conn, timeout=30) as c:
        return c.recognize(photo(800), "What brand is this product?", **(GREEDY | kw)).text


def test_tls_on_both_faces(triton, pki):
    with running_gateway(triton.grpc_url, tls_cert=pki["cert"], tls_key=pki["key"], http_port=0) as gw:
        addr = target(gw)
        assert ask(Connection(addr, tls_ca=pki["ca"]))
        with pytest.raises(errors.Unavailable):  # plaintext to a TLS port: no handshake, no answer
            ask(Connection(addr))
        with pytest.raises(errors.Unavailable):  # a CA that did not sign the gateway's certificate
            ask(Connection(addr, tls_ca=pki["other"]))
        base = f"https://127.0.0.1:{gw.http_port}"
        assert httpx.get(f"{base}/health", verify=str(pki["ca"])).status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/health", verify=str(pki["other"]))
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{gw.http_port}/health", timeout=5)
        # the command line
        out = shelfsight("ask", str(_photo_file()), "q", "--target", addr, "--tls-ca", str(pki["ca"]), "--json",
                         "--max-new-tokens", "2")
        assert out.returncode == 0, out.stderr


def _photo_file() -> Path:
    path = ROOT / "build" / "test-security-photo.jpg"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(photo(801))
    return path


def test_mutual_tls_and_certificate_reload(triton, pki, tmp_path):
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    shutil.copy(pki["cert"], cert)
    shutil.copy(pki["key"], key)
    with running_gateway(triton.grpc_url, tls_cert=cert, tls_key=key, tls_client_ca=pki["ca"], http_port=0) as gw:
        addr = target(gw)
        with pytest.raises(errors.Unavailable):  # no client certificate: refused in the handshake
            ask(Connection(addr, tls_ca=pki["ca"]))
        assert ask(Connection(addr, tls_ca=pki["ca"], tls_cert=pki["client_cert"], tls_key=pki["client_key"]))
        stranger = trustme.CA().issue_cert("intruder")
        stranger.cert_chain_pems[0].write_to_path(str(tmp_path / "s.pem"))
        stranger.private_key_pem.write_to_path(str(tmp_path / "s.key"))
        with pytest.raises(errors.Unavailable):  # a certificate from another CA
            ask(Connection(addr, tls_ca=pki["ca"], tls_cert=tmp_path / "s.pem", tls_key=tmp_path / "s.key"))
        # renewal: a certificate from a new CA is written over the files; new connections use it
        renewed = trustme.CA()
        fresh = renewed.issue_cert("127.0.0.1", "localhost")
        fresh.cert_chain_pems[0].write_to_path(str(cert))
        fresh.private_key_pem.write_to_path(str(key))
        renewed.cert_pem.write_to_path(str(tmp_path / "renewed-ca.pem"))
        client = dict(tls_cert=pki["client_cert"], tls_key=pki["client_key"])
        assert ask(Connection(addr, tls_ca=tmp_path / "renewed-ca.pem", **client))
        deadline = time.monotonic() + 10  # the HTTP face looks at the files every 2 s
        while True:
            try:
                ctx = ssl.create_default_context(cafile=str(tmp_path / "renewed-ca.pem"))
                ctx.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
                r = httpx.get(f"https://127.0.0.1:{gw.http_port}/health", verify=ctx)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "the HTTP face never took the renewed certificate"
                time.sleep(0.5)
        assert r.status_code == 200


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys.json"

    def add(name: str, *flags: str) -> str:
        out = shelfsight("keys", "add", name, "--file", str(path), *flags)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()
    return path, add


def test_api_keys_on_both_faces(triton, keys_file):
    path, add = keys_file
    web, indexer = add("shop-web"), add("indexer", "--rights", "index")
    assert web not in path.read_text() and json.loads(path.read_text())["clients"][0]["name"] == "shop-web"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    with running_gateway(triton.grpc_url, api_keys=path, http_port=0) as gw:
        addr = target(gw)
        with pytest.raises(errors.Unauthenticated, match="needs an API key"):
            ask(Connection(addr))
        with pytest.raises(errors.Unauthenticated, match="not valid"):
            ask(Connection(addr, api_key="ss-wrong"))
        assert ask(Connection(addr, api_key=web))
        with pytest.raises(errors.PermissionDenied, match="may not answer"):
            ask(Connection(addr, api_key=indexer))
        with ShelfsightClient(Connection(addr, api_key=web)) as c:
            with pytest.raises(errors.PermissionDenied, match="may not index"):
                list(c.index([CatalogItem("x", text="y")]))
        assert ShelfsightClient(addr).health() == "SERVING"  # health stays open
        # the HTTP face takes the key the openai client sends
        base = f"http://127.0.0.1:{gw.http_port}/v1"
        with openai.OpenAI(base_url=base, api_key=web, max_retries=0) as good, \
                openai.OpenAI(base_url=base, api_key="ss-wrong", max_retries=0) as bad:
            model = good.models.list().data[0].id
            good.chat.completions.create(model=model, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
        assert metric(gw, "shelfsight_requests_total", client="shop-web", status="OK") >= 1  # named, never the key
        # revoked: the file is read again when it changes, no restart
        out = shelfsight("keys", "revoke", "shop-web", "--file", str(path))
        assert out.returncode == 0, out.stderr
        deadline = time.monotonic() + 5
        while True:
            try:
                ask(Connection(addr, api_key=web), cache="skip")
            except errors.Unauthenticated:
                break
            assert time.monotonic() < deadline, "the revoked key still works"
            time.sleep(0.2)


def test_a_client_over_its_rate_is_refused_while_another_is_answered(triton, keys_file):
    path, add = keys_file
    slow, other = add("slow", "--rps", "2", "--burst", "2"), add("other")
    with running_gateway(triton.grpc_url, api_keys=path) as gw:
        addr = target(gw)
        ask(Connection(addr, api_key=other))  # the answer is cached: each call is cheap from here on
        refused, answered, pushback = 0, 0, []
        with ShelfsightClient(Connection(addr, api_key=slow)) as s, ShelfsightClient(Connection(addr, api_key=other)) as o:
            for _ in range(10):
                try:
                    s.recognize(photo(800), "What brand is this product?", **GREEDY)
                except errors.ResourceExhausted:
                    refused += 1
                o.recognize(photo(800), "What brand is this product?", **GREEDY)
                answered += 1
            call = s._stub.Recognize.with_call
            try:
                for _ in range(5):
                    call(pb_request(), metadata=s._metadata, timeout=10)
            except grpc.RpcError as e:
                pushback = [v for k, v in e.trailing_metadata() if k == "grpc-retry-pushback-ms"]
    assert refused >= 6 and answered == 10  # `other` had its every answer while `slow` was held back
    assert pushback and 1 <= int(pushback[0]) <= 1000


def pb_request():
    from shelfsight.client.client import build_request

    return build_request(photo(800), "What brand is this product?", **GREEDY)


@pytest.mark.parametrize("scope, second", [("client", "miss"), ("shared", "exact")])
def test_cache_scope(triton, keys_file, scope, second):
    path, add = keys_file
    a, b = add("a"), add("b")
    with running_gateway(triton.grpc_url, api_keys=path, cache_scope=scope) as gw:
        with ShelfsightClient(Connection(target(gw), api_key=a)) as ca, \
                ShelfsightClient(Connection(target(gw), api_key=b)) as cb:
            first = ca.recognize(photo(810), "What colour is it?", **GREEDY)
            again = ca.recognize(photo(810), "What colour is it?", **GREEDY)
            other = cb.recognize(photo(810), "What colour is it?", **GREEDY)
    assert (first.cache_status, again.cache_status, other.cache_status) == ("miss", "exact", second)


def test_client_scope_needs_keys(triton):
    with pytest.raises(errors.InvalidArgument, match="--cache-scope client .* needs --api-keys"):
        with running_gateway(triton.grpc_url, cache_scope="client"):
            pass


def test_tritons_restricted_apis_refuse_and_the_gateway_still_works(triton, gateway):
    def call(path, data=None, headers=None):
        req = urllib.request.Request(triton.http_url + path, data=data,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
    assert call("/v2/logging", b'{"log_verbose_level": 1}') == 403
    assert call("/v2/repository/index", b"{}") == 403
    assert call("/v2/models/pipeline/infer", b"{}") == 403  # no way around the gateway's checks over HTTP
    assert call("/v2/logging", b'{"log_verbose_level": 0}', {ADMIN_HEADER: triton.admin_key}) == 200
    assert call("/v2/health/ready") == 200
    assert ask(target(gateway))


@pytest.fixture
def redis_tls(pki, tmp_path):
    server = shutil.which("redis-server")
    assert server, "redis-server is missing: scripts/system-deps installs it"
    port, password = free_port(), "s3cret-for-this-test"
    proc = subprocess.Popen([server, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(pki["cert"]), "--tls-key-file", str(pki["key"]),
                             "--tls-ca-cert-file", str(pki["ca"]), "--tls-auth-clients", "no",
                             "--requirepass", password, "--save", "", "--appendonly", "no"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 10
    while "Ready to accept connections" not in (line := proc.stdout.readline()):
        assert proc.poll() is None and time.monotonic() < deadline, f"redis did not start: {line}"
    yield f"rediss://:{password}@127.0.0.1:{port}/0?ssl_ca_certs={pki['ca']}", password, port
    proc.terminate()
    proc.wait(10)


def test_redis_with_a_password_over_tls(triton, redis_tls):
    url, password, port = redis_tls
    wrong = url.replace(password, "wrong")
    with running_gateway(triton.grpc_url, cache=CacheSettings(redis_url=url)) as one, \
            running_gateway(triton.grpc_url, cache=CacheSettings(redis_url=url)) as two:
        first = ShelfsightClient(target(one)).recognize(photo(820), "Read the label.", **GREEDY)
        shared = ShelfsightClient(target(two)).recognize(photo(820), "Read the label.", **GREEDY)
        assert (first.cache_status, shared.cache_status) == ("miss", "exact")  # through Redis, over TLS
        assert metric(one, "shelfsight_cache_up") == 1
    with running_gateway(triton.grpc_url, cache=CacheSettings(redis_url=wrong, redis_retry=0.2)) as gw:
        answer = ShelfsightClient(target(gw)).recognize(photo(821), "Read the label.", **GREEDY)
        assert answer.cache_status == "miss"  # a wrong password: the cache is down, the answer is not
