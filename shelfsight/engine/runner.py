"""The slot runner: prompts prefilled in chunks on the compact decoder (slot_prefill.py), decode through
the same decoder over fixed KV slots, one (graph-captured on CUDA) step per token for every running row.

Device state, per slot (allocated once; index `slots` is the spare that padding rows write to):
    tokens [S+1] int64   the last chosen token, the next step's input
    seen [S+1, V] bool   tokens seen (prompt + answer), for the repetition penalty
    sampling params [S+1] (sampling.RowParams)
    meta [4, S+1] int64  per step, from the host: cache_pos, rope_pos, write_slot, kv_len
A step reads rows 0..B-1 (B the batch bucket over the highest running slot), writes each running row's
K/V, token and seen mark into its slot, and leaves the chosen tokens in `out`; the host reads them with
one copy, the step's only sync. Steps are launched one ahead: the next step needs only host counters
and the tokens already on the device, so the host streams step t while the device runs step t+1.

A batch with constrained rows (structured answers) splits each step in two: the forward (it needs only
the device's tokens) is launched first and leaves its logits [B, V] in `step_logits`; its sampling needs
the rows' grammar masks, which need step t's tokens, so it is launched once the host has read those,
advanced the grammars and written the masks into `bitmask` [S+1, ceil(V/32)] int32. On a GPU that
host work overlaps the forward. Batches without constrained rows run the whole step as before.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from shelfsight.engine import sampling
from shelfsight.engine.batch import Row
from shelfsight.engine.config import EngineConfig
from shelfsight.engine.decoder import Decoder
from shelfsight.engine.graphs import StepGraphs, batch_buckets, kv_buckets, pick
from shelfsight.engine.slot_prefill import PrefillQueue
from shelfsight.model import qlinear

CACHE_POS, ROPE_POS, WRITE_SLOT, KV_LEN = range(4)
log = logging.getLogger(__name__)


class Launched:
    """A queued step: its tokens, in the order of the rows it was launched for, once the device is done."""

    def __init__(self, slots: list[int], host: torch.Tensor, event):
        self.slots, self.host, self.event = slots, host, event

    def tokens(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()  # the step's one sync
        out = self.host.tolist()
        return [out[s] for s in self.slots]


class Done:
    """A step that already ran (the reference runner decodes synchronously)."""

    def __init__(self, tokens: list[int]):
        self._tokens = tokens

    def tokens(self) -> list[int]:
        return self._tokens


class Forwarded:
    """The first half of a split step: the forward ran (or is queued) for these rows; its sampling waits
    for their masks. `state` is the runner's own (the batch bucket here, the logits for the reference)."""

    def __init__(self, rows: list[Row], state):
        self.rows, self.state = rows, state


