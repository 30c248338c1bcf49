"""The reference runner: transformers' own forward over a DynamicCache, rows left-padded in one cache.

Merging new rows pads the shorter side on the left; padding that every row shares is trimmed when rows
leave. Positions follow transformers' Qwen3-VL generate(): each decode step gets [1, B, 1] = text
position + the row's M-RoPE delta. It is slow (about 50 kernels a layer, Python between them) and is
kept as the baseline that parity tests and benchmarks compare the slot runner with.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from shelfsight.engine import sampling
from shelfsight.engine.batch import Row
from shelfsight.engine.prefill import Prefilled


def row_params(rows: list[Row], device) -> sampling.RowParams:
    p = [r.req.params for r in rows]
    return sampling.RowParams(
        temperature=torch.tensor([x.temperature for x in p], dtype=torch.float32, device=device),
        top_k=torch.tensor([x.top_k for x in p], dtype=torch.int64, device=device),
        top_p=torch.tensor([x.top_p for x in p], dtype=torch.float32, device=device),
        penalty=torch.tensor([x.repetition_penalty for x in p], dtype=torch.float32, device=device),
        seed=torch.tensor([r.seed for r in rows], dtype=torch.int64, device=device))


class ReferenceRunner:
    def __init__(self, model):
        self.model = model
        self.device = model.device
        self.reset()

    def reset(self) -> None:
        self._slots: list[int] = []  # cache row -> slot
        self._cache = None
        self._mask: torch.Tensor | None = None  # [B, T] 1 = real token
        self._last: torch.Tensor | None = None  # [B] last chosen token
        self._seen: torch.Tensor | None = None  # [B, V] tokens seen, for the repetition penalty

    def start(self, rows: list[Row], pre: Prefilled, bitmask: torch.Tensor | None = None) -> list[int]:
        """Join freshly prefilled rows; returns their first tokens. `bitmask` [len(rows), W]: the rows'
        grammar masks, when some are constrained."""
        dev = self.device
        seen = torch.zeros((len(rows), pre.logits.shape[-1]), dtype=torch.bool, device=dev)
        for i, r in enumerate(rows):  # the prompt's own tokens, not the padding
            seen[i, r.req.input_ids.to(dev)] = True
        position = torch.tensor([r.length for r in rows], device=dev)
        bias = None if bitmask is None else sampling.bitmask_bias(bitmask.to(dev), pre.logits.shape[-1])
        tokens = sampling.sample(pre.logits, seen, row_params(rows, dev), position, all(
            r.req.params.greedy for r in rows), bias)
        seen.scatter_(1, tokens[:, None], True)
        self._merge([r.slot for r in rows], pre.cache, pre.mask, tokens, seen)
        return tokens.tolist()

    def _merge(self, slots, cache, mask, tokens, seen) -> None:
        if not self._slots:
            self._slots, self._cache, self._mask, self._last, self._seen = slots, cache, mask, tokens, seen
            return
        T_old, T_new = self._mask.shape[1], mask.shape[1]
        T = max(T_old, T_new)
        for old_layer, new_layer in zip(self._cache.layers, cache.layers):
            for name in ("keys", "values"):
                a = F.pad(getattr(old_layer, name), (0, 0, T - T_old, 0))
                b = F.pad(getattr(new_layer, name), (0, 0, T - T_new, 0))
                setattr(old_layer, name, torch.cat([a, b], dim=0))
        self._mask = torch.cat([F.pad(self._mask, (T - T_old, 0)), F.pad(mask, (T - T_new, 0))], dim=0)
        self._slots = self._slots + list(slots)
        self._last = torch.cat([self._last, tokens])
        self._seen = torch.cat([self._seen, seen])

    def logits(self, rows: list[Row]) -> torch.Tensor:
        """One forward of every cached row's last token -> [B, V] float32 in `rows` order. Extends the
        cache (the caller then samples, or the step is for a parity check)."""
        order = self._order(rows)
        B = len(self._slots)
        by_slot = {r.slot: r for r in rows}
        self._mask = torch.cat([self._mask, self._mask.new_ones((B, 1))], dim=1)
        position_ids = torch.tensor([by_slot[s].rope_position for s in self._slots], device=self.device)
        out = self.model(input_ids=self._last[:, None], attention_mask=self._mask,
                         position_ids=position_ids.view(1, B, 1), cache=self._cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1].float()[order]

    def launch(self, rows: list[Row], greedy: bool):
        from shelfsight.engine.runner import Done

        return Done(self.decode(rows, greedy))

    def launch_forward(self, rows: list[Row]):
        """The forward of a split step (constrained rows; see runner.py): its sampling waits for masks."""
        from shelfsight.engine.runner import Forwarded

        return Forwarded(rows, (self.logits(rows), self._positions(rows)))  # the engine moves r.length on

    def launch_sample(self, fwd, bitmask: torch.Tensor):
        """`bitmask` [>= S, W] (host, one row per slot)."""
        from shelfsight.engine.runner import Done

        logits, position = fwd.state
        mask = bitmask[torch.tensor([r.slot for r in fwd.rows])].to(self.device)
        bias = sampling.bitmask_bias(mask, logits.shape[-1])
        return Done(self._choose(fwd.rows, logits, position, False, bias))

    def decode(self, rows: list[Row], greedy: bool) -> list[int]:
        return self._choose(rows, self.logits(rows), self._positions(rows), greedy)

    def _positions(self, rows: list[Row]) -> torch.Tensor:
        """The index each row's next token takes in its sequence (it keys the sampling noise)."""
        return torch.tensor([r.length + 1 for r in rows], device=self.device)

    def _choose(self, rows: list[Row], logits: torch.Tensor, position: torch.Tensor, greedy: bool,
                bias: torch.Tensor | None = None) -> list[int]:
        order = self._order(rows)
        tokens = sampling.sample(logits, self._seen[order], row_params(rows, self.device), position, greedy, bias)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        self._last = tokens[inverse]
        self._seen.scatter_(1, self._last[:, None], True)
        return tokens.tolist()

    def _order(self, rows: list[Row]) -> torch.Tensor:
        if sorted(r.slot for r in rows) != sorted(self._slots):
            raise RuntimeError("the reference runner decodes all of its rows together")
        index = {s: i for i, s in enumerate(self._slots)}
        return torch.tensor([index[r.slot] for r in rows], device=self.device)

    def release(self, slot: int) -> None:
        keep = [i for i, s in enumerate(self._slots) if s != slot]
        if not keep:
            self.reset()
            return
        sel = torch.tensor(keep, device=self.device)
        self._slots = [self._slots[i] for i in keep]
        self._mask, self._last, self._seen = self._mask[sel], self._last[sel], self._seen[sel]
        # padding that every remaining row shares on the left is dead weight in every later step
        trim = int((self._mask.cumsum(1) == 0).sum(1).min())
        for layer in self._cache.layers:
            layer.keys = layer.keys[sel, :, trim:]
            layer.values = layer.values[sel, :, trim:]
        self._mask = self._mask[:, trim:]
