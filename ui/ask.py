"""The Ask tab's logic, free of Gradio: check a photo, stream an answer, word errors, keep history.

A person sees the photo as the model sees it (shelfsight.model.imaging.decode: EXIF orientation, RGB, the
study's enhancement when asked), the answer as it is written, and beside it where it came from.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator

from PIL import Image

from shelfsight import errors, formats, params
from shelfsight.client.client import ShelfsightClient
from shelfsight.evaluation.run import STRUCTURED_QUESTION
from shelfsight.model import imaging
from shelfsight.params import GenerationParams

PRESETS = {
    "Brand": "What brand is this product?",
    "List every product": "List every product you see in this photo.",
    "Read the label": "Read all the text printed on the label, exactly as written.",
    "Structured (product schema)": STRUCTURED_QUESTION,
}
STRUCTURED = "Structured (product schema)"  # the preset that also turns the product schema on
SERVING = GenerationParams()  # the gateway's defaults when a request leaves a parameter out


@dataclass(frozen=True)
class Controls:
    """The generation controls as the page holds them; seed None means a fresh draw each time."""

    temperature: float = SERVING.temperature
    top_p: float = SERVING.top_p
    max_new_tokens: int = SERVING.max_new_tokens
    repetition_penalty: float = SERVING.repetition_penalty
    seed: int | None = SERVING.seed
    enhance: bool = False
    cache: str = "use"
    structured: bool = False  # answer as the built-in product schema (JSON that always parses)

    @classmethod
    def from_page(cls, *values) -> "Controls":
        """The control widgets' values in field order (app.py lists the widgets in this order); the seed
        comes from a text box: blank is None, anything else must be a whole number."""
        kw = dict(zip([f.name for f in fields(cls)], values))
        text = str(kw.get("seed") or "").strip()
        try:
            kw["seed"] = int(text) if text else None
        except ValueError:
            raise errors.InvalidArgument(f"seed must be a whole number (or blank for a fresh draw), got {text!r}") from None
        return cls(**kw)

    def to_page(self) -> list:
        """The widgets' values for these controls (from_page's inverse)."""
        return [("" if self.seed is None else str(self.seed)) if f.name == "seed" else getattr(self, f.name)
                for f in fields(self)]

    def request(self) -> dict:
        """Keyword arguments for ShelfsightClient.stream / batch.ask_all."""
        chosen = {f.name: getattr(self, f.name) for f in fields(self) if f.name in params.RULES}
        return dict({k: None if v is None else params.RULES[k].cast(v) for k, v in chosen.items()},
                    enhance=bool(self.enhance), cache=self.cache,
                    response_format=formats.PRODUCT if self.structured else None)


def read_photo(path: str | Path | None) -> bytes:
    if not path:
        raise errors.InvalidArgument("no photo yet: drop one on the photo box, pick a file or paste an image")
    return Path(path).read_bytes()


def as_model_sees(data: bytes, enhance: bool = False) -> Image.Image:
    """The upright RGB picture the gateway will use; InvalidArgument names what is wrong with it."""
    return imaging.decode(data, enhance=enhance)


def explain(e: Exception, target: str, timeout: float | None = None) -> str:
    """What went wrong, in words for the person at the page (never a stack trace)."""
    msg = str(e).rstrip(".")
    if isinstance(e, errors.InvalidArgument):
        return f"That cannot be asked: {msg}."
    if isinstance(e, errors.NotFound):
        return f"Not found: {msg}."
    if isinstance(e, errors.Unavailable):
        why = "it cannot be reached" if "failed to connect" in msg.lower() else msg
        return (f"The gateway at {target} is not answering right now ({why}). The page keeps working; "
                "ask again when the status line says the gateway is back.")
    if isinstance(e, errors.ResourceExhausted):
        return f"The service is busy ({msg}); try again in a moment."
    if isinstance(e, errors.DeadlineExceeded):
        return f"No answer within {timeout:g} s; try fewer new tokens." if timeout else f"No answer in time ({msg})."
    if isinstance(e, errors.ShelfsightError):
        return f"The service could not answer: {msg}."
    return f"Something went wrong in the page ({type(e).__name__}); the gateway was not affected."


@dataclass
class View:
    """What the Ask tab shows at one moment of an answer."""

    text: str = ""
    ttft: float | None = None  # seconds from sending to the first piece of text
    seconds: float = 0.0  # so far, measured here (includes the network)
    result: object | None = None  # shelfsight.client.Recognition once the answer is complete


def stream_answer(target: str, data: bytes, question: str, controls: Controls,
                  timeout: float | None = None) -> Iterator[View]:
    """Yield a View after every piece of the answer; the last one carries the Recognition."""
    view, t0 = View(), time.perf_counter()
    with ShelfsightClient(target, timeout=timeout) as client:
        for chunk in client.stream(data, question, **controls.request()):
            view.seconds = time.perf_counter() - t0
            if chunk.text and view.ttft is None:
                view.ttft = view.seconds
            if chunk.final:
                view.text, view.result = chunk.result.text, chunk.result
            else:
                view.text += chunk.text
            yield view


def meta_markdown(view: View) -> str:
    """The facts beside the answer: cache status, tokens, time to first token, total time, model id."""
    r = view.result
    if r is None:
        ttft = f"{view.ttft * 1000:.0f} ms" if view.ttft is not None else "-"
        return f"writing... time to first token {ttft}, {view.seconds:.1f} s so far"
    ttft = f"{view.ttft * 1000:.0f} ms" if view.ttft is not None else "- (empty answer)"
    return "\n".join([
        "| detail | value |", "|---|---|",
        f"| cache | **{r.cache_status}** |",
        f"| tokens | {r.prompt_tokens} in, {r.completion_tokens} out ({r.finish_reason}) |",
        f"| time to first token | {ttft} |",
        f"| total time | {view.seconds * 1000:.0f} ms here, {r.total_seconds * 1000:.0f} ms in the gateway |",
        f"| model | `{r.model_id}` |",
    ])


_FENCE = re.compile(r"```[a-zA-Z0-9]*\s*\n?(.*?)```", re.S)


def find_json(text: str):
    """The first JSON object or array in an answer (bare, fenced, or inside prose), or None."""
    decoder = json.JSONDecoder()
    for candidate in [text.strip(), *_FENCE.findall(text)]:
        try:
            return json.loads(candidate)
        except ValueError:
            pass
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                value, _ = decoder.raw_decode(text, i)
            except ValueError:
                continue
            if isinstance(value, (dict, list)) and value:
                return value
    return None


def _cell(v) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def json_table(text: str) -> tuple[list[str], list[list[str]]] | None:
    """A JSON answer as (headers, rows): an object as field/value rows, a list of objects as one row
    each; None when the answer holds no JSON object or array."""
    value = find_json(text)
    if isinstance(value, dict):
        return ["field", "value"], [[str(k), _cell(v)] for k, v in value.items()]
    if isinstance(value, list) and value:
        if all(isinstance(x, dict) for x in value):
            headers = list(dict.fromkeys(k for x in value for k in x))
            return headers, [[_cell(x.get(h, "")) for h in headers] for x in value]
        return ["item"], [[_cell(x)] for x in value]
    return None


@dataclass
class Entry:
    """One question and answer of this browser session."""

    time: str
    photo: str  # file name as uploaded
    photo_path: str  # where the upload lies (Gradio's cache), to reopen it
    question: str
    answer: str
    controls: dict
    meta: dict = field(default_factory=dict)  # cache status, tokens, timings, model id

    @classmethod
    def make(cls, photo_path: str, question: str, controls: Controls, view: View) -> "Entry":
        r = view.result
        meta = r.to_dict() | {"ttft_seconds": view.ttft, "seconds": round(view.seconds, 4)}
        return cls(time=time.strftime("%H:%M:%S"), photo=Path(photo_path).name, photo_path=str(photo_path),
                   question=question, answer=r.text, controls=asdict(controls), meta=meta)


def history_rows(history: list[dict]) -> list[list[str]]:
    """Newest first, as the History table shows them."""
    rows = []
    for e in reversed(history):
        answer = e["answer"] if len(e["answer"]) <= 80 else e["answer"][:77] + "..."
        rows.append([e["time"], e["photo"], e["question"][:60], answer, e["meta"].get("cache_status", "")])
    return rows


def history_jsonl(history: list[dict], path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for e in history:
            f.write(json.dumps({k: v for k, v in e.items() if k != "photo_path"}, ensure_ascii=False) + "\n")
    return path
