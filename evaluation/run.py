"""`shelfsight eval`: score a served model on a dataset the way the reference study did.

One structured question per image, with the study's settings for structured recognition (the
serving defaults, shelfsight/params.py) sent explicitly, and a fixed seed, so that a run can be
repeated and resumed whatever defaults the served repository has. By default the answer is constrained
to the built-in product schema (shelfsight/formats.py): every finished answer is JSON with the study's
fields. `--free-text` asks the study's own way instead (JSON described in the question, parsed
tolerantly), for models or runs that should be compared with it; the report says how many answers
parsed either way. Answers are asked through the gateway with the same durable, resumable asking
as `batch` (answers.jsonl); then every answer is parsed (evaluation/answers.py) and scored
(evaluation/scoring.py) into report.json (every answer) and report.md (the study's tables).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from shelfsight import formats
from shelfsight.client.batch import ask_all
from shelfsight.errors import InvalidArgument, NotFound
from shelfsight.evaluation import answers, dataset, scoring
from shelfsight.params import GenerationParams

QUESTION = ("Identify the product in this photo. Reply with JSON only, no other text: "
            '{"category": "one of digital, home, apparel, beauty, food_drink, books_stationery", '
            '"brand": "...", "colour": "...", "spec": "size, capacity or model", '
            '"text": "all text printed on the product"}')
# With the product schema the fields are the format's; the question only says what to look at.
STRUCTURED_QUESTION = "Identify the product in this photo: its category, brand, colour, size or model, and the " \
                      "text printed on it."
STUDY_SETTINGS = {f: getattr(GenerationParams(), f) for f in ("temperature", "top_p", "max_new_tokens",
                                                                "repetition_penalty")}
CATEGORY_NAMES = {"digital": "Digital", "home": "Home", "apparel": "Apparel", "beauty": "Beauty",
                  "food_drink": "Food & drink", "books_stationery": "Books & stationery"}


async def run(data_dir: Path, target: str, out: Path, concurrency: int = 4, seed: int = 0,
              progress: bool = True, timeout: float | None = None, max_new_tokens: int | None = None,
              free_text: bool = False) -> dict:
    items = dataset.load(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = [(item.file, Path(data_dir) / item.file) for item in items]
    settings = dict(STUDY_SETTINGS, **({"max_new_tokens": max_new_tokens} if max_new_tokens else {}))
    question = QUESTION if free_text else STRUCTURED_QUESTION
    form = {} if free_text else {"response_format": formats.PRODUCT}
    await ask_all(target, pairs, out / "answers.jsonl", question, concurrency=concurrency, progress=progress,
                  timeout=timeout, seed=seed, **settings, **form)
    report = build_report(items, out / "answers.jsonl", str(data_dir), dict(settings, seed=seed), question)
    (out / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=1) + "\n")
    (out / "report.md").write_text(render(report))
    return report


def build_report(items: list[dataset.Item], answers_path: Path, source: str, settings: dict,
                 question: str = QUESTION) -> dict:
    got = {}
    if answers_path.exists():
        for line in answers_path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row.get("question") == question:
                got[row["image"]] = row
    rows, by_cat, by_var, how_counts, missing = [], {}, {}, Counter(), []
    model_ids = set()
    for item in items:
        answer = got.get(item.file)
        if answer is None:
            missing.append(item.file)
            continue
        model_ids.add(answer.get("model_id", ""))
        fields, how = answers.parse(answer["text"])
        how_counts[how] += 1
        s = scoring.score(fields, item.truth())
        by_cat.setdefault(item.category, []).append(s)
        by_var.setdefault(item.variant, []).append(s)
        rows.append({"file": item.file, "category": item.category, "variant": item.variant, "truth": item.truth(),
                     "answer": answer["text"], "parsed": fields, "parsed_how": how, "scores": s.to_dict(),
                     "finish_reason": answer.get("finish_reason"), "completion_tokens": answer.get("completion_tokens")})
    every = [s for group in by_cat.values() for s in group]
    return {
        "dataset": source, "model_id": sorted(model_ids), "question": question,
        "response_format": "free text" if question == QUESTION else "product schema",
        "parse_rate": (len(rows) - how_counts["unparsable"] - how_counts["empty"]) / len(rows) if rows else 0.0,
        "settings": settings, "weights": scoring.WEIGHTS,
        "overall": scoring.aggregate(every),
        "by_category": {c: scoring.aggregate(by_cat[c]) for c in CATEGORY_NAMES if c in by_cat},
        "by_variant": {v: scoring.aggregate(by_var[v]) for v in ("normal", "occluded", "tilted", "blurred") if v in by_var},
        "parsing": dict(how_counts), "unparsable": how_counts["unparsable"] + how_counts["empty"],
        "missing": missing, "items": rows,
    }


def _row(name: str, a: dict) -> str:
    return (f"| {name} | {a['n']} | {a['category']:.1f} | {a['attributes']:.1f} | {a['ocr']:.1f} | "
            f"{a['total']:.1f} |")


def render(report: dict) -> str:
    head = "| | images | category accuracy % | attribute completeness % | OCR F1 % | weighted total % |"
    sep = "|---|---|---|---|---|---|"
    lines = ["# Product-recognition evaluation", "",
             f"Dataset `{report['dataset']}`, model {', '.join(report['model_id']) or '-'}; settings "
             + ", ".join(f"{k} {v}" for k, v in report["settings"].items()) + ".",
             "Weighted total = 0.40 x category + 0.35 x attributes + 0.25 x OCR, computed from the averages.", "",
             "## By category", "", head, sep]
    lines += [_row(CATEGORY_NAMES[c], a) for c, a in report["by_category"].items()]
    lines += [_row("**All**", report["overall"]), "", "## By variant", "", head, sep]
    lines += [_row(v, a) for v, a in report["by_variant"].items()]
    parsing = ", ".join(f"{k} {v}" for k, v in sorted(report["parsing"].items()))
    lines += ["", f"Answers ({report.get('response_format', 'free text')}) parsed: {parsing or 'none'}; unparsable "
                  f"(scored zero): {report['unparsable']}; parse rate {report.get('parse_rate', 0.0):.1%}."]
    if report["missing"]:
        lines.append(f"Not answered (see answers.errors.jsonl; rerun to retry): {len(report['missing'])}.")
    return "\n".join(lines) + "\n"


def compare(run_a: Path, run_b: Path) -> str:
    """Two runs' reports side by side, with B - A."""
    def load(p):
        f = Path(p) / "report.json"
        if not f.exists():
            raise NotFound(f"{p} has no report.json (run `shelfsight eval` first)")
        return json.loads(f.read_text())

    a, b = load(run_a), load(run_b)
    if a["dataset"] != b["dataset"]:
        raise InvalidArgument(f"the runs scored different datasets ({a['dataset']} vs {b['dataset']})")
    lines = [f"# {Path(run_a).name} vs {Path(run_b).name}", "",
             f"A: {', '.join(a['model_id'])}; B: {', '.join(b['model_id'])}", "",
             "| group | metric | A % | B % | B - A |", "|---|---|---|---|---|"]

    def rows(label, x, y):
        for metric in ("category", "attributes", "ocr", "total"):
            lines.append(f"| {label} | {metric} | {x[metric]:.1f} | {y[metric]:.1f} | {y[metric] - x[metric]:+.1f} |")

    rows("all", a["overall"], b["overall"])
    for group in ("by_category", "by_variant"):
        for key in a[group]:
            if key in b[group]:
                rows(CATEGORY_NAMES.get(key, key), a[group][key], b[group][key])
    lines += ["", f"Unparsable answers: A {a['unparsable']}, B {b['unparsable']}."]
    return "\n".join(lines) + "\n"
