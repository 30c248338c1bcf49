"""Scores of the reference study (shared/notes/anchors.md), per answer and in aggregate.

    category accuracy       the predicted category is the true one (synonyms allowed)          x 0.40
    attribute completeness  share of the true brand, colour and spec found in the answer       x 0.35
    OCR F1                  tokens of the printed text: words for Latin script, characters for
                            CJK (a Chinese or Japanese word has no spaces to split on)         x 0.25

The weighted total is computed from the three averages, never copied: the study printed 89.8 where
its own 94 / 86 / 85 give 88.95, and a scorer must not reproduce that slip.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass

WEIGHTS = {"category": 0.40, "attributes": 0.35, "ocr": 0.25}
ATTRIBUTES = ("brand", "colour", "spec")
CATEGORY_SYNONYMS = {
    "digital": ("digital", "electronics", "electronic", "tech", "phone", "smartphone", "gadget", "数码", "电子", "デジタル", "家電"),
    "home": ("home", "household", "home goods", "homeware", "kitchen", "storage", "家居", "日用", "ホーム", "生活用品"),
    "apparel": ("apparel", "clothing", "clothes", "garment", "fashion", "服装", "衣服", "アパレル", "衣類"),
    "beauty": ("beauty", "cosmetics", "cosmetic", "skincare", "personal care", "美妆", "化妆品", "コスメ", "美容"),
    "food_drink": ("food_drink", "food and drink", "food & drink", "food", "drink", "beverage", "beverages", "grocery",
                   "食品", "饮料", "食品飲料", "飲料"),
    "books_stationery": ("books_stationery", "books and stationery", "books & stationery", "book", "books", "stationery",
                         "notebook", "图书", "文具", "書籍", "文房具"),
}
# Chinese characters and Japanese kana: scored one character at a time (no spaces between words).
# Korean writes spaces between words, so Hangul stays with the word-level tokens.
_CJK_CHARS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK = re.compile(f"[{_CJK_CHARS}]")
_TOKEN = re.compile(f"[{_CJK_CHARS}]|[^\\W_{_CJK_CHARS}]+", re.UNICODE)


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text or "").casefold()
    return " ".join(re.sub(r"[^\w\s.%]", " ", text).split())


def category_of(text: str) -> str | None:
    """The study category a free-form answer names, or None."""
    t = normalize(text).replace(" ", "_")
    for cat, words in CATEGORY_SYNONYMS.items():
        if t in {normalize(w).replace(" ", "_") for w in words}:
            return cat
    spaced = f" {normalize(text)} "
    for cat, words in CATEGORY_SYNONYMS.items():
        if any(f" {normalize(w)} " in spaced or (_CJK.search(w) and normalize(w) in spaced) for w in words):
            return cat
    return None


def tokens(text: str) -> list[str]:
    """Latin words and numbers as tokens, each CJK character as one token."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text or "").casefold())


def f1(predicted: str, truth: str) -> float:
    p, t = Counter(tokens(predicted)), Counter(tokens(truth))
    if not p and not t:
        return 1.0
    overlap = sum((p & t).values())
    if not overlap:
        return 0.0
    precision, recall = overlap / sum(p.values()), overlap / sum(t.values())
    return 2 * precision * recall / (precision + recall)


def attribute_found(predicted: str | None, truth: str) -> bool:
    """A true attribute counts when the answer states it (case, spacing and width ignored)."""
    if not predicted or not truth:
        return False
    p, t = normalize(predicted).replace(" ", ""), normalize(truth).replace(" ", "")
    return t in p or (len(p) >= 2 and p in t and len(p) >= 0.6 * len(t))


@dataclass(frozen=True)
class Scores:
    category: float  # 0 or 1
    attributes: float  # share of ATTRIBUTES found
    ocr: float  # F1

    @property
    def total(self) -> float:
        return weighted(self.category, self.attributes, self.ocr)

    def to_dict(self) -> dict:
        return asdict(self) | {"total": self.total}


def weighted(category: float, attributes: float, ocr: float) -> float:
    return WEIGHTS["category"] * category + WEIGHTS["attributes"] * attributes + WEIGHTS["ocr"] * ocr


def score(fields: dict | None, truth: dict) -> Scores:
    """fields: the parsed answer (category, brand, colour, spec, text) or None when unparsable."""
    if not fields:
        return Scores(0.0, 0.0, 0.0)
    category = 1.0 if category_of(str(fields.get("category") or "")) == truth["category"] else 0.0
    wanted = [a for a in ATTRIBUTES if truth["attributes"].get(a)]
    found = sum(attribute_found(str(fields.get(a) or ""), truth["attributes"][a]) for a in wanted)
    return Scores(category, found / len(wanted) if wanted else 1.0, f1(str(fields.get("text") or ""), truth["ocr_text"]))


def aggregate(scores: list[Scores]) -> dict:
    """Averages in percent, and the weighted total computed from those averages."""
    if not scores:
        return {"n": 0, "category": 0.0, "attributes": 0.0, "ocr": 0.0, "total": 0.0}
    n = len(scores)
    cat = 100 * sum(s.category for s in scores) / n
    attr = 100 * sum(s.attributes for s in scores) / n
    ocr = 100 * sum(s.ocr for s in scores) / n
    return {"n": n, "category": cat, "attributes": attr, "ocr": ocr, "total": weighted(cat, attr, ocr)}
