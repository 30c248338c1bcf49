"""Triton adapter: (query, document) -> relevance in (0, 1) (Qwen3-VL-Reranker's format and score).

The work is shelfsight.engine.Encoder over the prompt of shelfsight/model/retrieval.py; the request
handling and batching are in shelfsight/serving/encoders.py. This file says what a request is.
"""
import numpy as np

from shelfsight.engine import Prompt
from shelfsight.errors import InvalidArgument
from shelfsight.model.retrieval import Side, check_side, rerank_messages
from shelfsight.serving import contract
from shelfsight.serving.encoders import EncoderModel
from shelfsight.serving.tritonpy import tensor

import triton_python_backend_utils as pb_utils


class TritonPythonModel(EncoderModel):
    name = contract.RERANK

    def prompt(self, request):
        images = self.pictures(request)
        first = self.scalar(request, contract.QUERY_IMAGES, int, 0)
        if not 0 <= first <= len(images):
            raise InvalidArgument(f"{contract.QUERY_IMAGES} is {first}, but {len(images)} pictures were sent")
        limits = self.manifest.limits
        query = check_side("query", Side(first, self.text(request, contract.QUERY)), limits)
        document = check_side("document", Side(len(images) - first, self.text(request, contract.DOCUMENT)), limits)
        messages = rerank_messages(query, document, self.text(request, contract.INSTRUCTION))
        return Prompt.of(self.pre.render(messages, images)), None

    def compute(self, prompts, extras):
        return self.encoder.score(prompts).tolist()

    def respond(self, score, prompt, extra):
        return pb_utils.InferenceResponse([tensor(contract.SCORE, np.array([[score]], dtype=np.float32)),
                                           self.tokens(prompt)])
