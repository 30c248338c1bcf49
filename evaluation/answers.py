"""Reading the model's structured answer, tolerantly.

Models wrap JSON in code fences, add prose around it, use other key names ("color", "品牌"), leave
trailing commas or single quotes, or answer in "Key: value" lines. parse() tries, in order: the whole
answer as JSON, each fenced block, each balanced {...} in the text, the same with light repairs, and
finally "Key: value" lines. It returns the fields it found and how, or None: an unparsable answer
scores zero and is recorded, it never stops an evaluation.
"""
from __future__ import annotations

import json
import re

FIELDS = ("category", "brand", "colour", "spec", "text")
SYNONYMS = {
    "category": ("category", "type", "product type", "product category", "class", "kind", "类别", "类型", "分类",
                 "カテゴリ", "カテゴリー", "種類"),
    "brand": ("brand", "brand name", "make", "manufacturer", "maker", "logo", "品牌", "牌子", "ブランド", "メーカー"),
    "colour": ("colour", "color", "main colour", "main color", "primary color", "颜色", "色", "カラー"),
    "spec": ("spec", "specs", "specification", "specifications", "size", "capacity", "volume", "weight", "model",
             "规格", "容量", "尺寸", "サイズ", "規格", "容量"),
    "text": ("text", "ocr", "ocr text", "label", "label text", "printed text", "visible text", "package text",
             "words", "文字", "文本", "包装文字", "テキスト", "文字列"),
}
_KEY_OF = {re.sub(r"[\s_\-]+", " ", s).strip().casefold(): field for field, words in SYNONYMS.items() for s in words}
_FENCE = re.compile(r"```[a-zA-Z0-9]*\s*\n?(.*?)```", re.S)
_LINE = re.compile(r"^\s*[-*•]?\s*\**([^:：\n]{1,40}?)\**\s*[:：]\s*(.+?)\s*$", re.M)


def _field(key: str) -> str | None:
    return _KEY_OF.get(re.sub(r"[\s_\-]+", " ", str(key)).strip().casefold())


def _value(v) -> str:
    if isinstance(v, (list, tuple)):
        return " ".join(_value(x) for x in v)
    if isinstance(v, dict):
        return " ".join(_value(x) for x in v.values())
    return "" if v is None else str(v).strip()


def _fields_from(obj) -> dict | None:
    if not isinstance(obj, dict):
        return None
    out = {}
    for k, v in obj.items():
        f = _field(k)
        if f and f not in out:
            out[f] = _value(v)
        elif isinstance(v, dict):  # {"product": {"brand": ...}}
            for f2, v2 in (_fields_from(v) or {}).items():
                out.setdefault(f2, v2)
    return out or None


def _balanced_objects(text: str):
    """Every top-level {...} span, honouring strings, in order."""
    depth, start, in_str, esc = 0, None, None, False
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == in_str:
                in_str = None
        elif ch in "\"'" and depth:
            in_str = ch
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                yield text[start:i + 1]
    if depth and start is not None:  # cut off mid-object (the answer hit max_new_tokens): close it
        yield text[start:] + (in_str or "") + "}" * depth


def _repair(s: str) -> str:
    s = s.replace("\u201c", '"').replace("\u201d", '"').replace("\u2018", "'").replace("\u2019", "'")
    s = re.sub(r"'([^'\n]*?)'(\s*[:,}\]])", r'"\1"\2', s)  # 'single' quoted keys and values
    s = re.sub(r"([{,]\s*)([A-Za-z_\u4e00-\u9fff][\w \u4e00-\u9fff]*?)(\s*:)", r'\1"\2"\3', s)  # bare keys
    s = re.sub(r",\s*([}\]])", r"\1", s)  # trailing commas
    return s


def _load(candidate: str):
    try:
        return json.loads(candidate)
    except ValueError:
        pass
    try:
        return json.loads(_repair(candidate))
    except ValueError:
        return None


def parse(answer: str) -> tuple[dict | None, str]:
    """(fields, how): how is json | fenced | embedded | lines | empty | unparsable."""
    text = (answer or "").strip()
    if not text:
        return None, "empty"
    fields = _fields_from(_load(text))
    if fields:
        return fields, "json"
    for block in _FENCE.findall(text):
        fields = _fields_from(_load(block.strip()))
        if fields:
            return fields, "fenced"
    for obj in _balanced_objects(text):
        fields = _fields_from(_load(obj))
        if fields:
            return fields, "embedded"
    lines = {}
    for key, value in _LINE.findall(text):
        f = _field(key)
        if f and f not in lines:
            lines[f] = value.strip().strip('",')
    if lines:
        return lines, "lines"
    return None, "unparsable"
