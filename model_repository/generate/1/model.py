"""Triton adapter: model inputs -> streamed text (decoupled).

execute() only hands requests to shelfsight.engine.Engine and returns; the engine batches them
continuously on its own thread and streams each request's text deltas back through its response
sender, the last response flagged final. Engine metrics are exported as Triton custom metrics.
When the launcher stops the server it says how long requests may still take (the stop note,
shelfsight/serving/lifecycle.py); the engine finishes what it can in that time and fails the rest.
"""
import json

import torch

from shelfsight import params as params_mod
from shelfsight.engine import Engine, Observer, Request
from shelfsight.errors import InvalidArgument
from shelfsight.formats import ResponseFormat
from shelfsight.model.checkpoint import load_model
from shelfsight.model.preprocessing import load_policy
from shelfsight.params import GenerationParams
from shelfsight.serving import contract, lifecycle, manifest as manifest_mod
from shelfsight.serving.tritonpy import answer, array, error_response, model_dir_repo, scalar, text

import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]


class Sink:
    """Engine output -> Triton responses for one request."""

    def __init__(self, sender):
        self.sender = sender

    def is_cancelled(self) -> bool:
        return self.sender.is_cancelled()

    def send(self, delta, prompt_tokens, completion_tokens, finish_reason):
        self.sender.send(answer(delta.encode("utf-8"), prompt_tokens, completion_tokens, (finish_reason or "").encode()),
                         flags=FINAL if finish_reason else 0)

    def fail(self, error):
        self.sender.send(error_response(error), flags=FINAL)


class TritonObserver(Observer):
    """Engine events -> Prometheus families on Triton's metrics port (names per notes/anchors.md)."""

    def __init__(self, model_name: str):
        labels = {"model": model_name}

        self._families = []  # a MetricFamily must outlive its Metrics: keep them all here

        def family(name, kind, doc):
            self._families.append(pb_utils.MetricFamily(name=name, description=doc, kind=kind))
            return self._families[-1]

        H, C, G = pb_utils.MetricFamily.HISTOGRAM, pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        self.ttft = family("shelfsight_engine_time_to_first_token_seconds", H, "Arrival to first token").Metric(
            labels=labels, buckets=LATENCY_BUCKETS)
        self.e2e = family("shelfsight_engine_e2e_request_latency_seconds", H, "Arrival to last token").Metric(
            labels=labels, buckets=LATENCY_BUCKETS)
        self.tpot = family("shelfsight_engine_time_per_output_token_seconds", H,
                           "Decode time per output token after the first").Metric(
            labels=labels, buckets=[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5])
        self.prompt = family("shelfsight_engine_prompt_tokens_total", C, "Prompt tokens processed").Metric(labels=labels)
        self.completion = family("shelfsight_engine_generation_tokens_total", C, "Tokens generated").Metric(labels=labels)
        self.running = family("shelfsight_engine_requests_running", G, "Requests holding a KV-cache slot (decoding, or being prefilled)").Metric(labels=labels)
        self.waiting = family("shelfsight_engine_requests_waiting", G, "Requests queued for the engine").Metric(labels=labels)
        vc = family("shelfsight_engine_vision_cache_lookups_total", C, "Vision-feature cache lookups by result")
        self.vc_hit, self.vc_miss = vc.Metric(labels={**labels, "result": "hit"}), vc.Metric(labels={**labels, "result": "miss"})

    def first_token(self, seconds):
        self.ttft.observe(seconds)

    def finished(self, prompt_tokens, completion_tokens, e2e_seconds, decode_seconds):
        self.e2e.observe(e2e_seconds)
        self.prompt.increment(prompt_tokens)
        self.completion.increment(completion_tokens)
        if completion_tokens > 1:
            self.tpot.observe(decode_seconds / (completion_tokens - 1))

    def step(self, running, waiting):
        self.running.set(running)
        self.waiting.set(waiting)

    def vision_cache(self, hit):
        (self.vc_hit if hit else self.vc_miss).increment(1)

    def close(self):
        """Release every Metric, then their families: the backend requires that order, and leaving it
        to interpreter teardown crashed the stub on every shutdown."""
        for name in ("ttft", "e2e", "tpot", "prompt", "completion", "running", "waiting", "vc_hit", "vc_miss"):
            setattr(self, name, None)
        self._families.clear()


