"""A compact Qwen3 text decoder over the transformers model's own weights, reading and writing a KV
cache of fixed slots: `forward` is the decode step (one token per row), `extend` the prefill (a chunk of
new prompt tokens per request, their K/V written straight into the request's slot).

Per layer (about 15 kernels instead of transformers' ~50): RMSNorm, one q|k|v matmul, q/k RMSNorm over
head_dim before RoPE (as Qwen3 does), RoPE from a cos/sin table at each row's position, K/V written into
the row's slot, attention over the row's cached length, o matmul, RMSNorm, one gate|up matmul, SiLU*up,
down matmul. No host syncs and only static shapes for a given (rows, KV length), so a step can be
captured as a CUDA graph; on CPU the same code runs eagerly.

Cache layout, per layer: K, V [slots + 1, kv_heads, max_len, head_dim]; the extra slot absorbs the
writes of padding rows. Batch row b reads slot b: the rows of a step are slots 0..B-1, padding rows
being the free slots among them (their writes go to the spare slot, their outputs are ignored).
Attention uses the "GQA as rows" view: q [B, 16, D] -> [B, 8, 2, D] against unexpanded K [B, 8, L, D]
with a [B, 1, 1, L] mask, which SDPA's memory-efficient kernel takes (with enable_gqa it would fall
back to the slow math kernel).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shelfsight.engine import kernels
from shelfsight.engine.kernels import rms_norm_ref as rms_norm, rotate_half
from shelfsight.model.qlinear import fuse


@dataclass
class _Layer:
    ln1: torch.Tensor
    qkv: nn.Module
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    o: nn.Module
    ln2: torch.Tensor
    gate_up: nn.Module
    down: nn.Module


class Decoder:
    def __init__(self, model, slots: int, max_len: int):
        lm = model.model.language_model
        cfg = lm.config
        self.hq, self.hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.hq
        self.eps, self.slots, self.max_len = cfg.rms_norm_eps, slots, max_len
        self.embed = lm.embed_tokens.weight
        self.norm = lm.norm.weight
        self.lm_head = model.lm_head
        dev, dtype = self.embed.device, self.embed.dtype
        self.device, self.dtype = dev, dtype
        self.layers = []
        for layer in lm.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                ln1=layer.input_layernorm.weight, qkv=fuse([a.q_proj, a.k_proj, a.v_proj]),
                q_norm=a.q_norm.weight, k_norm=a.k_norm.weight, o=a.o_proj,
                ln2=layer.post_attention_layernorm.weight, gate_up=fuse([m.gate_proj, m.up_proj]),
                down=m.down_proj))
        with torch.inference_mode():
            shape = (slots + 1, self.hkv, max_len, self.d)
            self.k = [torch.zeros(shape, device=dev, dtype=dtype) for _ in self.layers]
            self.v = [torch.zeros(shape, device=dev, dtype=dtype) for _ in self.layers]
            # RoPE as transformers computes it (float32 position * inv_freq), one row per position
            rope = lm.rotary_emb
            freqs = torch.arange(max_len, device=dev).float()[:, None] * rope.inv_freq.float().to(dev)[None]
            emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, D]
            self.cos = (emb.cos() * rope.attention_scaling).to(dtype)
            self.sin = (emb.sin() * rope.attention_scaling).to(dtype)
            self.positions = torch.arange(max_len, device=dev)
            self.heads = torch.arange(self.hkv, device=dev)
        # ~10 kernels a layer instead of ~60 where the fused kernels run and check out (CUDA)
        self.fused = kernels.usable(dev, dtype)

    @property
    def bytes_per_token(self) -> int:
        return 2 * len(self.layers) * self.hkv * self.d * self.k[0].element_size()

    def extend(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: list[tuple[int, int, int]],
               deep: list[tuple[torch.Tensor, torch.Tensor]] = ()) -> torch.Tensor:
        """Prefill on the decoder's own weights: T new prompt tokens of one or more requests, packed,
        their K/V written straight into the slots -> the final hidden states [T, hidden] (after the
        last norm). x [T, hidden]: the tokens' input embeddings (pictures' features in place);
        cos, sin [T, D]: their M-RoPE rotations; segments: (slot, start, n) per request, in x's order:
        its tokens [start, start + n) go to that slot, whose first `start` tokens are already there
        (an earlier chunk). deep: per deepstack layer (the first few), (indices into T [v],
        features [v, hidden]), added to the hidden states after that layer, as transformers does."""
        T, H, G, D = x.shape[0], self.hkv, self.hq // self.hkv, self.d
        # built on the device from Python ints (a host tensor copied over would wait for the device)
        ar = self.positions
        where = torch.cat([((s * H + self.heads[None]) * self.max_len + ar[a:a + n, None]).reshape(-1)
                           for s, a, n in segments])  # [T * H], in k.reshape(-1, D)'s order
        # per request, [G * n, a + n]: query row (g, i) sees the keys up to its own position a + i
        masks = [(ar[:a + n][None] <= ar[a:a + n, None]).repeat(G, 1) for _, a, n in segments]
        cos, sin = cos[:, None], sin[:, None]  # [T, 1, D]
        for i, (w, kc, vc) in enumerate(zip(self.layers, self.k, self.v)):
            q = self._qkv(w, x, cos, sin, kc, vc, where)  # [T, hq, D]
            outs, at = [], 0
            for (s, a, n), mask in zip(segments, masks):
                # GQA as rows (see the module docstring): [n, H, G, D] -> [1, H, G * n, D]
                qs = q[at:at + n].view(n, H, G, D).permute(1, 2, 0, 3).reshape(1, H, G * n, D)
                att = F.scaled_dot_product_attention(qs, kc[s:s + 1, :, :a + n], vc[s:s + 1, :, :a + n],
                                                     attn_mask=mask, scale=D ** -0.5)
                outs.append(att.view(H, G, n, D).permute(2, 0, 1, 3).reshape(n, self.hq * D))
                at += n
            x = self._mlp(w, x + w.o(torch.cat(outs) if len(outs) > 1 else outs[0]))
            if i < len(deep) and deep[i][0].numel():
                x = x.index_add(0, deep[i][0], deep[i][1].to(x.dtype))
        return rms_norm(x, self.norm, self.eps)

    def forward(self, tokens: torch.Tensor, cache_pos: torch.Tensor, rope_pos: torch.Tensor,
                write_slot: torch.Tensor, kv_len: torch.Tensor, L: int) -> torch.Tensor:
        """One token for each of B rows (row b = slot b) -> logits [B, V] float32.
        tokens, cache_pos (where the token's K/V go), rope_pos, write_slot, kv_len (keys to attend,
        this token included): [B] int64. L >= max(kv_len): the cached length the step reads."""
        if self.fused:
            return self._forward_fused(tokens, cache_pos, rope_pos, write_slot, kv_len, L)
        B, H, G, D = tokens.shape[0], self.hkv, self.hq // self.hkv, self.d
        x = F.embedding(tokens, self.embed)  # [B, hidden]
        cos, sin = self.cos[rope_pos][:, None], self.sin[rope_pos][:, None]  # [B, 1, D]
        mask = (self.positions[:L][None] < kv_len[:, None])[:, None, None, :]  # [B, 1, 1, L]
        where = ((write_slot[:, None] * H + self.heads[None]) * self.max_len + cache_pos[:, None]).reshape(-1)
        for w, kc, vc in zip(self.layers, self.k, self.v):
            q = self._qkv(w, x, cos, sin, kc, vc, where)  # [B, hq, D]
            att = F.scaled_dot_product_attention(q.view(B, H, G, D), kc[:B, :, :L], vc[:B, :, :L],
                                                 attn_mask=mask, scale=D ** -0.5)  # [B, H, G, D]
            x = self._mlp(w, x + w.o(att.reshape(B, self.hq * D)))
        return self.lm_head(rms_norm(x, self.norm, self.eps)).float()

    def _qkv(self, w: _Layer, x, cos, sin, kc, vc, where) -> torch.Tensor:
        """x [N, hidden] -> q [N, hq, D]; the rows' k and v (q/k RMSNorm, then RoPE by cos, sin [N, 1, D])
        written into the cache at `where` ([N * kv_heads] flat row indices of K/V viewed as [-1, D])."""
        N, H, D = x.shape[0], self.hkv, self.d
        q, k, v = w.qkv(rms_norm(x, w.ln1, self.eps)).split([self.hq * D, H * D, H * D], dim=-1)
        q = rms_norm(q.reshape(N, self.hq, D), w.q_norm, self.eps)
        k = rms_norm(k.reshape(N, H, D), w.k_norm, self.eps)
        kc.view(-1, D).index_copy_(0, where, (k * cos + rotate_half(k) * sin).reshape(-1, D))
        vc.view(-1, D).index_copy_(0, where, v.reshape(-1, D))
        return q * cos + rotate_half(q) * sin

    def _mlp(self, w: _Layer, x: torch.Tensor) -> torch.Tensor:
        """The layer's second half: x + down(SiLU(gate) * up) of RMSNorm(x)."""
        gate, up = w.gate_up(rms_norm(x, w.ln2, self.eps)).chunk(2, dim=-1)
        return x + w.down(F.silu(gate) * up)

    def _forward_fused(self, tokens, cache_pos, rope_pos, write_slot, kv_len, L) -> torch.Tensor:
        """forward() with the fused kernels: the residual add rides with the next RMSNorm."""
        B, H, G, D = tokens.shape[0], self.hkv, self.hq // self.hkv, self.d
        x = F.embedding(tokens, self.embed)  # [B, hidden]
        valid = self.positions[:L][None] < kv_len[:, None]
        mask = torch.zeros(B, 1, 1, L, device=x.device, dtype=x.dtype).masked_fill(~valid[:, None, None], float("-inf"))
        res, h = kernels.add_rms_norm(x, None, self.layers[0].ln1, self.eps)
        for i, (w, kc, vc) in enumerate(zip(self.layers, self.k, self.v)):
            q = kernels.qk_norm_rope(w.qkv(h), w.q_norm, w.k_norm, self.cos, self.sin, rope_pos, kc, vc,
                                     write_slot, cache_pos, self.hq, H, self.eps)  # [B, hq, D]
            att = F.scaled_dot_product_attention(q.view(B, H, G, D), kc[:B, :, :L], vc[:B, :, :L],
                                                 attn_mask=mask, scale=D ** -0.5)
            res, h = kernels.add_rms_norm(res, w.o(att.reshape(B, self.hq * D)), w.ln2, self.eps)
            after = self.layers[i + 1].ln1 if i + 1 < len(self.layers) else self.norm
            res, h = kernels.add_rms_norm(res, w.down(kernels.silu_mul(w.gate_up(h))), after, self.eps)
        return self.lm_head(h).float()
