"""The generation engine: continuous batching of Qwen3-VL requests on one device.

One thread owns the model. Each iteration: the scheduler admits waiting requests into free KV-cache
slots and their pictures go through the vision tower (features reused when the same picture was seen
recently); a chunk of the admitted prompts is prefilled (slot_prefill.py; the reference runner
prefills whole groups) and the requests whose prompt is complete join the batch with their first
token; the runner decodes one token for every running row; the output stage streams text deltas to
each request's sink and says which rows finished, whose slots are freed. New requests join at the next
step instead of waiting for a whole batch to end.

Runners: `slots` (default; fixed KV slots, compact decoder, CUDA graphs on GPU) and `reference`
(transformers' forward over a DynamicCache), selected by EngineConfig.runner.

Structured answers: a request with a response format gets its grammar compiled in submit() (the
caller's thread; cached by the format's text) and a matcher at admission. While any running row is
constrained, each step is split (runner.py): the forward is launched, then step t's tokens are read,
the grammars advanced, the next masks filled, and only then the sampling launched.
"""
from __future__ import annotations

import logging
import threading

import torch

from shelfsight.engine import sampling
from shelfsight.engine.api import Observer, Request, SafeObserver
from shelfsight.engine.batch import Batch, Row
from shelfsight.engine.config import EngineConfig
from shelfsight.engine.detokenize import IncrementalDetokenizer
from shelfsight.engine.grammar import Grammars, RowMasks
from shelfsight.engine.output import CANCELLED, OutputStage
from shelfsight.engine.prefill import VisionCache, prefill, vision
from shelfsight.engine.runner import Forwarded
from shelfsight.engine.scheduler import Scheduler
from shelfsight.errors import FailedPrecondition, Internal, InvalidArgument, ShelfsightError, Unavailable
from shelfsight.formats import ResponseFormat
from shelfsight.model import qwen
from shelfsight.model.preprocessing import PixelPolicy

log = logging.getLogger(__name__)
RUNNERS = ("slots", "reference")


def make_runner(model, config: EngineConfig):
    if config.runner == "slots":
        from shelfsight.engine.runner import SlotRunner

        return SlotRunner(model, config)
    if config.runner == "reference":
        from shelfsight.engine.reference import ReferenceRunner

        return ReferenceRunner(model)
    raise InvalidArgument(f"unknown engine runner {config.runner!r}; choose one of {', '.join(RUNNERS)}")


def check_inputs(req, policy: PixelPolicy) -> None:
    """A request's tensors agree with each other (a direct caller of `generate` or `embed` may send
    anything): the grids, the pixels, and the prompt's runs of <|image_pad|>, one run per picture of
    exactly its visual tokens, in order (M-RoPE gives each run one picture's positions)."""
    merge_size = policy.merge_size
    ids, grid = req.input_ids, req.grid_thw
    if ids.ndim != 1 or ids.numel() == 0:
        raise InvalidArgument("input_ids must be a non-empty 1-D sequence")
    if grid.ndim != 2 or grid.shape[-1] != 3 or (grid.shape[0] and bool((grid[:, 0] != 1).any())):
        raise InvalidArgument(f"image_grid_thw must be (1, h, w) per picture, got {grid.tolist()}")
    if len(req.image_keys) != grid.shape[0]:
        raise InvalidArgument(f"{len(req.image_keys)} image keys for {grid.shape[0]} pictures")
    if grid.shape[0] and bool((grid[:, 1:] < 1).any()):
        raise InvalidArgument(f"image_grid_thw {grid.tolist()} has a side of no patches")
    if grid.shape[0] and bool(((grid[:, 1:] % merge_size) != 0).any()):
        raise InvalidArgument(f"image_grid_thw {grid.tolist()} is not a multiple of the model's merge size {merge_size}")
    want = int(grid.prod(-1).sum()) * policy.patch_size ** 2 * 3
    px = req.pixels
    if not isinstance(px, torch.Tensor):
        raise InvalidArgument(f"pixels must be a torch uint8 tensor, got {type(px).__name__}")
    if px.dtype != torch.uint8 or px.ndim != 1 or px.numel() != want:
        raise InvalidArgument(f"pixels must be {want} bytes for the grids {grid.tolist()}: one flat uint8 tensor, "
                              f"each picture ({policy.patch_size}*grid_h) x ({policy.patch_size}*grid_w) x 3 "
                              f"in order; got {px.numel()} {px.dtype} values of shape {list(px.shape)}")
    pads = (ids == qwen.IMAGE_PAD_ID).int()
    edges = torch.diff(pads, prepend=pads.new_zeros(1), append=pads.new_zeros(1))
    runs = (torch.nonzero(edges == -1).flatten() - torch.nonzero(edges == 1).flatten()).tolist()
    need = req.picture_tokens(merge_size)
    if runs != need:
        raise InvalidArgument(f"prompt has image-token runs {runs}, the pictures need {need}")