class TritonPythonModel:
    def initialize(self, args):
        m = self.manifest = manifest_mod.load(model_dir_repo(args))
        # Always, GPU included: torch's default (one thread per core) made a launch-bound decode step
        # 2.7x slower at 16 threads than at 2 (notes/gpu-engine.md).
        torch.set_num_threads(max(1, m.generate_threads))
        device = m.device
        if device == "cuda" and args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        from transformers import AutoTokenizer

        path = m.served("generator").path
        model = load_model(path, device=device, dtype=m.dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        self.observer = TritonObserver(args["model_name"])
        self.engine = Engine(model, tokenizer, m.engine, self.observer,
                             load_policy(path, m.pixels.min_pixels, m.pixels.max_pixels))
        self.engine.start()
        # Triton waits for in-flight requests before it unloads (and calls finalize), and nothing it
        # does ends a request that is decoding: the note is how they end in time
        self.stop_note = lifecycle.StopNoteWatch(self._stopping)

    def _stopping(self, drain_seconds: float) -> None:
        pb_utils.Logger.log_info(f"generate: stopping; in-flight requests get {drain_seconds:.1f}s")
        self.engine.stop(timeout=drain_seconds)

    def _request(self, request) -> Request:
        raw = scalar(request, contract.PARAMS, lambda v: v)
        if raw is None:
            raise InvalidArgument(f"{contract.PARAMS} is required")
        params = GenerationParams.from_json(raw, self.manifest.limits)
        ids, pixels, grid = (array(request, n) for n in (contract.INPUT_IDS, contract.PIXELS, contract.IMAGE_GRID_THW))
        if ids is None or pixels is None or grid is None:
            raise InvalidArgument(f"{contract.INPUT_IDS}, {contract.PIXELS} and {contract.IMAGE_GRID_THW} are required")
        keys = array(request, contract.IMAGE_KEY)
        keys = [] if keys is None else [k.decode() if isinstance(k, bytes) else str(k) for k in keys.reshape(-1)]
        grid = torch.tensor(grid.reshape(-1, 3), dtype=torch.int64)
        # Copies, not views: execute() returns before the engine reads these, and the input tensors
        # live in Triton's shared memory, which is reused for other requests once the call returns.
        fmt = text(request, contract.STEP_FORMAT)  # checked again: `generate` may be called directly
        stop = text(request, contract.STEP_STOP)
        try:
            stop = params_mod.check_stop(json.loads(stop)) if stop else ()
        except ValueError:
            raise InvalidArgument(f"{contract.STEP_STOP} must be a JSON list of strings") from None
        return Request(input_ids=torch.tensor(ids.reshape(-1), dtype=torch.int64),
                       pixels=torch.tensor(pixels.reshape(-1)),
                       grid_thw=grid, image_keys=tuple(keys) if keys else ("",) * grid.shape[0],
                       params=params, sink=Sink(request.get_response_sender()),
                       response_format=ResponseFormat.from_json(fmt) if fmt else None, stop=stop)

    def execute(self, requests):
        for request in requests:
            try:
                self.engine.submit(self._request(request))
            except Exception as e:
                request.get_response_sender().send(error_response(e), flags=FINAL)
        return None

    def finalize(self):
        # The drain already gave in-flight requests their chance; what is left now gets an error, and
        # the engine thread is gone before the stub tears down
        self.stop_note.close()
        self.engine.stop(timeout=2.0)
        self.engine = None  # it holds the observer too
        self.observer.close()
