"""`shelfsight eval search DATASET`: the dataset's four variants as a retrieval benchmark.

The normal-light photo of each product is indexed (id: the product, text: its brand, label and
spec, metadata: its category); the occluded, tilted and blurred photos are the queries. Each query runs
by photo, by words (the product's brand and label, as a person would type them), and by both (hybrid),
each without and with reranking; a hit is the product itself. Reported per category and overall:
recall@1, @5, @10 and MRR (over the first 10). Evaluation items carry the metadata `eval` = the run's
name and every query filters on it, so other items of the catalog never count; they are deleted at the
end unless kept. On random tiny checkpoints the figures mean nothing, but they come from the real path.
"""
from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from pathlib import Path

from shelfsight.client.catalog import CatalogItem
from shelfsight.client.client import AsyncShelfsightClient
from shelfsight.errors import InvalidArgument
from shelfsight.evaluation import dataset
from shelfsight.evaluation.run import CATEGORY_NAMES

MODES = ("image", "text", "hybrid")
KS = (1, 5, 10)


def query_text(item: dataset.Item) -> str:
    return f"{item.attributes.get('brand', '')} {item.extra.get('label', '')}".strip()


def catalog_items(items: list[dataset.Item], folder: Path, run: str) -> list[CatalogItem]:
    return [CatalogItem(f"{run}:{i.extra['product_id']}", (folder / i.file).read_bytes(), i.ocr_text,
                        {"category": i.category, "eval": run})
            for i in items if i.variant == "normal"]


def score(ranks: list[int | None]) -> dict:
    """ranks: each query's 1-based rank of the right product among the first 10 (None: not there)."""
    n = len(ranks)
    out = {f"recall@{k}": sum(1 for r in ranks if r is not None and r <= k) / n for k in KS}
    out["mrr"] = sum(1 / r for r in ranks if r is not None) / n
    out["queries"] = n
    return out


async def run(data_dir: Path, target: str, out: Path, rerank: int = 10, modes=MODES, concurrency: int = 4,
              keep: bool = False, timeout: float | None = None) -> dict:
    data_dir, out = Path(data_dir), Path(out)
    items = dataset.load(data_dir)
    if any("product_id" not in i.extra for i in items):
        raise InvalidArgument(f"{data_dir}: every line needs a product_id (`shelfsight dataset synth` writes one)")
    for m in modes:
        if m not in MODES:
            raise InvalidArgument(f"mode {m!r} is not one of {', '.join(MODES)}")
    run_name = f"eval-{data_dir.resolve().name}"
    out.mkdir(parents=True, exist_ok=True)
    queries = [i for i in items if i.variant != "normal"]
    settings = [(m, 0) for m in modes] + ([(m, rerank) for m in modes] if rerank else [])
    results: dict[tuple[str, int], list[tuple[dataset.Item, int | None]]] = defaultdict(list)
    async with AsyncShelfsightClient(target, timeout=timeout) as client:
        indexed = [r async for r in client.index(catalog_items(items, data_dir, run_name))]
        failed = [r for r in indexed if r.status == "failed"]
        if failed:
            raise InvalidArgument(f"{len(failed)} items could not be indexed, e.g. {failed[0].id}: {failed[0].error}")
        sem = asyncio.Semaphore(concurrency)

        async def one(item: dataset.Item, mode: str, n: int):
            image = (data_dir / item.file).read_bytes() if mode != "text" else None
            text = query_text(item) if mode != "image" else ""
            async with sem:
                r = await client.search(image, text, top_k=10, rerank=n, cache="skip", filters={"eval": run_name})
            ids = [h.id for h in r.hits]
            want = f"{run_name}:{item.extra['product_id']}"
            results[(mode, n)].append((item, ids.index(want) + 1 if want in ids else None))

        await asyncio.gather(*(one(i, m, n) for m, n in settings for i in queries))
        if not keep:
            await client.delete([c.id for c in catalog_items(items, data_dir, run_name)])
    report = {"dataset": str(data_dir), "indexed": len(indexed), "queries": len(queries), "settings": {}}
    for (mode, n), rows in results.items():
        name = f"{mode}{f'+rerank{n}' if n else ''}"
        by_cat = defaultdict(list)
        for item, rank in rows:
            by_cat[item.category].append(rank)
        report["settings"][name] = {"overall": score([r for _, r in rows]),
                                    "categories": {c: score(r) for c, r in sorted(by_cat.items())}}
    (out / "search-report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "search-report.md").write_text(render(report))
    return report


def render(report: dict) -> str:
    lines = [f"# Search evaluation: {report['dataset']}", "",
             f"{report['indexed']} products indexed (their normal photo); {report['queries']} queries (occluded, "
             "tilted, blurred photos); recall@k and MRR over the first 10 hits.", "",
             "| setting | recall@1 | recall@5 | recall@10 | MRR |", "|---|---|---|---|---|"]
    for name, s in report["settings"].items():
        o = s["overall"]
        lines.append(f"| {name} | {o['recall@1']:.3f} | {o['recall@5']:.3f} | {o['recall@10']:.3f} | {o['mrr']:.3f} |")
    for name, s in report["settings"].items():
        lines += ["", f"## {name}, per category", "", "| category | queries | recall@1 | recall@5 | recall@10 | MRR |",
                  "|---|---|---|---|---|---|"]
        for c, v in s["categories"].items():
            lines.append(f"| {CATEGORY_NAMES.get(c, c)} | {v['queries']} | {v['recall@1']:.3f} | {v['recall@5']:.3f} | "
                         f"{v['recall@10']:.3f} | {v['mrr']:.3f} |")
    return "\n".join(lines) + "\n"
