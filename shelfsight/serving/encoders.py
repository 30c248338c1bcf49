"""The Triton side of the retrieval models (`embed`, `rerank`): a request's tensors -> a prompt in the
model's own format (shelfsight/model/retrieval.py) -> the encoder's forward, batched -> responses.

Only importable inside Triton's Python stub. `model_repository/{embed,rerank}/1/model.py` are thin
subclasses saying how a request becomes a prompt and what a response holds. A bad request gets its own
error; the rest of the batch is encoded together (and if the batch's forward fails, each prompt is
encoded alone, so only the culprit fails).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from shelfsight.engine import Encoder, Prompt
from shelfsight.model.checkpoint import load_model
from shelfsight.model.preprocessing import load_preprocessor
from shelfsight.serving import contract, manifest as manifest_mod
from shelfsight.serving.tritonpy import error_response, model_dir_repo, pictures, scalar, tensor, text


class EncoderModel:
    """Subclasses set `name` (contract.EMBED or RERANK) and implement prompt() and respond()."""

    name: str

    def initialize(self, args):
        m = self.manifest = manifest_mod.load(model_dir_repo(args))
        served = m.served(contract.ENCODER_KIND[self.name])
        torch.set_num_threads(max(1, m.generate_threads))
        device = m.device
        if device == "cuda" and args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        self.pre = load_preprocessor(served.path, m.pixels.min_pixels, m.pixels.max_pixels, m.image_limits, m.limits)
        model = load_model(served.path, device=device, dtype=m.dtype)
        self.encoder = Encoder(model, self.pre.tokenizer, contract.ENCODER_KIND[self.name], m.encoder,
                               pixels=self.pre.patchify.policy)
        self.pool = ThreadPoolExecutor(max_workers=max(1, m.preprocess_threads), thread_name_prefix=self.name)

    # ---- per request (on the pool) ----
    def pictures(self, request) -> list[bytes]:
        return pictures(request, contract.IMAGES, contract.IMAGE_SIZES)

    @staticmethod
    def text(request, name: str) -> str:
        return text(request, name) or ""

    @staticmethod
    def scalar(request, name: str, cast, default):
        value = scalar(request, name, cast)
        return default if value is None else value

    def prompt(self, request) -> tuple[Prompt, object]:
        """-> (the prompt, what respond() needs besides the forward's result)."""
        raise NotImplementedError

    def _parse(self, request):
        try:
            prompt, extra = self.prompt(request)
            self.encoder.check(prompt)
            return prompt, extra
        except Exception as e:  # noqa: BLE001 - this request's own error
            return e

    # ---- the batch ----
    def compute(self, prompts: list[Prompt], extras: list) -> list:
        """One result per prompt (the subclass's forward)."""
        raise NotImplementedError

    def respond(self, result, prompt: Prompt, extra) -> "pb_utils.InferenceResponse":
        raise NotImplementedError

    def execute(self, requests):
        parsed = list(self.pool.map(self._parse, requests))
        good = [i for i, p in enumerate(parsed) if not isinstance(p, Exception)]
        results: dict[int, object] = {}
        try:
            batch = self.compute([parsed[i][0] for i in good], [parsed[i][1] for i in good])
            results.update(zip(good, batch))
        except Exception:  # noqa: BLE001 - find the culprit: each prompt on its own
            for i in good:
                try:
                    results[i] = self.compute([parsed[i][0]], [parsed[i][1]])[0]
                except Exception as e:  # noqa: BLE001
                    results[i] = e
        out = []
        for i, p in enumerate(parsed):
            r = p if isinstance(p, Exception) else results[i]
            out.append(error_response(r) if isinstance(r, Exception) else self.respond(r, p[0], p[1]))
        return out

    @staticmethod
    def tokens(prompt: Prompt) -> "pb_utils.Tensor":
        return tensor(contract.PROMPT_TOKENS, np.array([[prompt.input_ids.numel()]], dtype=np.int32))

    def finalize(self):
        self.pool.shutdown(wait=False)
