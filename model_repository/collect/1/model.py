"""Triton adapter: the unary face of the decoupled `generate` model.

The `pipeline` ensemble must answer plain (unary) infer calls, which a decoupled step cannot; this
model forwards each request to `generate` over BLS and joins the streamed deltas into one response.
All streams of a batch are started before any is read, so they decode together in the engine's
batch, and the model weights live in one process only.
"""
import numpy as np

from shelfsight.errors import Internal
from shelfsight.tritonpy import error_response, tensor

import triton_python_backend_utils as pb_utils

INPUTS = ("input_ids", "pixel_values", "image_grid_thw", "image_key", "max_new_tokens", "temperature",
          "top_p", "top_k", "repetition_penalty", "seed")
OUTPUTS = ["TEXT", "PROMPT_TOKENS", "COMPLETION_TOKENS", "FINISH_REASON"]


def _value(response, name):
    t = pb_utils.get_output_tensor_by_name(response, name)
    return None if t is None else t.as_numpy().reshape(-1)[0]


class TritonPythonModel:
    def initialize(self, args):
        self.target = "generate"

    def _start(self, request):
        inputs = [t for t in (pb_utils.get_input_tensor_by_name(request, n) for n in INPUTS) if t is not None]
        bls = pb_utils.InferenceRequest(model_name=self.target, inputs=inputs, requested_output_names=OUTPUTS)
        return bls.exec(decoupled=True)

    def _join(self, stream):
        parts, prompt, completion, finish = [], 0, 0, b""
        for response in stream:
            if response.has_error():
                return pb_utils.InferenceResponse(error=response.error())
            if _value(response, "TEXT") is None:  # an empty final flag
                continue
            parts.append(_value(response, "TEXT"))
            prompt, completion = int(_value(response, "PROMPT_TOKENS")), int(_value(response, "COMPLETION_TOKENS"))
            finish = _value(response, "FINISH_REASON") or finish
        if not finish:
            return error_response(Internal("generate ended its stream without a final answer"))
        return pb_utils.InferenceResponse([
            tensor("TEXT", np.array([[b"".join(parts)]], dtype=object)),
            tensor("PROMPT_TOKENS", np.array([[prompt]], dtype=np.int32)),
            tensor("COMPLETION_TOKENS", np.array([[completion]], dtype=np.int32)),
            tensor("FINISH_REASON", np.array([[finish]], dtype=object)),
        ])

    def execute(self, requests):
        streams = []
        for request in requests:
            try:
                streams.append(self._start(request))
            except Exception as e:
                streams.append(e)
        return [error_response(s) if isinstance(s, Exception) else self._join(s) for s in streams]