class SlotRunner:
    def __init__(self, model, config: EngineConfig):
        self.config = config
        S = self.spare = config.max_batch
        self.decoder = Decoder(model, S, config.max_model_len)
        dev = self.device = self.decoder.device
        vocab = self.decoder.lm_head.weight.shape[0]
        self.batch_buckets = batch_buckets(S)
        self.kv_buckets = kv_buckets(config.max_model_len)
        with torch.inference_mode():
            self.tokens = torch.zeros(S + 1, dtype=torch.int64, device=dev)
            self.out = torch.zeros(S + 1, dtype=torch.int64, device=dev)
            self.seen = torch.zeros(S + 1, vocab, dtype=torch.bool, device=dev)
            self.bitmask = torch.full((S + 1, (vocab + 31) // 32), -1, dtype=torch.int32, device=dev)
            self.params = sampling.RowParams.empty(S + 1, dev)
            self.meta = torch.zeros(4, S + 1, dtype=torch.int64, device=dev)
            self._true = torch.ones(S + 1, dtype=torch.bool, device=dev)
        self.cuda = cuda = dev.type == "cuda"
        # a split step's logits between its halves: on CUDA a static buffer (a graph's own output lives
        # in the shared pool, where the next graph may write), on CPU the forward's tensor itself
        self.step_logits = torch.zeros(S + 1, vocab, dtype=torch.float32, device=dev) if cuda else None
        self._cpu_logits: torch.Tensor | None = None
        # two of each host buffer: step t+1 is launched before step t's tokens are read, so the host
        # writes one while the device may still copy from / into the other
        self.meta_hosts = [torch.zeros(4, S + 1, dtype=torch.int64, pin_memory=cuda) for _ in range(2)]
        self.out_hosts = [torch.zeros(S + 1, dtype=torch.int64, pin_memory=cuda) for _ in range(2)]
        self._flip = 0
        self.graphs = StepGraphs(self._step, enabled=cuda and config.cuda_graphs, harmless=self._harmless)
        self.int4_kernels: dict | None = None  # what choose_int4_kernels decided

    def reset(self) -> None:
        """Nothing to drop: a slot's state is overwritten when a request is next admitted into it."""

    def release(self, slot: int) -> None:
        pass

    def choose_int4_kernels(self) -> None:
        """Per batch bucket, tinygemm or a dequantized copy for int4 weights (EngineConfig.int4_dense_from);
        before any graph is captured, since a graph keeps the kernel it was captured with."""
        mods = [m for layer in self.decoder.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        setting = self.config.int4_dense_from
        if not any(isinstance(m, qlinear.Int4Linear) for m in mods):
            return
        if setting == -1 and not self.cuda:
            return  # on CPU the copy would be float32 (8x the int4 bytes); keep tinygemm
        if self.graphs.graphs:  # a captured graph would keep calling the kernel (and weight) it recorded
            raise RuntimeError("int4 kernels must be chosen before any decode graph is captured")
        # the prefill chunk's row count too: prefill runs the same modules with that many rows
        sizes = sorted(set(self.batch_buckets) | {self.config.prefill_chunk_tokens} - {0})
        threshold, table = (qlinear.choose_int4_threshold(mods, sizes) if setting == -1
                            else (setting or None, []))
        held = qlinear.set_int4_threshold(mods, threshold)
        self.int4_kernels = {"dense_from": threshold, "dense_bytes": held, "timings": table}
        log.info("int4 weights: %s (dense copy %.0f MB)%s",
                 f"tinygemm below {threshold} rows, dense from there" if threshold else "tinygemm at every batch",
                 held / 2**20, "; measured ms per bucket: " + ", ".join(
                     f"{r['rows']}: {r['tinygemm_ms']:.2f}/{r['dense_ms']:.2f}" for r in table) if table else "")

    def warm_up(self) -> None:
        """Choose the int4 kernels, then capture the graphs most traffic needs before the first request
        (CUDA only)."""
        with torch.inference_mode():
            self.choose_int4_kernels()
        kv = [L for L in self.kv_buckets if L <= max(self.config.warm_kv_len, self.kv_buckets[0])]
        with torch.inference_mode():
            if self.decoder.fused:  # the kernels at the model's own shapes, once, before any capture
                try:
                    with self._harmless(self.batch_buckets[-1]):
                        self._step(self.batch_buckets[-1], kv[0], False)
                    torch.cuda.synchronize()
                except Exception:
                    log.exception("fused decode kernels failed at the model's shapes; using torch ops")
                    self.decoder.fused = False
            self.graphs.warm_up([(B, L, g) for B in self.batch_buckets for L in kv for g in (True, False, "forward")]
                                + [(B, 0, "masked") for B in self.batch_buckets])

    # ---- prefill ----
    def prefill_queue(self, model) -> PrefillQueue:
        """Prompts are prefilled on this runner's decoder, into its slots (slot_prefill.py)."""
        return PrefillQueue(model, self.decoder, self.config.prefill_chunk_tokens, self.config.max_prefill_tokens)

    def start(self, rows: list[Row], logits: torch.Tensor, bitmask: torch.Tensor | None = None) -> list[int]:
        """Rows whose prompts are in their slots (row.length set), with their last prompt position's
        logits [len(rows), V]: sample and return their first tokens. `bitmask` [len(rows), W]: the
        rows' grammar masks, when some are constrained."""
        dev = self.device
        index = torch.tensor([r.slot for r in rows], device=dev)
        self.seen[index] = False
        for r in rows:
            self.seen[r.slot, r.req.input_ids.to(dev)] = True
            self.params.set_row(r.slot, r.req.params, r.seed)
        p = sampling.RowParams(*(t[index] for t in (self.params.temperature, self.params.top_k, self.params.top_p,
                                                      self.params.penalty, self.params.seed)))
        position = torch.tensor([r.length for r in rows], device=dev)
        bias = None if bitmask is None else sampling.bitmask_bias(bitmask.to(dev), logits.shape[-1])
        first = sampling.sample(logits, self.seen[index], p, position, all(r.req.params.greedy for r in rows),
                                bias)
        self.seen[index, first] = True
        self.tokens[index] = first
        return first.tolist()

    # ---- decode ----
    def _fill_meta(self, rows: list[Row]) -> tuple[int, int]:
        """Host metadata for one step -> (batch bucket B, KV bucket L); rows of free slots below B are
        padding: position 0, one key, writes to the spare slot."""
        B = pick(self.batch_buckets, max(r.slot for r in rows) + 1)
        L = pick(self.kv_buckets, max(r.length for r in rows) + 1)
        host = self.meta_hosts[self._flip]
        m = host.numpy()
        m[:, :B] = 0
        m[WRITE_SLOT, :B] = self.spare
        m[KV_LEN, :B] = 1
        for r in rows:
            m[:, r.slot] = (r.length, r.rope_position, r.slot, r.length + 1)
        self.meta.copy_(host, non_blocking=True)  # 1 KiB, contiguous, from pinned memory
        return B, L

    def _step(self, B: int, L: int, variant: bool | str) -> None:
        """variant True / False: a whole step, greedy-only or not. "forward": the model only, logits
        left in `step_logits`. "masked": sampling of `step_logits` under `bitmask` (L unused)."""
        m = self.meta[:, :B]
        if variant == "masked":
            logits = self.step_logits[:B] if self.cuda else self._cpu_logits
            bias = sampling.bitmask_bias(self.bitmask[:B], logits.shape[-1])
            tok = sampling.sample(logits, self.seen[:B], self.params.rows(B), m[KV_LEN], False, bias)
        else:
            logits = self.decoder.forward(self.tokens[:B], m[CACHE_POS], m[ROPE_POS], m[WRITE_SLOT], m[KV_LEN], L)
            if variant == "forward":
                if self.cuda:
                    self.step_logits[:B].copy_(logits)
                else:
                    self._cpu_logits = logits
                return
            # the new token's index in its sequence (= kv_len) keys the sampling noise
            tok = sampling.sample(logits, self.seen[:B], self.params.rows(B), m[KV_LEN], variant)
        self.seen.index_put_((m[WRITE_SLOT], tok), self._true[:B])
        self.tokens.index_copy_(0, m[WRITE_SLOT], tok)
        self.out[:B].copy_(tok)

    @contextlib.contextmanager
    def _harmless(self, B: int):
        """Every row of a B-row step points at the spare slot (a graph's warm-up run)."""
        saved = self.meta.clone()
        self.meta[:, :B] = 0
        self.meta[WRITE_SLOT, :B] = self.spare
        self.meta[KV_LEN, :B] = 1
        try:
            yield
        finally:
            self.meta.copy_(saved)

    def launch(self, rows: list[Row], greedy: bool) -> "Launched":
        """Queue one step for every running row (rows in any order); its tokens come from the result's
        tokens(), which waits for this step only: the host can work on the previous step meanwhile."""
        B, L = self._fill_meta(rows)
        self.graphs.run(B, L, greedy)
        return self._read_back(rows, B)

    def launch_forward(self, rows: list[Row]) -> Forwarded:
        """Queue the forward of a split step (see the module docstring)."""
        B, L = self._fill_meta(rows)
        self.graphs.run(B, L, "forward")
        return Forwarded(rows, B)

    def launch_sample(self, fwd: Forwarded, bitmask: torch.Tensor) -> "Launched":
        """Queue the sampling of a split step under `bitmask` [>= B, W] (host, one row per slot)."""
        B = fwd.state
        self.bitmask[:B].copy_(bitmask[:B], non_blocking=self.cuda)
        self.graphs.run(B, 0, "masked")
        return self._read_back(fwd.rows, B)

    def _read_back(self, rows: list[Row], B: int) -> "Launched":
        host = self.out_hosts[self._flip]
        host[:B].copy_(self.out[:B], non_blocking=self.cuda)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        self._flip ^= 1
        return Launched([r.slot for r in rows], host, event)

    def decode(self, rows: list[Row], greedy: bool) -> list[int]:
        """One token for every running row -> tokens in `rows` order (waits for them)."""
        return self.launch(rows, greedy).tokens()

    def logits(self, rows: list[Row]) -> torch.Tensor:
        """The decode step's logits [len(rows), V] for the rows' current state, eagerly (parity checks).
        Writes the same K/V that the next decode step writes."""
        B, L = self._fill_meta(rows)
        m = self.meta[:, :B]
        logits = self.decoder.forward(self.tokens[:B], m[CACHE_POS], m[ROPE_POS], m[WRITE_SLOT], m[KV_LEN], L)
        return logits[torch.tensor([r.slot for r in rows], device=self.device)]
