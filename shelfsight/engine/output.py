"""The output stage: chosen tokens -> text deltas on each request's sink, and the decision which rows
are done (stop token, token limit, cancelled by the client)."""
from __future__ import annotations

import time

from shelfsight import qwen
from shelfsight.engine.api import SafeObserver
from shelfsight.engine.batch import Row
from shelfsight.errors import Cancelled

CANCELLED = Cancelled("the client cancelled the request")


class OutputStage:
    def __init__(self, observer: SafeObserver):
        self.observer = observer

    def emit(self, rows: list[Row], tokens: list[int]) -> list[Row]:
        """Stream each row's new token; return the rows that are finished (their requests completed)."""
        now = time.perf_counter()
        done = []
        for row, tok in zip(rows, tokens):
            req = row.req
            if req.sink.is_cancelled():
                req.sink.fail(CANCELLED)  # the last word: without it the request is never completed
                done.append(row)
                continue
            if row.first_token_at is None:
                row.first_token_at = now
                self.observer.first_token(now - req.arrival)
            finish = None
            if tok in qwen.EOS_IDS and not req.params.ignore_eos:
                finish = "stop"
                delta = row.detok.flush()
            else:
                row.generated += 1
                delta = row.detok.push(tok)
                if row.generated >= req.params.max_new_tokens:
                    finish = "length"
                    delta += row.detok.flush()
            prompt = row.prompt_tokens
            if finish:  # metrics first: a client that saw its answer end may read them at once
                self.observer.finished(prompt, row.generated, now - req.arrival, now - row.first_token_at)
                req.sink.send(delta, prompt, row.generated, finish)
                done.append(row)
            elif delta:
                req.sink.send(delta, prompt, row.generated, None)
        return done
