"""The generation engine: continuous batching of Qwen3-VL requests on one device.

One thread owns the model. Each iteration it admits waiting requests (prefilled together, their vision
features reused when the same picture was seen recently), merges them into the running batch, decodes
one token for every running row, streams text deltas to each request's sink and drops rows that
finished. New requests join at the next step instead of waiting for a whole batch to end.

Rows are left-padded in one KV cache (transformers' DynamicCache, [B, heads, T, head_dim] per layer);
merging pads the shorter side on the left, and padding that every row shares is trimmed away.
Positions follow transformers' Qwen3-VL generate(): prefill gets [4, B, L] (text + 3D M-RoPE),
each decode step [1, B, 1] = text position + the row's M-RoPE delta.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Protocol

import torch

from shelfsight import qwen, sampling
from shelfsight.detokenize import IncrementalDetokenizer
from shelfsight.errors import Cancelled, InvalidArgument, ResourceExhausted, ShelfsightError, Unavailable
from shelfsight.params import GenerationParams

log = logging.getLogger(__name__)
CANCELLED = Cancelled("the client cancelled the request")


class Sink(Protocol):
    """Where a request's output goes. Called from the engine thread."""

    def is_cancelled(self) -> bool: ...

    def send(self, delta: str, prompt_tokens: int, completion_tokens: int, finish_reason: str | None) -> None:
        """A text delta; finish_reason ("stop" | "length") marks the last call."""

    def fail(self, error: ShelfsightError) -> None: ...


@dataclass
class Request:
    input_ids: torch.Tensor  # [L] int64
    pixel_values: torch.Tensor  # [grid_h * grid_w, C*T*P*P] float32
    grid_thw: torch.Tensor  # [3] int64
    image_key: str
    params: GenerationParams
    sink: Sink
    arrival: float = field(default_factory=time.perf_counter)

    @property
    def image_tokens(self) -> int:
        return int(self.grid_thw.prod()) // qwen.MERGE_SIZE ** 2


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 32  # rows decoded together
    max_waiting: int = 256  # queued beyond the running batch; more is refused (RESOURCE_EXHAUSTED)
    max_prefill_tokens: int = 8192  # prompt tokens admitted in one prefill (at least one request)
    max_model_len: int = 32_768  # prompt + answer
    vision_cache_bytes: int = 256 << 20  # vision features kept for repeated pictures; 0 = off


class Observer:
    """Engine events for metrics; the Triton adapter overrides what it exports. The engine calls it
    through SafeObserver: a failing metric must never stop generation."""

    def first_token(self, seconds: float) -> None: ...

    def finished(self, prompt_tokens: int, completion_tokens: int, e2e_seconds: float,
                 decode_seconds: float) -> None: ...

    def step(self, running: int, waiting: int) -> None: ...

    def vision_cache(self, hit: bool) -> None: ...


class SafeObserver:
    def __init__(self, inner: Observer):
        self._inner, self._warned = inner, False

    def __getattr__(self, name):
        method = getattr(self._inner, name)

        def call(*args):
            try:
                method(*args)
            except Exception:
                if not self._warned:
                    self._warned = True
                    log.exception("metrics observer failed (further failures not logged)")
        return call


@dataclass
class _Row:
    req: Request
    generator: torch.Generator
    detok: IncrementalDetokenizer
    generated: int = 0
    first_token_at: float | None = None


