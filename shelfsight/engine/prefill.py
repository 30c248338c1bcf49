"""Prefill, shared by both runners: eager transformers for the vision tower (or the vision-feature
cache), the M-RoPE indices and deepstack features, and one forward over the prompts of several new
requests at once, left-padded, into a transformers DynamicCache ([k, kv_heads, L, head_dim] per layer).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from shelfsight.engine.api import Request
from shelfsight.model import qwen


class VisionCache:
    """LRU of per-picture vision features (merged embeddings + deepstack layers), bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.used = max_bytes, 0
        self._items: OrderedDict[str, tuple[torch.Tensor, list[torch.Tensor], int]] = OrderedDict()

    def get(self, key: str):
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
            return item[0], item[1]
        return None

    def put(self, key: str, embeds: torch.Tensor, deepstack: list[torch.Tensor]) -> None:
        size = embeds.numel() * embeds.element_size() + sum(d.numel() * d.element_size() for d in deepstack)
        if size > self.max_bytes or key in self._items:
            return
        while self.used + size > self.max_bytes:
            _, (_, _, freed) = self._items.popitem(last=False)
            self.used -= freed
        self._items[key] = (embeds, deepstack, size)
        self.used += size


@dataclass
class Prefilled:
    cache: object  # transformers DynamicCache, k rows, left-padded to L
    mask: torch.Tensor  # [k, L] 1 = real token
    lengths: list[int]  # prompt tokens per row
    deltas: list[int]  # M-RoPE offsets per row
    logits: torch.Tensor  # [k, V] float32, last prompt position


def vision(model, reqs: list[Request], cache: VisionCache, observer) -> list:
    """Per-request (embeds [n, H], deepstack list of [n, H]) from the cache or one vision pass."""
    device = model.device
    found = [cache.get(r.image_key) if cache.max_bytes else None for r in reqs]
    if cache.max_bytes:  # with the cache off there is nothing to count
        for f in found:
            observer.vision_cache(f is not None)
    # rows whose picture an earlier row of this group already brings (another question about the same
    # photo, the common case) share its features instead of running the vision tower again
    first = {}
    for i, f in enumerate(found):
        if f is None:
            first.setdefault(reqs[i].image_key or f"row {i}", i)
    todo = sorted(first.values())
    if todo:
        pv = torch.cat([reqs[i].pixel_values for i in todo]).to(device)
        grid = torch.stack([reqs[i].grid_thw for i in todo]).to(device)
        out = model.model.get_image_features(pv, grid, return_dict=True)
        for j, i in enumerate(todo):
            embeds = out.pooler_output[j]
            deep = [layer[j] for layer in out.deepstack_features]
            found[i] = (embeds, deep)
            if cache.max_bytes:
                cache.put(reqs[i].image_key, embeds, deep)
        for i, f in enumerate(found):
            if f is None:
                found[i] = found[first[reqs[i].image_key]]
    return found


def prefill(model, reqs: list[Request], feats: list) -> Prefilled:
    """One forward over the k prompts (left-padded), as transformers' generate() runs it."""
    from transformers import DynamicCache
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    dev, k = model.device, len(reqs)
    lengths = [r.input_ids.numel() for r in reqs]
    L = max(lengths)
    ids = torch.full((k, L), qwen.ENDOFTEXT_ID, dtype=torch.long)
    mask = torch.zeros((k, L), dtype=torch.long)
    for i, r in enumerate(reqs):
        ids[i, L - lengths[i]:] = r.input_ids
        mask[i, L - lengths[i]:] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    mm_types = (ids == qwen.IMAGE_PAD_ID).long()
    grid = torch.stack([r.grid_thw for r in reqs]).to(dev)
    encoder = BaseModelOutputWithDeepstackFeatures(
        pooler_output=tuple(f[0] for f in feats),
        deepstack_features=[tuple(f[1][layer] for f in feats) for layer in range(len(feats[0][1]))])
    vision_pos, deltas = model.model.get_rope_index(ids, mm_types, image_grid_thw=grid, attention_mask=mask)
    text_pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate() fills padding
    position_ids = torch.cat([text_pos[None], vision_pos], dim=0)  # [4, k, L]
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, cache=cache,
                mm_encoder_outputs={"image": encoder}, image_grid_thw=grid, mm_token_type_ids=mm_types,
                use_cache=True, logits_to_keep=1)
    return Prefilled(out.cache, mask, lengths, [int(d) for d in deltas.view(-1).tolist()],
                     out.logits[:, -1].float())
