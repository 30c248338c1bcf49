"""Triton adapter: image bytes + question, or a conversation and its pictures (+ optional parameters)
-> model inputs.

The work is shelfsight.model.preprocessing.Preprocessor; this file only moves tensors. Requests of one
batch are processed on a small thread pool (Pillow and torch release the GIL while decoding and
resizing). A bad request gets its own error; the rest of the batch is unaffected.
"""
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from shelfsight import params
from shelfsight.conversation import Conversation
from shelfsight.errors import InvalidArgument
from shelfsight.formats import ResponseFormat
from shelfsight.model.preprocessing import load_preprocessor
from shelfsight.serving import contract, manifest as manifest_mod
from shelfsight.serving.tritonpy import array, error_response, model_dir_repo, pictures, scalar, tensor, text

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.manifest = manifest_mod.load(model_dir_repo(args))
        m = self.manifest
        torch.set_num_threads(max(1, m.preprocess_threads))
        self.pre = load_preprocessor(m.served("generator").path, m.pixels.min_pixels, m.pixels.max_pixels, m.image_limits, m.limits)
        self.pool = ThreadPoolExecutor(max_workers=max(1, m.preprocess_threads), thread_name_prefix="preprocess")

    def _inputs(self, request, enhance: bool):
        """Either form of the contract (shelfsight/serving/contract.py), never both."""
        messages = text(request, contract.MESSAGES)
        image = array(request, contract.IMAGE)
        if messages is None:
            if image is None:
                raise InvalidArgument(f"{contract.IMAGE} and {contract.QUESTION}, or {contract.MESSAGES}, are required")
            return self.pre(image.reshape(-1).tobytes(), text(request, contract.QUESTION, required=True),
                            text(request, contract.SYSTEM), enhance)
        for name in (contract.IMAGE, contract.QUESTION, contract.SYSTEM):
            if array(request, name) is not None:
                raise InvalidArgument(f"{contract.MESSAGES} carries the whole conversation: send {name} "
                                      f"{'as a system turn' if name == contract.SYSTEM else 'in it'}, not beside it")
        return self.pre.converse(pictures(request, contract.IMAGES, contract.IMAGE_SIZES),
                                 Conversation.from_json(messages), enhance)

    @staticmethod
    def _format(request) -> str:
        """RESPONSE_FORMAT checked (the grammar itself is compiled by `generate`), as canonical JSON; "" if absent."""
        raw = text(request, contract.RESPONSE_FORMAT)
        return ResponseFormat.from_json(raw).to_json() if raw else ""

    @staticmethod
    def _stop(request) -> str:
        raw = text(request, contract.STOP)
        if not raw:
            return ""
        try:
            stop = json.loads(raw)
        except ValueError:
            raise InvalidArgument(f"{contract.STOP} must be a JSON list of strings") from None
        return json.dumps(list(params.check_stop(stop)), ensure_ascii=False)

    def _one(self, request):
        try:
            gen = params.resolve(self.manifest.generation, self.manifest.limits,
                                 **{field: scalar(request, contract.OPTIONAL[field][0], rule.cast)
                                    for field, rule in params.RULES.items()})
            enhance = bool(scalar(request, contract.ENHANCE, bool) or False)
            inputs = self._inputs(request, enhance)
            budget = self.manifest.engine.max_model_len
            if len(inputs.input_ids) + gen.max_new_tokens > budget:  # the engine checks too; this names why
                raise InvalidArgument(
                    f"the prompt is {len(inputs.input_ids)} tokens ({inputs.image_tokens} of them for "
                    f"{len(inputs.image_keys)} picture(s)) + max_new_tokens {gen.max_new_tokens}; the model "
                    f"length is {budget}: send fewer or smaller pictures, or less text")
            return pb_utils.InferenceResponse([
                tensor(contract.INPUT_IDS, inputs.input_ids[None]),
                tensor(contract.PIXELS, inputs.pixels[None]),
                tensor(contract.IMAGE_GRID_THW, inputs.image_grid_thw[None]),
                tensor(contract.IMAGE_KEY, np.array([[k.encode() for k in inputs.image_keys]], dtype=object)
                       .reshape(1, len(inputs.image_keys))),
                tensor(contract.PARAMS, np.array([[gen.to_json()]], dtype=object)),
                tensor(contract.STEP_FORMAT, np.array([[self._format(request).encode()]], dtype=object)),
                tensor(contract.STEP_STOP, np.array([[self._stop(request).encode()]], dtype=object)),
            ])
        except Exception as e:  # typed errors keep their code; anything else becomes INTERNAL
            return error_response(e)

    def execute(self, requests):
        return list(self.pool.map(self._one, requests))

    def finalize(self):
        self.pool.shutdown(wait=False)