class VisionCache:
    """LRU of per-picture vision features (merged embeddings + deepstack layers), bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.used = max_bytes, 0
        self._items: OrderedDict[str, tuple[torch.Tensor, list[torch.Tensor], int]] = OrderedDict()

    def get(self, key: str):
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
            return item[0], item[1]
        return None

    def put(self, key: str, embeds: torch.Tensor, deepstack: list[torch.Tensor]) -> None:
        size = embeds.numel() * embeds.element_size() + sum(d.numel() * d.element_size() for d in deepstack)
        if size > self.max_bytes or key in self._items:
            return
        while self.used + size > self.max_bytes:
            _, (_, _, freed) = self._items.popitem(last=False)
            self.used -= freed
        self._items[key] = (embeds, deepstack, size)
        self.used += size


class Engine:
    def __init__(self, model, tokenizer, config: EngineConfig = EngineConfig(), observer: Observer | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.device = next(model.parameters()).device
        self.observer = SafeObserver(observer or Observer())
        self.vision_cache = VisionCache(config.vision_cache_bytes)
        self._waiting: deque[Request] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._abort = False
        self._thread: threading.Thread | None = None
        # running batch state (engine thread only)
        self._rows: list[_Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # [B, T] 1 = real token
        self._next_pos: torch.Tensor | None = None  # [B] text position of the next token
        self._delta: torch.Tensor | None = None  # [B] M-RoPE position offset
        self._last: torch.Tensor | None = None  # [B] last chosen token
        self._seen: torch.Tensor | None = None  # [B, V] tokens seen, for the repetition penalty

    # ---- public API (any thread) ----
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="shelfsight-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is running (up to `timeout` seconds), then fail what is left, and return only
        once the engine thread is gone: the Triton stub tears down right after this returns, and a
        thread still sending responses into it would crash it."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                with self._cv:
                    self._abort = True
                    self._cv.notify_all()
                self._thread.join()

    def submit(self, req: Request) -> None:
        """Queue a request. Raises InvalidArgument for inconsistent inputs, ResourceExhausted when full."""
        self._validate(req)
        with self._cv:
            if self._stop:
                raise Unavailable("the engine is shutting down")
            if len(self._waiting) >= self.config.max_waiting:
                raise ResourceExhausted(f"{len(self._waiting)} requests already wait for the model; "
                                        "retry later")
            self._waiting.append(req)
            self._cv.notify()

    def load(self) -> tuple[int, int]:
        """(running, waiting) right now."""
        with self._cv:
            return len(self._rows), len(self._waiting)

    def _validate(self, req: Request) -> None:
        ids = req.input_ids
        if ids.ndim != 1 or ids.numel() == 0:
            raise InvalidArgument("input_ids must be a non-empty 1-D sequence")
        pads = int((ids == qwen.IMAGE_PAD_ID).sum())
        if req.grid_thw.numel() != 3 or int(req.grid_thw[0]) != 1:
            raise InvalidArgument(f"image_grid_thw must be (1, h, w), got {req.grid_thw.tolist()}")
        if req.pixel_values.shape[0] != int(req.grid_thw.prod()):
            raise InvalidArgument(f"pixel_values has {req.pixel_values.shape[0]} patches, grid says "
                                  f"{int(req.grid_thw.prod())}")
        if pads != req.image_tokens:
            raise InvalidArgument(f"prompt has {pads} image tokens, the image needs {req.image_tokens}")
        total = ids.numel() + req.params.max_new_tokens
        if total > self.config.max_model_len:
            raise InvalidArgument(f"prompt ({ids.numel()} tokens) + max_new_tokens "
                                  f"({req.params.max_new_tokens}) exceeds the model length {self.config.max_model_len}")

    # ---- engine thread ----
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stop and not self._waiting and not self._rows:
                        self._cv.wait(timeout=1.0)
                    if self._stop and not self._rows and not self._waiting:
                        return
                    if self._abort:
                        self._fail_all(Unavailable("the model server is shutting down"))
                        return
                    admitted = self._admit()
                try:
                    if admitted:
                        self._prefill_group(admitted)
                    if self._rows:
                        self._decode_step()
                except Exception as e:  # the batch is lost; every request in it gets the error
                    log.exception("engine step failed")
                    err = Unavailable(f"generation failed: {type(e).__name__}: {e}")
                    for row in self._rows:
                        row.req.sink.fail(err)
                    self._reset()
                self.observer.step(*self.load())

    def _admit(self) -> list[Request]:
        room = self.config.max_batch - len(self._rows)
        out, tokens = [], 0
        while self._waiting and len(out) < room:
            nxt = self._waiting[0]
            if out and tokens + nxt.input_ids.numel() > self.config.max_prefill_tokens:
                break
            self._waiting.popleft()
            if nxt.sink.is_cancelled():
                nxt.sink.fail(CANCELLED)
                continue
            out.append(nxt)
            tokens += nxt.input_ids.numel()
        return out

    def _fail_all(self, error: ShelfsightError) -> None:
        for req in [row.req for row in self._rows] + list(self._waiting):
            req.sink.fail(error)
        self._waiting.clear()
        self._reset()

    def _reset(self) -> None:
        self._rows, self._cache = [], None
        self._mask = self._next_pos = self._delta = self._last = self._seen = None

    def _prefill_group(self, reqs: list[Request]) -> None:
        try:
            state = self._prefill(reqs)
        except Exception as e:
            if len(reqs) == 1:
                log.exception("prefill failed")
                reqs[0].sink.fail(Unavailable(f"prefill failed: {type(e).__name__}: {e}"))
                return
            # isolate the culprit: each request again on its own
            for r in reqs:
                self._prefill_group([r])
            return
        self._merge(*state)

    def _vision(self, reqs: list[Request]):
        """Per-request (embeds [n, H], deepstack list of [n, H]) from the cache or one vision pass."""
        found = [self.vision_cache.get(r.image_key) if self.config.vision_cache_bytes else None for r in reqs]
        todo = [i for i, f in enumerate(found) if f is None]
        for i in range(len(reqs)):
            self.observer.vision_cache(found[i] is not None)
        if todo:
            pv = torch.cat([reqs[i].pixel_values for i in todo]).to(self.device)
            grid = torch.stack([reqs[i].grid_thw for i in todo]).to(self.device)
            out = self.model.model.get_image_features(pv, grid, return_dict=True)
            for j, i in enumerate(todo):
                embeds = out.pooler_output[j]
                deep = [layer[j] for layer in out.deepstack_features]
                found[i] = (embeds, deep)
                if self.config.vision_cache_bytes:
                    self.vision_cache.put(reqs[i].image_key, embeds, deep)
        return found

    def _prefill(self, reqs: list[Request]):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        dev, k = self.device, len(reqs)
        lengths = [r.input_ids.numel() for r in reqs]
        L = max(lengths)
        ids = torch.full((k, L), qwen.ENDOFTEXT_ID, dtype=torch.long)
        mask = torch.zeros((k, L), dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, L - lengths[i]:] = r.input_ids
            mask[i, L - lengths[i]:] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        mm_types = (ids == qwen.IMAGE_PAD_ID).long()
        grid = torch.stack([r.grid_thw for r in reqs]).to(dev)
        feats = self._vision(reqs)
        encoder = BaseModelOutputWithDeepstackFeatures(
            pooler_output=tuple(f[0] for f in feats),
            deepstack_features=[tuple(f[1][layer] for f in feats) for layer in range(len(feats[0][1]))])
        vision_pos, deltas = self.model.model.get_rope_index(ids, mm_types, image_grid_thw=grid,
                                                             attention_mask=mask)
        text_pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate() fills padding
        position_ids = torch.cat([text_pos[None], vision_pos], dim=0)  # [4, k, L]
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, cache=cache,
                         mm_encoder_outputs={"image": encoder}, image_grid_thw=grid, mm_token_type_ids=mm_types,
                         use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].float()
        seen = torch.zeros((k, logits.shape[-1]), dtype=torch.bool, device=dev)
        for i, r in enumerate(reqs):  # the prompt's own tokens, not the padding
            seen[i, r.input_ids.to(dev)] = True
        rows = [_Row(r, sampling.new_generator(r.params, dev), IncrementalDetokenizer(self.tokenizer)) for r in reqs]
        next_pos = torch.tensor(lengths, device=dev)
        return rows, out.cache, mask, next_pos, deltas.view(-1).to(dev), logits, seen

    def _merge(self, rows, cache, mask, next_pos, delta, logits, seen) -> None:
        """Choose the new rows' first tokens, then join them to the running batch."""
        tokens = sampling.choose(logits, seen, [r.req.params for r in rows], [r.generator for r in rows])
        seen.scatter_(1, tokens[:, None], True)
        if not self._rows:
            self._rows, self._cache, self._mask = rows, cache, mask
            self._next_pos, self._delta, self._last, self._seen = next_pos, delta, tokens, seen
        else:
            T_old, T_new = self._mask.shape[1], mask.shape[1]
            T = max(T_old, T_new)
            for old_layer, new_layer in zip(self._cache.layers, cache.layers):
                for name in ("keys", "values"):
                    a, b = getattr(old_layer, name), getattr(new_layer, name)
                    a = torch.nn.functional.pad(a, (0, 0, T - T_old, 0))
                    b = torch.nn.functional.pad(b, (0, 0, T - T_new, 0))
                    setattr(old_layer, name, torch.cat([a, b], dim=0))
            self._mask = torch.cat([torch.nn.functional.pad(self._mask, (T - T_old, 0)),
                                    torch.nn.functional.pad(mask, (T - T_new, 0))], dim=0)
            self._rows = self._rows + rows
            self._next_pos = torch.cat([self._next_pos, next_pos])
            self._delta = torch.cat([self._delta, delta])
            self._last = torch.cat([self._last, tokens])
            self._seen = torch.cat([self._seen, seen])
        first = len(self._rows) - len(rows)
        self._emit(list(range(first, len(self._rows))), tokens.tolist())

    def _decode_step(self) -> None:
        B = len(self._rows)
        self._mask = torch.cat([self._mask, self._mask.new_ones((B, 1))], dim=1)
        position_ids = (self._next_pos + self._delta).view(1, B, 1)
        out = self.model(input_ids=self._last[:, None], attention_mask=self._mask, position_ids=position_ids,
                         cache=self._cache, use_cache=True, logits_to_keep=1)
        self._next_pos = self._next_pos + 1
        logits = out.logits[:, -1].float()
        tokens = sampling.choose(logits, self._seen, [r.req.params for r in self._rows],
                                 [r.generator for r in self._rows])
        self._seen.scatter_(1, tokens[:, None], True)
        self._last = tokens
        self._emit(list(range(B)), tokens.tolist())

    def _emit(self, indices: list[int], tokens: list[int]) -> None:
        """Stream each row's new token; then drop finished rows from the batch."""
        now = time.perf_counter()
        done = []
        for i, tok in zip(indices, tokens):
            row = self._rows[i]
            req = row.req
            if req.sink.is_cancelled():
                req.sink.fail(CANCELLED)  # the last word: without it the request is never completed
                done.append(i)
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
            prompt = req.input_ids.numel()
            if finish:
                req.sink.send(delta, prompt, row.generated, finish)
                self.observer.finished(prompt, row.generated, now - req.arrival, now - row.first_token_at)
                done.append(i)
            elif delta:
                req.sink.send(delta, prompt, row.generated, None)
        if done:
            self._drop(done)

    def _drop(self, indices: list[int]) -> None:
        gone = set(indices)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        if not keep:
            self._reset()
            return
        sel = torch.tensor(keep, device=self._mask.device)
        self._rows = [self._rows[i] for i in keep]
        self._mask, self._next_pos, self._delta = self._mask[sel], self._next_pos[sel], self._delta[sel]
        self._last, self._seen = self._last[sel], self._seen[sel]
        # padding that every remaining row shares on the left is dead weight in every later step
        trim = int((self._mask.cumsum(1) == 0).sum(1).min())
        for layer in self._cache.layers:
            layer.keys = layer.keys[sel, :, trim:]
            layer.values = layer.values[sel, :, trim:]
        self._mask = self._mask[:, trim:]
