"""Prefill for the slot runner: admitted prompts are prefilled on the compact decoder's own weights
(decoder.py `extend`), their K/V written straight into their slots, in chunks that interleave with
decode steps.

Why chunks: a long prefill between two decode steps stalls every running stream for its whole length.
While streams are decoding, each engine iteration runs at most `budget` prompt tokens
(EngineConfig.prefill_chunk_tokens), oldest request first, then one decode step; a prompt longer than
what is left of the budget continues in the next iteration from where it stopped (its earlier tokens
are already in its slot). With nothing decoding, every queued prompt goes at once. A request joins the
decoding batch, with its first token, in the iteration that prefills its last prompt token.

At admission (`add`) each prompt gets, once: its input embeddings with its pictures' features in place
[n, hidden], its M-RoPE rotations [n, D] (transformers' own rope index and rotary embedding), and its
pictures' deepstack features with their positions. A chunk then only slices these.
"""
from __future__ import annotations

import bisect
import logging
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from shelfsight.engine.batch import Row
from shelfsight.engine.prefill import Feature
from shelfsight.model import qwen

log = logging.getLogger(__name__)


@dataclass
class Pending:
    """One admitted prompt on its way into its slot."""
    row: Row
    embeds: torch.Tensor  # [n, hidden] input embeddings, pictures' features in place
    cos: torch.Tensor  # [n, D] M-RoPE rotation of each position
    sin: torch.Tensor  # [n, D]
    visual: list[int]  # positions of picture tokens, ascending (host copy, for slicing)
    visual_at: torch.Tensor  # [v] the same positions on the device
    deep: list[torch.Tensor]  # per deepstack layer, [v, hidden]
    done: int = 0  # prompt tokens already in the slot

    @property
    def n(self) -> int:
        return self.embeds.shape[0]


@dataclass
class Chunk:
    """What one prefill iteration did."""
    finished: list[Row] = field(default_factory=list)  # prompts complete: their logits follow, in order
    logits: torch.Tensor | None = None  # [len(finished), V] float32 at each prompt's last token
    cancelled: list[Row] = field(default_factory=list)
    failed: list[Row] = field(default_factory=list)
    error: Exception | None = None
    tokens: int = 0  # prompt tokens prefilled


