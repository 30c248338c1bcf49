"""Prefill, shared by both runners and by the embedding and reranking models: eager transformers for
the vision tower (or the vision-feature cache, per picture), the M-RoPE indices over every picture of a
prompt and the deepstack features, and one forward over the prompts of several new requests at once,
left-padded, into a transformers DynamicCache ([k, kv_heads, L, head_dim] per layer) - or, for
`encode`, without a cache, keeping only the last token's final hidden state.
"""
from __future__ import annotations

import functools
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


Feature = tuple  # (embeds [n_tokens, H], deepstack: list of [n_tokens, H]) of one picture


def vision(model, reqs: list[Request], cache: VisionCache, observer, policy=None) -> list[list[Feature]]:
    """Per request, each picture's features, from the cache or one vision pass over every picture
    of the group that is not cached (a picture that appears twice is computed once). The pictures
    come as uint8 pixels: only the uncached ones are moved to the device and cut into patches there
    (`policy`: a PixelPolicy; by default the model config's)."""
    from shelfsight.model.preprocessing import PixelPolicy

    device = model.device
    patchify = _patchifier(policy or PixelPolicy.of_model(model.config))
    pictures = []  # (request index, picture index, key, pixels [n] uint8, grid [3])
    for i, r in enumerate(reqs):
        grids = r.grid_thw.reshape(-1, 3)
        sizes = [patchify.picture_bytes(g) for g in grids.tolist()]
        bounds = [0] + torch.tensor(sizes, dtype=torch.int64).cumsum(0).tolist()
        for j, key in enumerate(r.image_keys):
            # a picture without a key is its own: never shared, never cached
            pictures.append((i, j, key or (i, j), r.pixels[bounds[j]:bounds[j + 1]], grids[j]))
    found: dict = {}
    if cache.max_bytes:
        for _, _, key, _, _ in pictures:
            if isinstance(key, str) and key not in found:
                hit = cache.get(key)
                observer.vision_cache(hit is not None)
                if hit is not None:
                    found[key] = hit
    todo = list({key: (pv, grid) for _, _, key, pv, grid in pictures if key not in found}.items())
    if todo:
        grid = torch.stack([t[1][1] for t in todo])
        # one host-to-device copy of the uint8 pixels (8x fewer bytes than float32 patches)
        pixels = torch.cat([t[1][0] for t in todo]).to(device)
        pv = patchify.patches(pixels, grid)  # [P, D] float32 on the device
        out = model.model.get_image_features(pv, grid.to(device), return_dict=True)
        for n, (key, _) in enumerate(todo):
            embeds = out.pooler_output[n]
            deep = [layer[n] for layer in out.deepstack_features]
            found[key] = (embeds, deep)
            if cache.max_bytes and isinstance(key, str):
                cache.put(key, embeds, deep)
    feats: list[list[Feature]] = [[] for _ in reqs]
    for i, _, key, _, _ in pictures:
        feats[i].append(found[key])
    return feats


@functools.lru_cache(maxsize=8)
def _patchifier(policy):
    """One Patchifier per policy: it keeps its mean and std on each device it has been used on."""
    from shelfsight.model.preprocessing import Patchifier

    return Patchifier(policy)


@dataclass
class Packed:
    """The k prompts of a group as one left-padded batch, with everything transformers' forward needs."""
    ids: torch.Tensor  # [k, L] int64
    mask: torch.Tensor  # [k, L] 1 = real token
    position_ids: torch.Tensor  # [4, k, L]: text positions, then M-RoPE t/h/w
    deltas: list[int]  # M-RoPE offset per row
    extra: dict  # the pictures' encoder outputs, grids and token types (empty without pictures)
    lengths: list[int]


def pack(model, reqs: list[Request], feats: list[list[Feature]]) -> Packed:
    """Left-pad the prompts and compute their positions, as transformers' generate() does."""
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
    every = [f for row in feats for f in row]  # every picture of the group, in prompt order
    grid = torch.cat([r.grid_thw.reshape(-1, 3) for r in reqs]).to(dev) if every else None
    vision_pos, deltas = model.model.get_rope_index(ids, mm_types, image_grid_thw=grid, attention_mask=mask)
    text_pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate() fills padding
    extra = {}
    if every:
        encoder = BaseModelOutputWithDeepstackFeatures(
            pooler_output=tuple(f[0] for f in every),
            deepstack_features=[tuple(f[1][layer] for f in every) for layer in range(len(every[0][1]))])
        extra = dict(mm_encoder_outputs={"image": encoder}, image_grid_thw=grid, mm_token_type_ids=mm_types)
    return Packed(ids, mask, torch.cat([text_pos[None], vision_pos], dim=0), [int(d) for d in deltas.view(-1).tolist()],
                  extra, lengths)


def prefill(model, reqs: list[Request], feats: list[list[Feature]]) -> Prefilled:
    """One forward over the k prompts (left-padded), as transformers' generate() runs it."""
    from transformers import DynamicCache

    p = pack(model, reqs, feats)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=p.ids, attention_mask=p.mask, position_ids=p.position_ids, cache=cache,
                use_cache=True, logits_to_keep=1, **p.extra)
    return Prefilled(out.cache, p.mask, p.lengths, p.deltas, out.logits[:, -1].float())


def encode(model, reqs: list[Request], feats: list[list[Feature]]) -> torch.Tensor:
    """One forward over the k prompts without a cache or logits -> the final hidden state (after the
    decoder's last norm) at each prompt's last token, [k, H] float32: the embedding and reranking
    models' pooling ("last"). Left padding puts every prompt's last token at the last position."""
    p = pack(model, reqs, feats)
    out = model.model(input_ids=p.ids, attention_mask=p.mask, position_ids=p.position_ids, use_cache=False, **p.extra)
    return out.last_hidden_state[:, -1].float()
