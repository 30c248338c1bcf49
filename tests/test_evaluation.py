"""The evaluation: scorer, answer parsing, the synthetic dataset, and a whole run through the stack."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from shelfsight.errors import InvalidArgument
from shelfsight.evaluation import answers, dataset, scoring
from tests.conftest import ROOT

TRUTH = {"category": "food_drink", "attributes": {"brand": "Lumora", "colour": "green", "spec": "500 ml"},
         "ocr_text": "Lumora Sparkling Water 500 ml"}


# ---- scoring ----

def test_perfect_and_empty_answers():
    perfect = scoring.score({"category": "food_drink", "brand": "Lumora", "colour": "green", "spec": "500 ml",
                             "text": "Lumora Sparkling Water 500 ml"}, TRUTH)
    assert (perfect.category, perfect.attributes, perfect.ocr, perfect.total) == (1.0, 1.0, 1.0, 1.0)
    nothing = scoring.score(None, TRUTH)
    assert (nothing.category, nothing.attributes, nothing.ocr, nothing.total) == (0.0, 0.0, 0.0, 0.0)


def test_partial_answer_with_synonyms_and_missing_fields():
    s = scoring.score({"category": "Beverages", "brand": "LUMORA", "colour": "Dark green bottle",
                       "text": "Lumora water"}, TRUTH)
    assert s.category == 1.0  # "beverages" is the food & drink category
    assert s.attributes == pytest.approx(2 / 3)  # brand and colour found, spec missing
    # tokens: predicted {lumora, water}, truth {lumora, sparkling, water, 500, ml}: P 1, R 2/5
    assert s.ocr == pytest.approx(2 * 1 * 0.4 / 1.4)
    assert s.total == pytest.approx(0.40 * 1 + 0.35 * 2 / 3 + 0.25 * (0.8 / 1.4))
    assert scoring.score({"category": "electronics"}, TRUTH).category == 0.0


def test_cjk_ocr_is_scored_per_character():
    truth = "净含量 500毫升"  # tokens: 净 含 量 500 毫 升
    assert scoring.tokens(truth) == ["净", "含", "量", "500", "毫", "升"]
    assert scoring.f1("含量500毫升", truth) == pytest.approx(2 * 1 * (5 / 6) / (1 + 5 / 6))  # 5 of 6, nothing wrong
    # predicted ひ か り ス マ ホ 5000mah (7), truth ひ か り ス マ ー ト フ ォ ン 5000mah (11): 6 shared
    assert scoring.f1("ひかり スマホ 5000mAh", "ひかり スマートフォン 5000mAh") == pytest.approx(
        2 * (6 / 7) * (6 / 11) / (6 / 7 + 6 / 11))
    assert scoring.f1("", "") == 1.0 and scoring.f1("x", "") == 0.0


def test_category_synonyms_across_languages():
    assert scoring.category_of("Food & Drink") == "food_drink"
    assert scoring.category_of("饮料") == "food_drink"
    assert scoring.category_of("文房具") == "books_stationery"
    assert scoring.category_of("this is consumer electronics") == "digital"
    assert scoring.category_of("a spaceship") is None


def test_the_studys_table_is_recomputed_not_copied():
    # The study reports averages 94 / 86 / 85 and a total of 89.8; its weights give 88.95 from those
    # rounded figures, and 89.0 from its per-category averages (94.0 / 86.0 / 85.3).
    assert scoring.weighted(94, 86, 85) == pytest.approx(88.95)
    assert round(scoring.weighted(94.0, 86.0, 85.3), 1) == 89.0
    assert round(scoring.weighted(94, 86, 85), 1) != 89.8
    rows = [scoring.Scores(1.0, 1.0, 1.0)] * 2 + [scoring.Scores(0.0, 0.5, 0.25)] * 2
    agg = scoring.aggregate(rows)
    assert (agg["category"], agg["attributes"], agg["ocr"]) == (50.0, 75.0, 62.5)
    assert agg["total"] == pytest.approx(0.40 * 50 + 0.35 * 75 + 0.25 * 62.5)


# ---- parsing ----

@pytest.mark.parametrize("text,how,brand", [
    ('{"category": "beauty", "brand": "Aurelle", "colour": "pink"}', "json", "Aurelle"),
    ('```json\n{"category": "beauty", "brand": "Aurelle"}\n```', "fenced", "Aurelle"),
    ('Sure! Here is the result:\n{"category": "beauty", "brand": "Aurelle"}\nHope this helps.', "embedded", "Aurelle"),
    ("{'category': 'beauty', 'brand': 'Aurelle',}", "json", "Aurelle"),  # single quotes, trailing comma
    ('{category: "beauty", brand: "Aurelle"}', "json", "Aurelle"),  # bare keys
    ('{"category": "beauty", "brand": "Aurelle", "text": "Aurelle Hydr', "embedded", "Aurelle"),  # cut off
    ('{"类别": "美妆", "品牌": "云朵", "颜色": "粉色"}', "json", "云朵"),
    ('{"product": {"Color": "pink", "Brand Name": "Aurelle"}}', "json", "Aurelle"),
    ("Category: beauty\nBrand: Aurelle\nColor: pink", "lines", "Aurelle"),
])
def test_tolerant_parsing(text, how, brand):
    fields, got_how = answers.parse(text)
    assert got_how == how and fields["brand"] == brand


@pytest.mark.parametrize("text,how", [("", "empty"), ("   ", "empty"), ("a random model says ctpctp", "unparsable"),
                                       ("{not json at all", "unparsable")])
def test_unparsable_answers_are_recorded_not_fatal(text, how):
    fields, got = answers.parse(text)
    assert fields is None and got == how
    assert scoring.score(fields, TRUTH).total == 0.0


def test_synonym_keys_map_to_fields():
    fields, _ = answers.parse('{"type": "digital", "manufacturer": "Zentra", "color": "black", "capacity": "256GB",'
                              ' "ocr": ["Zentra", "Smart Phone"]}')
    assert fields == {"category": "digital", "brand": "Zentra", "colour": "black", "spec": "256GB",
                      "text": "Zentra Smart Phone"}


# ---- dataset ----

def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_synthetic_dataset_is_deterministic_and_valid(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    n = dataset.synthesize(tmp_path / "a", per_category=1, seed=3)
    dataset.synthesize(tmp_path / "b", per_category=1, seed=3)
    dataset.synthesize(tmp_path / "c", per_category=1, seed=4)
    assert n == 6 * 4
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    items = dataset.load(tmp_path / "a")
    assert len(items) == 24
    assert {i.category for i in items} == {"digital", "home", "apparel", "beauty", "food_drink", "books_stationery"}
    assert {i.variant for i in items} == {"normal", "occluded", "tilted", "blurred"}
    assert all(i.attributes["brand"] and i.ocr_text.startswith(i.attributes["brand"]) for i in items)


def test_dataset_carries_cjk_labels(tmp_path):
    dataset.synthesize(tmp_path, per_category=3, seed=1)
    scripts = {i.extra["script"] for i in dataset.load(tmp_path)}
    assert {"zh", "ja"} & scripts and "latin" in scripts


@pytest.mark.parametrize("line,message", [
    ('{"file": "x.jpg"}', "missing category"),
    ('{"file": "x.jpg", "category": "toys", "attributes": {}, "ocr_text": "", "variant": "normal"}', "toys"),
    ('{"file": "x.jpg", "category": "home", "attributes": {}, "ocr_text": "", "variant": "rainy"}', "rainy"),
    ('{"file": "nope.jpg", "category": "home", "attributes": {}, "ocr_text": "", "variant": "normal"}', "does not exist"),
    ("not json", "not JSON"),
])
def test_bad_manifests_name_the_line(tmp_path, line, message):
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 20)
    (tmp_path / "manifest.jsonl").write_text(line + "\n")
    with pytest.raises(InvalidArgument, match=message) as info:
        dataset.load(tmp_path)
    assert "manifest.jsonl:1" in info.value.message


# ---- end to end ----

def test_eval_through_the_stack_and_compare(gateway, tmp_path):
    data = tmp_path / "data"
    r = subprocess.run([sys.executable, "-m", "shelfsight", "dataset", "synth", "--out", str(data),
                        "--per-category", "1", "--seed", "2"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    target = f"127.0.0.1:{gateway.port}"

    def evaluate(out, *extra):
        return subprocess.run([sys.executable, "-m", "shelfsight", "eval", "--dataset", str(data), "--target", target,
                               "--out", str(out), "--concurrency", "8", "--no-progress", *extra],
                              capture_output=True, text=True, cwd=ROOT, timeout=600)

    first = evaluate(tmp_path / "run1")
    assert first.returncode == 0, first.stderr[-2000:]
    report = json.loads((tmp_path / "run1" / "report.json").read_text())
    assert len(report["items"]) == 24 and not report["missing"]
    assert set(report["by_category"]) == {"digital", "home", "apparel", "beauty", "food_drink", "books_stationery"}
    assert set(report["by_variant"]) == {"normal", "occluded", "tilted", "blurred"}
    o = report["overall"]
    assert o["total"] == pytest.approx(0.40 * o["category"] + 0.35 * o["attributes"] + 0.25 * o["ocr"])
    assert report["unparsable"] == sum(1 for i in report["items"] if i["parsed"] is None)
    assert all(0.0 <= i["scores"]["total"] <= 1.0 for i in report["items"])
    md = (tmp_path / "run1" / "report.md").read_text()
    assert md.count("| ") > 20 and "| Food & drink | 4 |" in md and "| **All** | 24 |" in md and "| tilted | 6 |" in md
    assert report["settings"]["temperature"] == 0.3 and report["settings"]["top_p"] == 0.85
    # the product schema (the default): every answer of the random model parses, within the study's budget
    assert report["response_format"] == "product schema" and report["parse_rate"] == 1.0
    assert all(i["finish_reason"] == "stop" and i["parsed_how"] == "json" for i in report["items"])
    assert "parse rate 100.0%" in md

    free = evaluate(tmp_path / "free", "--free-text", "--max-new-tokens", "24")
    assert free.returncode == 0, free.stderr[-2000:]
    free_report = json.loads((tmp_path / "free" / "report.json").read_text())
    assert free_report["response_format"] == "free text"
    assert free_report["parse_rate"] == sum(1 for i in free_report["items"] if i["parsed"]) / 24

    # resumable: a second run asks nothing again
    again = evaluate(tmp_path / "run1")
    assert again.returncode == 0
    assert len((tmp_path / "run1" / "answers.jsonl").read_text().splitlines()) == 24

    second = evaluate(tmp_path / "run2")  # same seed: the same answers, from the cache
    assert second.returncode == 0
    cmp = subprocess.run([sys.executable, "-m", "shelfsight", "eval", "compare", str(tmp_path / "run1"),
                          str(tmp_path / "run2")], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert cmp.returncode == 0, cmp.stderr
    assert "| all | total |" in cmp.stdout and "+0.0 |" in cmp.stdout and "| Beauty | ocr |" in cmp.stdout
