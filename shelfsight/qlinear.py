"""Weight-only quantized linears on PyTorch's own kernels, so serving needs no GPTQModel.

    int4: tinygemm (`_weight_int4pack_mm` on CUDA sm80+, `_weight_int4pack_mm_for_cpu` on CPU)
    int8: `_weight_int8pack_mm` (per output channel, symmetric), else int8 weights dequantized on the fly
    dense: the same codes dequantized to a float weight: the reference that parity tests compare with

tinygemm dequantizes a 4-bit code q as (q - 8) * scale + zero, per group along k. GPTQ's
scale * (q - z) is the same with zero = scale * (8 - z), so any GPTQ zero point converts exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shelfsight.gptq import QuantizedTensor

TINYGEMM_GROUPS = (32, 64, 128, 256)


def _inner_k_tiles(k: int) -> int:
    for tiles in (8, 4, 2):
        if k % (tiles * 16) == 0:
            return tiles
    raise ValueError(f"in_features {k} must be a multiple of 32 for the int4 kernel")


class Int4Linear(nn.Module):
    """y = x @ W.T with W held as tinygemm-packed 4-bit codes + per-group bf16 scale/zero."""

    def __init__(self, q: QuantizedTensor, device: torch.device, dtype=torch.bfloat16):
        super().__init__()
        if q.bits != 4 or q.group_size not in TINYGEMM_GROUPS:
            raise ValueError(f"int4 kernel needs 4-bit codes in groups of {TINYGEMM_GROUPS}, "
                             f"got {q.bits}-bit groups of {q.group_size}")
        self.in_features, self.out_features, self.group_size = q.in_features, q.out_features, q.group_size
        tiles = _inner_k_tiles(self.in_features)
        codes = q.codes.t().contiguous().to(device)  # [n, k] int32 in [0, 16)
        if device.type == "cuda":
            nibbles = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)  # [n, k/2]
            packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, tiles)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, tiles)
        scales = q.scales.float()  # [k/g, n]
        zeros = scales * (8 - q.zeros.float())
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", torch.stack([scales, zeros], dim=-1).to(device, dtype))
        self._cuda = device.type == "cuda"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype)
        if self._cuda:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size,
                                                           self.scales_and_zeros)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group={self.group_size}, int4 tinygemm"


class Int8Linear(nn.Module):
    """y = (x @ Wq.T) * scale with Wq int8 [n, k] and one scale per output channel (symmetric)."""

    def __init__(self, q: QuantizedTensor, device: torch.device, dtype=torch.bfloat16):
        super().__init__()
        if q.bits != 8 or q.group_size != q.in_features:
            raise ValueError("int8 kernel needs per-output-channel 8-bit codes (group_size -1)")
        if not torch.all(q.zeros == 128):
            raise ValueError("int8 kernel needs symmetric codes (zero point 128)")
        self.in_features, self.out_features = q.in_features, q.out_features
        self.register_buffer("weight", (q.codes.t() - 128).to(torch.int8).contiguous().to(device))
        self.register_buffer("scales", q.scales[0].to(device, dtype))  # [n]
        self._kernel = device.type == "cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.scales.dtype)
        if self._kernel:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)
        else:  # no int8 weight-only kernel there: int8 bytes still halve what is read from memory
            y = F.linear(x2, self.weight.to(x2.dtype)) * self.scales
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel"


def dense_linear(q: QuantizedTensor, device: torch.device, dtype=torch.bfloat16) -> nn.Linear:
    """The same codes as a plain float nn.Linear: the dequantized reference."""
    lin = nn.Linear(q.in_features, q.out_features, bias=False, device="meta")
    lin.weight = nn.Parameter(q.dequantize(dtype).to(device), requires_grad=False)
    return lin


def make_linear(q: QuantizedTensor, device: torch.device, dtype=torch.bfloat16,
                reference: bool = False) -> nn.Module:
    if reference:
        return dense_linear(q, device, dtype)
    if q.bits == 4:
        return Int4Linear(q, device, dtype)
    if q.bits == 8:
        return Int8Linear(q, device, dtype)
    raise ValueError(f"no kernel for {q.bits}-bit weights")
