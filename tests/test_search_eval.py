"""`shelfsight eval search`: a synthetic dataset's variants as a retrieval benchmark, through the real
stack (the session's gateway with its catalog). The figures of random tiny models mean nothing; the test
checks that they are computed from real searches and reported per category."""
from __future__ import annotations

import json

from shelfsight.client import ShelfsightClient
from shelfsight.evaluation import search
from shelfsight.evaluation.dataset import synthesize
from tests.conftest import shelfsight
from tests.test_gateway import target


def test_eval_search_reports_recall_and_mrr_per_category(gateway, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    synthesize(data, per_category=1, seed=5, scripts=("latin",))
    with ShelfsightClient(target(gateway)) as c:
        before = c.catalog_info().items
    out = tmp_path / "run"
    done = shelfsight("eval", "search", str(data), "--target", target(gateway), "--out", str(out), "--rerank", "3",
                      timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "search-report.json").read_text())
    assert report["indexed"] == 6 and report["queries"] == 18
    assert set(report["settings"]) == {"image", "text", "hybrid", "image+rerank3", "text+rerank3", "hybrid+rerank3"}
    for s in report["settings"].values():
        o = s["overall"]
        assert o["queries"] == 18 and 0 <= o["recall@1"] <= o["recall@5"] <= o["recall@10"] <= 1
        assert len(s["categories"]) == 6 and all(v["queries"] == 3 for v in s["categories"].values())
    # words that name the brand and label find the product by full text, even with random embeddings
    assert report["settings"]["text"]["overall"]["recall@10"] == 1.0
    assert "| hybrid+rerank3 |" in (out / "search-report.md").read_text()
    with ShelfsightClient(target(gateway)) as c:
        assert c.catalog_info().items == before  # evaluation items removed afterwards
    assert search.score([1, None, 3, None]) == {"recall@1": 0.25, "recall@5": 0.5, "recall@10": 0.5,
                                                                 "mrr": (1 + 1 / 3) / 4, "queries": 4}