class PrefillQueue:
    """Admitted requests whose prompts are being prefilled, oldest first. Engine thread only."""

    def __init__(self, model, decoder, budget: int, idle_budget: int):
        self.model, self.decoder = model, decoder
        self.budget = budget  # prompt tokens per iteration while streams decode; 0 = no limit
        self.idle_budget = idle_budget  # the same with nothing decoding (bounds one forward's memory)
        self._queue: deque[Pending] = deque()
        self._pin = decoder.device.type == "cuda"

    def __len__(self) -> int:
        return len(self._queue)

    def rows(self) -> list[Row]:
        return [p.row for p in self._queue]

    def clear(self) -> list[Row]:
        rows = self.rows()
        self._queue.clear()
        return rows

    def add(self, rows: list[Row], feats: list[list[Feature]]) -> None:
        """Queue freshly admitted rows (their pictures' features from prefill.vision); sets each row's
        M-RoPE delta. All or none: a row that cannot be prepared raises and none is queued."""
        self._queue.extend([self._prepare(row, f) for row, f in zip(rows, feats)])

    def _device(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor on the decoder's device without waiting for the device (pinned, async copy)."""
        if self._pin:
            return t.pin_memory().to(self.decoder.device, non_blocking=True)
        return t.to(self.decoder.device)

    def _prepare(self, row: Row, feats: list[Feature]) -> Pending:
        model, dec = self.model, self.decoder
        # The rope index and the picture positions are computed on the host, from the host's ids: on
        # the device they would each wait for the decode step in flight.
        ids = row.req.input_ids.reshape(1, -1)  # [1, n] on the host
        mm = (ids == qwen.IMAGE_PAD_ID).long()
        visual = torch.nonzero(mm[0]).flatten()
        n_visual = sum(f[0].shape[0] for f in feats)
        if visual.numel() != n_visual:
            raise ValueError(f"the prompt holds {visual.numel()} picture tokens, its pictures give {n_visual}")
        grid = row.req.grid_thw.reshape(-1, 3) if feats else None
        position, delta = model.model.get_rope_index(ids, mm, image_grid_thw=grid, attention_mask=torch.ones_like(ids))
        visual_at = self._device(visual)
        embeds = F.embedding(self._device(ids[0]), dec.embed)  # [n, hidden]
        deep = []
        if feats:
            embeds[visual_at] = torch.cat([f[0] for f in feats]).to(embeds.dtype)
            deep = [torch.cat([f[1][layer] for f in feats]) for layer in range(len(feats[0][1]))]
        cos, sin = model.model.language_model.rotary_emb(embeds[None], self._device(position))  # [1, n, D]
        row.delta = int(delta.view(-1)[0])
        return Pending(row, embeds, cos[0], sin[0], visual.tolist(), visual_at, deep)

    def step(self, decoding: bool = True) -> Chunk:
        """Prefill up to `budget` prompt tokens, oldest request first (`idle_budget` when no stream is
        decoding: then there is nothing to stall). The queue changes only once the work succeeded; if
        a packed forward fails, each request is tried again alone, so only the culprit fails."""
        out = Chunk()
        for p in [p for p in self._queue if p.row.req.sink.is_cancelled()]:
            self._queue.remove(p)
            out.cancelled.append(p.row)
        parts: list[tuple[Pending, int, int]] = []  # (prompt, first token, end)
        left = (self.budget if decoding else self.idle_budget) or float("inf")
        for p in self._queue:
            if left <= 0:
                break
            end = int(min(p.n, p.done + left))
            parts.append((p, p.done, end))
            left -= end - p.done
        if not parts:
            return out
        try:
            logits = self._run(parts)
        except Exception as e:
            if len(parts) == 1:
                log.exception("prefill failed")
                self._queue.remove(parts[0][0])
                out.failed.append(parts[0][0].row)
                out.error = e
                return out
            log.warning("a packed prefill of %d requests failed (%s: %s); each again alone", len(parts),
                        type(e).__name__, e)
            for part in parts:
                try:
                    self._commit([part], self._run([part]), out)
                except Exception as e1:
                    log.exception("prefill failed")
                    self._queue.remove(part[0])
                    out.failed.append(part[0].row)
                    out.error = e1
            return out
        self._commit(parts, logits, out)
        return out

    def _commit(self, parts, logits: torch.Tensor | None, out: Chunk) -> None:
        """The parts ran: advance them; the finished ones leave the queue with their logits."""
        for p, a, b in parts:
            p.done = b
            out.tokens += b - a
            if b == p.n:
                self._queue.remove(p)
                p.row.length = p.n
                out.finished.append(p.row)
        if logits is not None:
            out.logits = logits if out.logits is None else torch.cat([out.logits, logits])

    def _run(self, parts: list[tuple[Pending, int, int]]) -> torch.Tensor | None:
        """One packed `extend` over the parts -> the logits [k, V] float32 at the last prompt token of
        each part that completes its prompt (None if none does)."""
        x = torch.cat([p.embeds[a:b] for p, a, b in parts])
        cos = torch.cat([p.cos[a:b] for p, a, b in parts])
        sin = torch.cat([p.sin[a:b] for p, a, b in parts])
        segments = [(p.row.slot, a, b - a) for p, a, b in parts]
        layers = max((len(p.deep) for p, _, _ in parts), default=0)
        deep = []
        for layer in range(layers):
            index, values, offset = [], [], 0
            for p, a, b in parts:
                lo, hi = bisect.bisect_left(p.visual, a), bisect.bisect_left(p.visual, b)
                if hi > lo and layer < len(p.deep):
                    index.append(p.visual_at[lo:hi] - a + offset)
                    values.append(p.deep[layer][lo:hi])
                offset += b - a
            if index:
                deep.append((torch.cat(index), torch.cat(values)))
            else:
                empty = torch.zeros(0, dtype=torch.int64, device=x.device)
                deep.append((empty, x.new_zeros(0, x.shape[1])))
        hidden = self.decoder.extend(x, cos, sin, segments, deep)
        last, offset = [], 0
        for p, a, b in parts:
            offset += b - a
            if b == p.n:
                last.append(offset - 1)
        if not last:
            return None
        return self.decoder.lm_head(hidden.index_select(0, self._device(torch.tensor(last)))).float()
