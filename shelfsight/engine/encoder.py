"""The encoder: the embedding and reranking models' forward. Prefill only - no KV cache kept, no
decoding - over many prompts at once, left-padded, grouped so that a forward holds at most
`max_batch_tokens` padded tokens (prompts sorted by length first, so rows of a group pad little).

    hidden(prompts) -> [k, H] float32  the final hidden state at each prompt's last token
    embed(prompts, dims) -> [k, d]     its first d dimensions, L2-normalised (Matryoshka)
    score(prompts) -> [k]              sigmoid((w_yes - w_no) . h), w the lm_head rows of "yes" and "no"

The vision tower runs once per distinct picture of a group, and recent pictures' features are cached
(a query photo reranked against N catalog items is encoded once). Called from one thread (the Triton
model's execute()); nothing here keeps state between calls but that cache.
"""
from __future__ import annotations

import torch

from shelfsight.engine.api import Observer, Prompt, SafeObserver
from shelfsight.engine.config import EncoderConfig
from shelfsight.engine.core import check_inputs
from shelfsight.engine.prefill import VisionCache, encode, vision
from shelfsight.errors import FailedPrecondition, InvalidArgument
from shelfsight.model.preprocessing import PixelPolicy
from shelfsight.model.retrieval import NO, YES

KINDS = ("embedding", "reranker")


class Encoder:
    def __init__(self, model, tokenizer, kind: str, config: EncoderConfig = EncoderConfig(),
                 observer: Observer | None = None, pixels: PixelPolicy | None = None):
        if kind not in KINDS:
            raise InvalidArgument(f"encoder kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.model, self.kind, self.config = model, kind, config
        self.pixels = pixels or PixelPolicy.of_model(model.config)  # as the Engine's
        self.width = model.config.text_config.hidden_size
        self.vision_cache = VisionCache(config.vision_cache_bytes)
        self.observer = SafeObserver(observer or Observer())
        self.direction = None
        if kind == "reranker":
            vocab = tokenizer.get_vocab()
            if YES not in vocab or NO not in vocab:
                raise FailedPrecondition(f"the reranker's tokenizer has no single tokens {YES!r} and {NO!r}")
            rows = model.get_output_embeddings().weight
            # [H]: the score's logit difference as one dot product with the final hidden state
            self.direction = (rows[vocab[YES]].float() - rows[vocab[NO]].float()).to(model.device)

    def check(self, prompt: Prompt) -> None:
        """A prompt this encoder can take (the Triton model refuses the one request, not the batch)."""
        check_inputs(prompt, self.pixels)
        if prompt.input_ids.numel() > self.config.max_len:
            raise InvalidArgument(f"the input is {prompt.input_ids.numel()} tokens; the limit is {self.config.max_len}")

    def groups(self, prompts: list[Prompt]) -> list[list[int]]:
        """Indices of `prompts` in forward-sized groups: shortest first, each group's rows x its
        longest prompt within max_batch_tokens (a prompt alone always makes a group)."""
        order = sorted(range(len(prompts)), key=lambda i: prompts[i].input_ids.numel())
        out, group = [], []
        for i in order:
            n = prompts[i].input_ids.numel()  # the longest so far: sorted ascending
            if group and (len(group) + 1) * n > self.config.max_batch_tokens:
                out.append(group)
                group = []
            group.append(i)
        if group:
            out.append(group)
        return out

    def hidden(self, prompts: list[Prompt]) -> torch.Tensor:
        """-> [k, H] float32, in `prompts` order."""
        out = torch.empty(len(prompts), self.width, dtype=torch.float32)
        with torch.inference_mode():
            for group in self.groups(prompts):
                reqs = [prompts[i] for i in group]
                h = encode(self.model, reqs, vision(self.model, reqs, self.vision_cache, self.observer, self.pixels))
                out[group] = h.cpu()
        return out

    def embed(self, prompts: list[Prompt], dims: list[int]) -> list[torch.Tensor]:
        """Each prompt's embedding at its Matryoshka size (0 = full width): [d_i] float32, unit norm."""
        for d in dims:
            if not 0 <= d <= self.width:
                raise InvalidArgument(f"dimensions must be between 1 and {self.width} (0 = {self.width}), got {d}")
        h = self.hidden(prompts)
        return [torch.nn.functional.normalize(row[:d or self.width], dim=0) for row, d in zip(h, dims)]

    def score(self, prompts: list[Prompt]) -> torch.Tensor:
        """-> [k] float32 relevance in (0, 1)."""
        if self.direction is None:
            raise FailedPrecondition("this encoder is an embedding model; scores come from a reranker")
        return torch.sigmoid(self.hidden(prompts) @ self.direction.cpu())
