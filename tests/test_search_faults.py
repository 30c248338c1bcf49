"""Catalog search when parts die: acknowledged items survive kill -9 of the gateway and of postgres; two
gateways share one catalog; a catalog that is down makes Search and Index UNAVAILABLE (and health says
so) while questions are still answered, and search comes back with it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from shelfsight import errors
from shelfsight.catalog.postgres import EmbeddedPostgres, PostgresSettings
from shelfsight.client import CatalogItem, ShelfsightClient
from shelfsight.gateway.settings import SearchSettings
from shelfsight.serving.tritonserver import free_port
from tests.conftest import ROOT, running_gateway, server_folder
from tests.test_gateway import GREEDY, photo, target

pytestmark = pytest.mark.slow


def wait_for(predicate, limit: float, what: str):
    deadline = time.monotonic() + limit
    while True:
        try:
            value = predicate()
            if value:
                return value
        except errors.ShelfsightError:
            pass
        assert time.monotonic() < deadline, f"{what} within {limit}s"
        time.sleep(0.2)


@pytest.fixture
def own_postgres():
    """A catalog server of this test's own: these tests kill and stop it."""
    with server_folder("shelfsight-test-faults-") as folder:
        server = EmbeddedPostgres(PostgresSettings(folder / "data")).start()
        try:
            yield server
        finally:
            server.stop()


def test_acknowledged_items_survive_kill_9_of_the_gateway(triton, postgres):
    port = free_port()
    command = [sys.executable, "-m", "shelfsight", "gateway", "--triton", triton.grpc_url, "--port", str(port),
               "--metrics-port", "0", "--catalog", postgres.url, "--catalog-name", "faults_gw"]
    gateway = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert "gateway ready" in gateway.stdout.readline()
        with ShelfsightClient(f"127.0.0.1:{port}") as c:
            wait_for(lambda: c.health("shelfsight.v1.Catalog") == "SERVING", 60, "catalog search serving")
            acked = [r.id for r in c.index([CatalogItem(f"k9-{i}", photo(500 + i), f"item {i}") for i in range(4)])
                     if r.status == "indexed"]
        assert len(acked) == 4
        gateway.send_signal(signal.SIGKILL)
        gateway.wait(10)
    finally:
        gateway.kill()
    with running_gateway(triton.grpc_url, search=SearchSettings(catalog_url=postgres.url, catalog_name="faults_gw")) as gw:
        with ShelfsightClient(target(gw)) as c:
            assert c.catalog_info().items == 4
            assert c.search(photo(502), top_k=1, cache="skip").hits[0].id == "k9-2"


def test_acknowledged_items_survive_kill_9_of_postgres_and_search_comes_back(triton, own_postgres):
    with running_gateway(triton.grpc_url, search=SearchSettings(catalog_url=own_postgres.url, catalog_name="faults_pg",
                                                                health_interval=0.2)) as gw:
        with ShelfsightClient(target(gw)) as c:
            acked = [r for r in c.index([CatalogItem(f"pg-{i}", photo(520 + i), f"item {i}") for i in range(3)])]
            assert [r.status for r in acked] == ["indexed"] * 3
            os.kill(own_postgres.proc.pid, signal.SIGKILL)  # right after the acknowledgements
            own_postgres.proc.wait(10)
            t0 = time.monotonic()
            with pytest.raises(errors.Unavailable, match="the catalog at .* is not reachable"):
                c.search(photo(521), top_k=1, cache="skip")
            assert time.monotonic() - t0 < 15  # bounded, not hung
            with pytest.raises(errors.Unavailable):
                list(c.index([CatalogItem("pg-late", photo(529), "late")]))
            wait_for(lambda: c.health("shelfsight.v1.Catalog") == "NOT_SERVING", 10, "health NOT_SERVING")
            answer = c.recognize(photo(1), "What brand is this product?", cache="skip", **GREEDY)
            assert answer.completion_tokens == GREEDY["max_new_tokens"]  # questions are still answered
            own_postgres.stop(failed=True)
            own_postgres.start()  # crash recovery on the same data folder and port
            wait_for(lambda: c.health("shelfsight.v1.Catalog") == "SERVING", 30, "health SERVING again")
            assert c.catalog_info().items == 3
            assert c.search(photo(521), top_k=1, cache="skip").hits[0].id == "pg-1"


def test_two_gateways_share_one_catalog(triton, postgres):
    search = SearchSettings(catalog_url=postgres.url, catalog_name="faults_two")
    with running_gateway(triton.grpc_url, search=search) as a, running_gateway(triton.grpc_url, search=search) as b:
        with ShelfsightClient(target(a)) as ca, ShelfsightClient(target(b)) as cb:
            list(ca.index([CatalogItem(f"two-{i}", photo(540 + i), f"item {i}") for i in range(3)]))
            first = ca.search(photo(541), top_k=2)
            assert ca.search(photo(541), top_k=2).cache_status == "exact"
            assert cb.search(photo(541), top_k=2, cache="skip").hits[0].id == "two-1"  # b reads a's writes
            assert cb.delete(["two-1"]) == 1  # a write through b ...
            after = ca.search(photo(541), top_k=2)  # ... is not hidden by a's cache
            assert after.cache_status == "miss" and "two-1" not in [h.id for h in after.hits]
            assert first.hits[0].id == "two-1"
