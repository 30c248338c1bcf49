"""Triton adapter: the unary face of the decoupled `generate` model.

The `pipeline` ensemble must answer plain (unary) infer calls, which a decoupled step cannot, so this
model is not decoupled. Yet each request is answered when its own stream ends, never held back by the
others that arrived with it: execute() hands every request to a thread of its own and returns None at
once, so the instance is free for the next batch. The thread forwards the request to `generate` over
BLS, joins the streamed deltas and sends the one final response through the request's response
sender (a non-decoupled Python model may send exactly one). A blocking execute() made every batch
wait for its slowest answer, and the instances took concurrent requests in waves (issue 14).

Threads, not `async def execute`: for a non-decoupled model Triton 2.51's stub runs the coroutine to
completion before taking the next batch, and a BLS stream's iterator blocks on every response anyway.
The weights stay in `generate`'s process only; streams started together decode in its batch.

Each finished stream outlives the stub's own reference to it (outlive_stub_cleanup): without that,
32 clients crashed Triton 2.51's stub within 5-25 s.
"""
import json
import threading
import time


from shelfsight.errors import Internal
from shelfsight.serving import contract
from shelfsight.serving.tritonpy import answer, error_response

import triton_python_backend_utils as pb_utils

TARGET = "generate"
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# Answers in flight per instance, per slot of the engine's batch: enough that the engine's own queue,
# not this model, decides who decodes next; past it, requests wait in Triton's queue for `collect`.
IN_FLIGHT_PER_BATCH_SLOT = 4


def _value(response, name):
    t = pb_utils.get_output_tensor_by_name(response, name)
    return None if t is None else t.as_numpy().reshape(-1)[0]


def join(stream) -> "pb_utils.InferenceResponse":
    """generate's streamed deltas -> one response with the whole text and the final counts."""
    parts, prompt, completion, finish = [], 0, 0, b""
    for response in stream:
        if response.has_error():
            return pb_utils.InferenceResponse(error=response.error())
        if _value(response, contract.TEXT) is None:  # an empty final flag
            continue
        parts.append(_value(response, contract.TEXT))
        prompt = int(_value(response, contract.PROMPT_TOKENS))
        completion = int(_value(response, contract.COMPLETION_TOKENS))
        finish = _value(response, contract.FINISH_REASON) or finish
    if not finish:
        return error_response(Internal("generate ended its stream without a final answer"))
    return answer(b"".join(parts), prompt, completion, finish)


def outlive_stub_cleanup(stream, sender) -> None:
    """Return only once the stub has dropped its own reference to a finished BLS stream, so that the
    caller's reference is the last one and the stream dies in a Python thread, holding the GIL.

    Triton 2.51's stub keeps every BLS stream in a map and drops that entry on its stub-to-parent
    thread, some time after the stream's last response was read. If the stub's reference is the last,
    the stream's responses and their numpy arrays are freed on that thread without the GIL (2.51's
    tensor destructor does not take it) while this model's threads run Python: the heap corrupts and
    the stub dies ("unaligned fastbin chunk", segfaults in libpython; tritonserver then aborts). The
    same thread serves is_cancelled() in order, after the cleanup the last read queued, and is_cancelled()
    waits for its answer: when it returns, the stub's entry is gone.
    """
    try:
        sender.is_cancelled()
    except Exception as e:  # the request is gone (server stopping): the answer cannot be sent anyway
        pb_utils.Logger.log_warn(f"collect: could not wait for the stub's stream cleanup: {e}")


class TritonPythonModel:
    def initialize(self, args):
        max_batch = max(1, json.loads(args["model_config"]).get("max_batch_size", 1))
        self.slots = threading.BoundedSemaphore(IN_FLIGHT_PER_BATCH_SLOT * max_batch)
        self.threads: set[threading.Thread] = set()
        self.lock = threading.Lock()

    def _answer(self, sender, inputs):
        stream = None
        try:
            bls = pb_utils.InferenceRequest(model_name=TARGET, inputs=inputs, requested_output_names=list(contract.OUTPUTS))
            stream = bls.exec(decoupled=True)  # returns at generate's first response
            response = join(stream)
        except Exception as e:
            response = error_response(e)
        if stream is not None:
            outlive_stub_cleanup(stream, sender)
        try:
            sender.send(response, flags=FINAL)
        except Exception as e:  # the request is already gone (server stopping): nobody to tell
            pb_utils.Logger.log_error(f"collect: could not send an answer: {e}")
        finally:
            with self.lock:
                self.threads.discard(threading.current_thread())
            self.slots.release()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                # Copies: the inputs live in Triton's shared memory, reused once execute() returns
                inputs = [pb_utils.Tensor(t.name(), t.as_numpy().copy())
                          for t in (pb_utils.get_input_tensor_by_name(request, n) for n in contract.STEP_INPUTS) if t is not None]
            except Exception as e:
                sender.send(error_response(e), flags=FINAL)
                continue
            self.slots.acquire()  # full: this batch waits here, and later ones in Triton's queue
            thread = threading.Thread(target=self._answer, args=(sender, inputs), name="collect", daemon=True)
            with self.lock:
                self.threads.add(thread)
            thread.start()
        return None

    def finalize(self):
        # Triton's exit timeout already gave in-flight requests their chance; generate fails what is
        # left, which ends these threads' streams. Wait briefly so none outlives the stub's teardown.
        deadline = time.monotonic() + 5.0
        with self.lock:
            threads = list(self.threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
