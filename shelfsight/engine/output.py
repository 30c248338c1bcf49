"""The output stage: chosen tokens -> text deltas on each request's sink, and the decision which rows
are done (stop token, a stop sequence, or a constrained row's grammar complete; token limit; cancelled
by the client).

Stop sequences end an answer before their first occurrence, which is not sent. Text that could be the
start of a stop sequence is held back until the next tokens tell (so no part of one is ever sent)."""
from __future__ import annotations

import time

from shelfsight.engine.api import SafeObserver
from shelfsight.engine.batch import Row
from shelfsight.errors import Cancelled
from shelfsight.model import qwen

CANCELLED = Cancelled("the client cancelled the request")


def stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop sequence begins in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def held(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` that may begin a stop sequence (to be held back)."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class OutputStage:
    def __init__(self, observer: SafeObserver, interval: float = 0.0):
        self.observer, self.interval = observer, interval

    def emit(self, rows: list[Row], tokens: list[int]) -> list[Row]:
        """Stream each row's new token; return the rows that are finished (their requests completed).
        A row's text is sent at its first token, at its last, and otherwise at most once per
        `interval` seconds (held back meanwhile); cancellation is looked at only when sending."""
        now = time.perf_counter()
        done = []
        for row, tok in zip(rows, tokens):
            req = row.req
            first = row.first_token_at is None
            if first:
                row.first_token_at = now
                self.observer.first_token(now - req.arrival)
            finish = None
            if (tok in qwen.EOS_IDS and not req.params.ignore_eos) or row.grammar_ended:
                finish = "stop"
                row.pending += row.detok.flush()
            else:
                row.generated += 1
                row.pending += row.detok.push(tok)
                if row.generated >= req.params.max_new_tokens:
                    finish = "length"
                    row.pending += row.detok.flush()
            stops = req.stop
            if stops and finish != "stop":
                at = stop_at(row.pending, stops)
                if at is not None:  # the answer ends before it
                    row.pending, finish = row.pending[:at], "stop"
            if not (finish or first or now - row.last_sent >= self.interval):
                continue
            if not finish and req.sink.is_cancelled():  # a finished answer is delivered whole
                req.sink.fail(CANCELLED)  # the last word: without it the request is never completed
                done.append(row)
                continue
            prompt = row.prompt_tokens
            if finish:  # metrics first: a client that saw its answer end may read them at once
                self.observer.finished(prompt, row.generated, now - req.arrival, now - row.first_token_at)
                req.sink.send(row.pending, prompt, row.generated, finish)
                done.append(row)
            elif row.pending:
                keep = held(row.pending, stops) if stops else 0
                out, row.pending = row.pending[:len(row.pending) - keep], row.pending[len(row.pending) - keep:]
                if out:
                    req.sink.send(out, prompt, row.generated, None)
                    row.last_sent = now
        return done
