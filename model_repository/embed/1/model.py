"""Triton adapter: text and/or pictures -> a unit-norm embedding (Qwen3-VL-Embedding's format).

The work is shelfsight.engine.Encoder over the prompt of shelfsight/model/retrieval.py; the request
handling and batching are in shelfsight/serving/encoders.py. This file says what a request is.
"""
import numpy as np

from shelfsight.engine import Prompt
from shelfsight.model.retrieval import Side, check_side, embedding_messages
from shelfsight.serving import contract
from shelfsight.serving.encoders import EncoderModel
from shelfsight.serving.tritonpy import tensor

import triton_python_backend_utils as pb_utils


class TritonPythonModel(EncoderModel):
    name = contract.EMBED

    def prompt(self, request):
        images = self.pictures(request)
        item = check_side("input", Side(len(images), self.text(request, contract.CONTENT)), self.manifest.limits)
        messages = embedding_messages(item, self.text(request, contract.INSTRUCTION))
        dims = self.scalar(request, contract.DIMENSIONS, int, 0) or self.manifest.encoder.dimensions
        return Prompt.of(self.pre.render(messages, images)), dims

    def compute(self, prompts, extras):
        return self.encoder.embed(prompts, extras)

    def respond(self, embedding, prompt, dims):
        return pb_utils.InferenceResponse([tensor(contract.EMBEDDING, embedding.numpy().astype(np.float32)[None]),
                                           self.tokens(prompt)])
