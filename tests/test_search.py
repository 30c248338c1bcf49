"""Catalog search end to end: a real tritonserver (tiny generator, embedding model and reranker), a real
PostgreSQL + pgvector, a real gateway on free ports, the real client and command line."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from shelfsight import errors
from shelfsight.client import CatalogItem, ShelfsightClient
from shelfsight.gateway.settings import SearchSettings
from tests.conftest import ROOT, running_gateway
from tests.test_gateway import metric, photo, target

TEXTS = ["Acme instant coffee 200 g jar", "Borealis green tea 20 bags", "Cirrus red kettle 1.7 l",
         "Dune blue ceramic mug 350 ml", "Ember dark chocolate 100 g", "Fjord sparkling water 6 x 1.5 l"]
BRANDS = ["Acme", "Borealis", "Cirrus", "Dune", "Ember", "Fjord"]


def items(n: int = 6, seed: int = 300):
    return [CatalogItem(f"sku-{i}", photo(seed + i), TEXTS[i], {"brand": BRANDS[i], "price": 2.5 + i,
                                                              "in_stock": i % 2 == 0, "shelf": i})
            for i in range(n)]


@pytest.fixture(scope="module")
def gw(triton, postgres):
    with running_gateway(triton.grpc_url, search=SearchSettings(catalog_url=postgres.url, catalog_name="search_e2e")) as g:
        yield g


def test_index_search_delete(gw):
    with ShelfsightClient(target(gw)) as c:
        results = list(c.index(items()))
        assert [r.status for r in results] == ["indexed"] * 6 and [r.id for r in results] == [f"sku-{i}" for i in range(6)]
        assert [r.status for r in c.index(items())] == ["unchanged"] * 6  # same content: not embedded again
        info = c.catalog_info()
        assert info.items == 6 and info.dimensions == 128 and info.model_id.startswith("tiny-embedding")
        by_photo = c.search(photo(302), top_k=3, cache="skip")
        assert by_photo.hits[0].id == "sku-2"  # its own photo is its nearest item
        assert by_photo.hits[0].vector_score > by_photo.hits[1].vector_score
        assert by_photo.hits[0].metadata == {
            "brand": "Cirrus", "price": 4.5, "in_stock": True, "shelf": 2}
        by_words = c.search(text="kettle", top_k=3, cache="skip")
        assert by_words.hits[0].id == "sku-2" and by_words.hits[0].text_score is not None
        filtered = c.search(photo(302), top_k=6, filters={"in_stock": False}, cache="skip")
        assert filtered.hits and all(not h.metadata["in_stock"] for h in filtered.hits)
        assert c.delete(["sku-5", "nope"]) == 1
        assert c.catalog_info().items == 5
        assert "sku-5" not in [h.id for h in c.search(photo(305), top_k=6, cache="skip").hits]


def test_reindexing_an_id_replaces_it(gw):
    with ShelfsightClient(target(gw)) as c:
        list(c.index([CatalogItem("swap", photo(320), "old title", {"v": 1})]))
        (r,) = c.index([CatalogItem("swap", photo(321), "new title", {"v": 2})])
        assert r.status == "indexed"
        hit = c.search(photo(321), top_k=1, cache="skip").hits[0]
        assert (hit.id, hit.text, hit.metadata) == ("swap", "new title", {"v": 2})


def test_a_bad_item_fails_alone_and_names_the_field(gw):
    good = items(2, seed=330)
    bad = [CatalogItem("bad-photo", b"not a picture", "x"), CatalogItem("", photo(1), "no id"),
           CatalogItem("empty"), CatalogItem("ctl", text="<|im_start|>system")]
    with ShelfsightClient(target(gw)) as c:
        results = list(c.index([good[0], *bad, good[1]]))
    assert [r.status for r in results] == ["indexed", "failed", "failed", "failed", "failed", "indexed"]
    assert results[1].code == "INVALID_ARGUMENT" and "image is not a supported format" in results[1].error
    assert "id must be 1-256 characters" in results[2].error
    assert "needs a photo (image) or text" in results[3].error
    assert "control token" in results[4].error


def test_search_cache_and_its_invalidation(gw):
    with ShelfsightClient(target(gw)) as c:
        list(c.index(items(3, seed=340)))
        first = c.search(photo(341), top_k=2)
        again = c.search(photo(341), top_k=2)
        assert (first.cache_status, again.cache_status) == ("miss", "exact")
        assert [h.id for h in again.hits] == [h.id for h in first.hits]
        list(c.index([CatalogItem("new-one", photo(399), "fresh")]))  # any write invalidates cached results
        assert c.search(photo(341), top_k=2).cache_status == "miss"


def test_rerank_orders_by_the_rerankers_score(gw):
    with ShelfsightClient(target(gw)) as c:
        list(c.index(items(6, seed=360)))
        r = c.search(photo(361), "coffee", top_k=4, rerank=5, cache="skip", thumbnails=True)
    scores = [h.rerank_score for h in r.hits]
    assert all(s is not None and 0 < s < 1 for s in scores) and scores == sorted(scores, reverse=True)
    assert all(h.thumbnail[:3] == b"\xff\xd8\xff" for h in r.hits)  # JPEG thumbnails, when asked


def test_bad_queries_are_invalid_argument(gw):
    with ShelfsightClient(target(gw)) as c:
        for kw, message in [(dict(), "needs a photo (image), text, or both"),
                            (dict(text="x", top_k=1000), "top_k must be between 1 and 100"),
                            (dict(text="x", rerank=500), "rerank must be between 0 (off) and 50"),
                            (dict(image=b"junk"), "not a supported format")]:
            with pytest.raises(errors.InvalidArgument, match=re.escape(message)):
                c.search(**kw)


def test_metrics_and_health(gw):
    with ShelfsightClient(target(gw)) as c:
        list(c.index(items(1, seed=380)))
        c.search(photo(380), cache="skip")
        assert c.health("shelfsight.v1.Catalog") == "SERVING"
    assert metric(gw, "shelfsight_index_items_total", result="indexed") >= 1
    assert metric(gw, "shelfsight_search_stage_seconds_count", stage="embed") >= 2
    assert metric(gw, "shelfsight_catalog_up") == 1
    assert metric(gw, "grpc_server_handled_total", grpc_method="Search", grpc_code="OK") >= 1


def test_index_and_search_commands(gw, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        (folder / f"cmd-{i}.jpg").write_bytes(photo(400 + i))
    (folder / "notes.txt").write_text("not a photo")
    base = [sys.executable, "-m", "shelfsight"]
    out = subprocess.run(base + ["index", str(folder), "--target", target(gw)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.splitlines()[-1])
    assert summary["indexed"] == 3 and summary["failed"] == 0 and summary["unsupported"] == 1
    again = json.loads(subprocess.run(base + ["index", str(folder), "--target", target(gw)], capture_output=True,
                                      text=True, timeout=300, cwd=ROOT).stdout.splitlines()[-1])
    assert again["skipped"] == 3 and again["indexed"] == 0  # resumed: already acknowledged, not sent again
    found = subprocess.run(base + ["search", str(folder / "cmd-1.jpg"), "--target", target(gw), "--top-k", "2",
                                   "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert found.returncode == 0, found.stderr
    rows = [json.loads(line) for line in found.stdout.splitlines()]
    assert rows[0]["id"] == "cmd-1" and len(rows) == 2 and set(rows[0]) >= {"id", "score", "metadata"}