class Engine:
    def __init__(self, model, tokenizer, config: EngineConfig = EngineConfig(), observer: Observer | None = None,
                 pixels: PixelPolicy | None = None):
        """`pixels`: how requests' pixels become patches (preprocessing.load_policy(checkpoint)); by
        default the model config's geometry with Qwen3-VL's mean and std."""
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.device = next(model.parameters()).device
        self.pixels = pixels or PixelPolicy.of_model(model.config)
        self.merge_size = self.pixels.merge_size  # patches merged into one visual token per side
        self.observer = SafeObserver(observer or Observer())
        self.vision_cache = VisionCache(config.vision_cache_bytes)
        self.scheduler: Scheduler[Request] = Scheduler(config.max_batch, config.max_waiting,
                                                       config.max_prefill_tokens)
        self.runner = make_runner(model, config)
        # slot runner: prompts prefilled in chunks between decode steps (engine thread only); the
        # reference runner prefills whole groups through transformers instead
        self.prefilling = self.runner.prefill_queue(model) if hasattr(self.runner, "prefill_queue") else None
        self.output = OutputStage(self.observer, config.stream_interval)
        self.batch = Batch()  # engine thread only
        self._cv = threading.Condition()
        self._stop = False
        self._abort = False
        self._thread: threading.Thread | None = None
        # built on the first constrained request (the vocabulary takes ~1 s), not at start
        self._grammars: Grammars | None = None
        self._grammars_lock = threading.Lock()
        self._masks: RowMasks | None = None  # engine thread only

    # ---- public API (any thread) ----
    def start(self) -> None:
        """Capture the decode graphs (on CUDA), then start the engine thread."""
        if hasattr(self.runner, "warm_up"):
            self.runner.warm_up()
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
        """Queue a request. Raises InvalidArgument for inconsistent inputs or a response format that
        does not compile, ResourceExhausted when full. Compiles the format here, on the caller's thread."""
        self._validate(req)
        if req.response_format is not None:
            if not isinstance(req.response_format, ResponseFormat):
                raise InvalidArgument("response_format must be a shelfsight.formats.ResponseFormat")
            req.grammar = self.grammars().compile(req.response_format)
        with self._cv:
            if self._stop:
                raise Unavailable("the engine is shutting down")
            self.scheduler.enqueue(req)
            self._cv.notify()

    def load(self) -> tuple[int, int]:
        """(running, waiting) right now."""
        with self._cv:
            return self.scheduler.running, len(self.scheduler.waiting)

    def grammars(self) -> Grammars:
        """The engine's compiled response formats (the vocabulary is read on the first call, ~1 s)."""
        with self._grammars_lock:
            if self._grammars is None:
                try:
                    self._grammars = Grammars(self.tokenizer, self.model.lm_head.weight.shape[0])
                except ImportError as e:
                    raise FailedPrecondition(f"structured answers need xgrammar: {e}") from None
            return self._grammars

    def _validate(self, req: Request) -> None:
        check_inputs(req, self.pixels)
        total = req.input_ids.numel() + req.params.max_new_tokens
        if total > self.config.max_model_len:
            raise InvalidArgument(f"prompt ({req.input_ids.numel()} tokens) + max_new_tokens "
                                  f"({req.params.max_new_tokens}) exceeds the model length {self.config.max_model_len}")

    # ---- engine thread ----
    def _loop(self) -> None:
        """Each turn: admit and prefill, launch the next decode step, then stream the previous step's
        tokens while the device computes (a row that finished there got one more, unused, token). With
        constrained rows the launch is the forward only; its sampling follows the read of step t."""
        pending = None
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stop and not self.scheduler.waiting and not self._busy():
                        self._cv.wait(timeout=1.0)
                    if self._stop and not self._busy() and not self.scheduler.waiting:
                        return
                    if self._abort:
                        self._fail_all(Unavailable("the model server is shutting down"))
                        return
                    admitted, cancelled = self.scheduler.admit()
                for req in cancelled:
                    req.sink.fail(CANCELLED)
                try:
                    if admitted:
                        self._prefill_group(admitted)
                    if self.prefilling:
                        self._prefill_chunk()
                    launched = self._launch() if len(self.batch) else None
                    got = self._read(*pending) if pending is not None else None
                    if launched is not None and isinstance(launched[1], Forwarded):
                        launched = self._launch_masked(*launched)  # it needed step t's tokens
                    if got is not None:
                        self._emit(*got)
                    pending = launched if len(self.batch) else None
                except Exception as e:  # the batch is lost; every request in it gets the error
                    log.exception("engine step failed")
                    pending = None
                    self._fail_running(Unavailable(f"generation failed: {type(e).__name__}: {e}"))
                self.observer.step(*self.load())

    def _busy(self) -> bool:
        return bool(len(self.batch) or self.prefilling)

    def _finish(self, rows: list[Row]) -> None:
        for row in rows:
            row.matcher = None  # a row still in a launched step then samples unmasked (its token is dropped)
            self.batch.remove(row.slot)
            self.runner.release(row.slot)
            with self._cv:
                self.scheduler.release(row.slot)

    def _fail_running(self, error: ShelfsightError) -> None:
        rows = self.batch.rows()
        for row in rows:
            row.req.sink.fail(error)
        self._finish(rows)
        self.runner.reset()

    def _drop_prefilling(self, rows: list[Row], error: ShelfsightError) -> None:
        """Rows that never reached the batch: their requests end with `error`, their slots are freed
        (even if a sink fails to take the error)."""
        for row in rows:
            try:
                row.req.sink.fail(error)
            except Exception:
                log.exception("a request's sink failed to take its error")
            finally:
                with self._cv:
                    self.scheduler.release(row.slot)

    def _fail_all(self, error: ShelfsightError) -> None:  # called under the lock
        for req in self.scheduler.drain():
            req.sink.fail(error)
        for row in self.prefilling.clear() if self.prefilling else []:
            row.req.sink.fail(error)
            self.scheduler.release(row.slot)
        for row in self.batch.rows():
            row.req.sink.fail(error)
            row.matcher = None
            self.batch.remove(row.slot)
            self.scheduler.release(row.slot)
        self.runner.reset()

    def _prefill_group(self, admitted: list[tuple[Request, int]]) -> None:
        """Admitted requests: their pictures through the vision tower (one pass for the group), then
        queued for chunked prefill (slot runner) or prefilled at once through transformers (reference)."""
        rows = [Row(req, slot, sampling.seed_for(req.params), IncrementalDetokenizer(self.tokenizer))
                for req, slot in admitted]
        reqs = [r.req for r in rows]
        try:
            feats = vision(self.model, reqs, self.vision_cache, self.observer, self.pixels)
            if self.prefilling is not None:
                self.prefilling.add(rows, feats)
                return
            pre = prefill(self.model, reqs, feats)
        except Exception as e:
            if len(rows) == 1:
                log.exception("prefill failed")
                self._drop_prefilling(rows, Unavailable(f"prefill failed: {type(e).__name__}: {e}"))
                return
            # isolate the culprit: each request again on its own
            for pair in admitted:
                self._prefill_group([pair])
            return
        for r, n, d in zip(rows, pre.lengths, pre.deltas):
            r.length, r.delta = n, d
        self._join(rows, pre)

    def _prefill_chunk(self) -> None:
        """One chunk of the queued prompts (slot_prefill.py); rows whose prompt it completed join the
        batch. Every row the chunk hands back ends up in the batch or failed with its slot freed."""
        chunk = self.prefilling.step(decoding=bool(len(self.batch)))
        settled = []
        try:
            if chunk.cancelled:
                self._drop_prefilling(chunk.cancelled, CANCELLED)
            settled += chunk.cancelled
            if chunk.failed:
                e = chunk.error
                self._drop_prefilling(chunk.failed, Unavailable(f"prefill failed: {type(e).__name__}: {e}"))
            settled += chunk.failed
            if chunk.finished:
                self._join(chunk.finished, chunk.logits)
            settled += chunk.finished
        finally:
            done = {id(r) for r in settled}
            lost = [r for r in chunk.cancelled + chunk.failed + chunk.finished
                    if id(r) not in done and self.batch.get(r.slot) is not r]
            if lost:
                self._drop_prefilling(lost, Unavailable("prefill failed"))

    def _join(self, rows: list[Row], prefilled) -> None:
        """Rows whose prompts are in the runner (`prefilled`: their logits, or the reference runner's
        Prefilled) get their first tokens and join the batch."""
        for r in rows:
            self.batch.add(r)
        tokens = self.runner.start(rows, prefilled, self._first_masks(rows))
        self._emit(rows, tokens, self._advance(rows, tokens))

    def _launch(self):
        """Launch the next step: whole, or (constrained rows) its forward only."""
        rows = self.batch.rows()
        if self.batch.constrained():
            step = self.runner.launch_forward(rows)
        else:
            step = self.runner.launch(rows, self.batch.greedy())
        for r in rows:
            r.length += 1
        return rows, step

    def _launch_masked(self, rows: list[Row], fwd: Forwarded):
        return rows, self.runner.launch_sample(fwd, self._masks.fill_slots(rows))

    def _read(self, rows: list[Row], step) -> tuple[list[Row], list[int], list[Row]]:
        """A step's tokens for the rows still running, with the grammars advanced by them."""
        live = [(r, t) for r, t in zip(rows, step.tokens()) if self.batch.get(r.slot) is r]
        rows, tokens = [r for r, _ in live], [t for _, t in live]
        return rows, tokens, self._advance(rows, tokens)

    def _emit(self, rows: list[Row], tokens: list[int], refused: list[Row]) -> None:
        if refused:
            for r in refused:
                r.req.sink.fail(Internal("the response format's grammar refused the sampled token"))
            self._finish(refused)
            gone = {id(r) for r in refused}
            keep = [(r, t) for r, t in zip(rows, tokens) if id(r) not in gone]
            rows, tokens = [r for r, _ in keep], [t for _, t in keep]
        self._finish(self.output.emit(rows, tokens))

    # ---- structured answers ----
    def _first_masks(self, rows: list[Row]):
        """Matchers for the newly admitted constrained rows -> their first token's masks, or None."""
        constrained = [r for r in rows if r.req.grammar is not None]
        if not constrained:
            return None
        if self._masks is None:
            self._masks = RowMasks(self.config.max_batch, self.model.lm_head.weight.shape[0],
                                   pin=self.device.type == "cuda")
        for r in constrained:
            r.matcher = self.grammars().matcher(r.req.grammar)
        return self._masks.fill_rows(rows)

    def _advance(self, rows: list[Row], tokens: list[int]) -> list[Row]:
        """Constrained rows' matchers take their tokens; returns the rows whose token was refused."""
        if self._masks is None:
            return []
        refused = self._masks.advance(rows, tokens)
        for r in refused:
            log.error("grammar refused token for slot %d; failing the request", r.slot)
            r.matcher = None
        return refused
