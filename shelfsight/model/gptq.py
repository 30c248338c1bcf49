"""The GPTQ checkpoint format (GPTQModel / auto-gptq "gptq" v1), written and read without GPTQModel.

Per quantized linear with in_features k, out_features n, group g (g = k when group_size is -1) and
b bits (pack = 32 // b values per int32):
    qweight  int32 [k / pack, n]   b-bit codes packed along k, lowest bits first
    qzeros   int32 [k / g, n / pack] (zero point - 1) packed along n      (v1 stores zero - 1)
    scales   fp16  [k / g, n]
    g_idx    int32 [k]             i // g (no act-order)
    W[n, k] = scales[g_idx[k], n] * (code[k, n] - zero[g_idx[k], n])

Used for int4 (GPTQ by GPTQModel, group 128) and int8 (round-to-nearest here, per output channel),
and for the round-to-nearest 4-bit baseline that the export measures GPTQ against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# The text decoder's linears, the only ones any scheme quantizes (as every reference recipe does):
# vision tower, embedding and lm_head stay bf16.
DECODER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LAYER_PREFIX = "model.language_model.layers."


def is_decoder_linear(name: str) -> bool:
    return name.startswith(LAYER_PREFIX) and name.endswith(DECODER_LINEARS)


@dataclass
class QuantizedTensor:
    """One linear's weight in unpacked form. codes [k, n] int32 in [0, 2^bits); zeros/scales [k/g, n]."""

    codes: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    bits: int
    group_size: int  # actual group length along k (k for per-channel)

    @property
    def in_features(self) -> int:
        return self.codes.shape[0]

    @property
    def out_features(self) -> int:
        return self.codes.shape[1]

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """Dense weight [n, k] (nn.Linear layout)."""
        g = torch.arange(self.in_features, device=self.codes.device) // self.group_size
        w = self.scales.float()[g] * (self.codes.float() - self.zeros.float()[g])  # [k, n]
        return w.t().contiguous().to(dtype)


def _pack_rows(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack [r, c] small ints along dim 0 into int32 [r / (32/bits), c]."""
    per = 32 // bits
    r, c = x.shape
    x = x.to(torch.int64).reshape(r // per, per, c)
    shifts = (torch.arange(per, dtype=torch.int64, device=x.device) * bits).view(1, per, 1)
    packed = (x << shifts).sum(dim=1)  # distinct bit ranges: sum == bitwise or
    return _as_int32(packed)


def _unpack_rows(p: torch.Tensor, bits: int) -> torch.Tensor:
    per = 32 // bits
    mask = (1 << bits) - 1
    shifts = (torch.arange(per, dtype=torch.int64, device=p.device) * bits).view(1, per, 1)
    x = (p.to(torch.int64).unsqueeze(1) & 0xFFFFFFFF) >> shifts & mask  # [r/per, per, c]
    return x.reshape(-1, p.shape[1]).to(torch.int32)


def _as_int32(x: torch.Tensor) -> torch.Tensor:
    x = x & 0xFFFFFFFF
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def pack(q: QuantizedTensor) -> dict[str, torch.Tensor]:
    """QuantizedTensor -> the four checkpoint tensors (v1: zeros stored minus one)."""
    k = q.in_features
    return {
        "qweight": _pack_rows(q.codes, q.bits),
        "qzeros": _pack_rows((q.zeros.to(torch.int64) - 1).t(), q.bits).t().contiguous(),
        "scales": q.scales.to(torch.float16),
        "g_idx": (torch.arange(k, dtype=torch.int32, device=q.codes.device) // q.group_size),
    }


def unpack(tensors: dict[str, torch.Tensor], bits: int) -> QuantizedTensor:
    """The four checkpoint tensors -> QuantizedTensor. Refuses act-order (non-sequential g_idx)."""
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    codes = _unpack_rows(qweight, bits)
    k = codes.shape[0]
    groups = scales.shape[0]
    group = k // groups
    g_idx = tensors.get("g_idx")
    if g_idx is not None and not torch.equal(g_idx.to(torch.int64).cpu(), torch.arange(k) // group):
        raise ValueError("act-order (desc_act) GPTQ checkpoints are not supported; export with desc_act off")
    zeros = _unpack_rows(qzeros.t().contiguous(), bits).t() + 1  # v1 format stores zero - 1
    return QuantizedTensor(codes=codes, zeros=zeros[:, : scales.shape[1]].contiguous(),
                           scales=scales, bits=bits, group_size=group)


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int) -> QuantizedTensor:
    """Symmetric round-to-nearest of an nn.Linear weight [n, k], with GPTQ's own sym convention:
    scale = 2 * max|w| / (2^bits - 1), zero = 2^(bits-1); group_size -1 = one group per channel."""
    n, k = weight.shape
    g = k if group_size in (-1, None) else group_size
    if k % g:
        raise ValueError(f"in_features {k} is not a multiple of group size {g}")
    maxq = 2**bits - 1
    w = weight.float().t().reshape(k // g, g, n)  # [groups, g, n]
    xmax = w.abs().amax(dim=1).clamp(min=1e-8)  # [groups, n]
    scales = (2 * xmax / maxq).to(torch.float16).float()  # stored as fp16: quantize with that value
    zero = (maxq + 1) // 2
    codes = torch.clamp(torch.round(w / scales.unsqueeze(1)) + zero, 0, maxq)
    return QuantizedTensor(codes=codes.reshape(k, n).to(torch.int32),
                           zeros=torch.full((k // g, n), zero, dtype=torch.int32, device=weight.device),
                           scales=scales.to(torch.float16), bits=bits, group_size=g)


def quantization_config(bits: int, group_size: int) -> dict:
    """The `quantization_config` block of config.json, as GPTQModel writes it for these settings."""
    return {"quant_method": "gptq", "format": "gptq", "checkpoint_format": "gptq", "bits": bits,
            "group_size": group_size, "desc_act": False, "sym": True, "lm_head": False,
            "true_sequential": True, "static_groups": False}
