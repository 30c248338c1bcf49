"""Weight-only quantized linears on PyTorch's own kernels, so serving needs no GPTQModel.

    int4: tinygemm (`_weight_int4pack_mm` on CUDA sm80+, `_weight_int4pack_mm_for_cpu` on CPU)
    int8: `_weight_int8pack_mm` (per output channel, symmetric); refused where torch has no such kernel
          (dequantizing the whole weight every call is slower than bf16: int8 would not pay)
    dense: the same codes dequantized to a float weight: the reference that parity tests compare with
`fuse` joins linears that read the same input (q/k/v, gate/up) into one matmul for the decoder step.

tinygemm dequantizes a 4-bit code q as (q - 8) * scale + zero, per group along k. GPTQ's
scale * (q - z) is the same with zero = scale * (8 - z), so any GPTQ zero point converts exactly.
"""
from __future__ import annotations

import torch
from torch import nn

from shelfsight.errors import FailedPrecondition
from shelfsight.model.gptq import QuantizedTensor

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

    @classmethod
    def concat(cls, mods: list["Int4Linear"]) -> "Int4Linear":
        """One module whose output is the concatenation of `mods`' outputs (same input, same group).
        Packed codes tile along n (8 rows a tile on CUDA), so they join along dim 0; [k/g, n, 2]
        scales join along n."""
        first = mods[0]
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.in_features, out.group_size, out._cuda = first.in_features, first.group_size, first._cuda
        out.out_features = sum(m.out_features for m in mods)
        out.register_buffer("packed", torch.cat([m.packed for m in mods]))
        out.register_buffer("scales_and_zeros", torch.cat([m.scales_and_zeros for m in mods], dim=1))
        return out

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
        _check_int8_kernel(self.weight, self.scales)

    @classmethod
    def concat(cls, mods: list["Int8Linear"]) -> "Int8Linear":
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.in_features = mods[0].in_features
        out.out_features = sum(m.out_features for m in mods)
        out.register_buffer("weight", torch.cat([m.weight for m in mods]))
        out.register_buffer("scales", torch.cat([m.scales for m in mods]))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.scales.dtype)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel"


def _check_int8_kernel(weight: torch.Tensor, scales: torch.Tensor) -> None:
    """Refuse int8 where torch has no weight-only int8 kernel for this device and dtype, instead of
    dequantizing the whole weight on every call (slower than serving bf16)."""
    try:
        x = torch.zeros(1, weight.shape[1], device=weight.device, dtype=scales.dtype)
        torch.ops.aten._weight_int8pack_mm(x, weight, scales)
    except (RuntimeError, NotImplementedError) as e:
        raise FailedPrecondition(
            f"int8 weights are not served on {weight.device.type} with {scales.dtype}: torch "
            f"{torch.__version__} has no weight-only int8 kernel there ({str(e).splitlines()[0][:120]}); "
            "serve the bf16 or int4 export instead") from None


class Concat(nn.Module):
    """Fallback fusion: the modules run one after another, outputs concatenated."""

    def __init__(self, mods: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.parts], dim=-1)


def fuse(mods: list[nn.Module]) -> nn.Module:
    """One module whose output is the concatenation of `mods`' outputs for the same input: one matmul
    instead of several. Dense linears' weights are re-pointed at views of the joined weight, so the
    weights exist once. A joined quantized module is checked against its parts (packing layouts are
    the kernels' business); should they differ, the parts run one after another."""
    if all(type(m) is nn.Linear and m.bias is None for m in mods):
        with torch.no_grad():
            w = torch.cat([m.weight for m in mods])
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
            lin.weight = nn.Parameter(w, requires_grad=False)
            offset = 0
            for m in mods:
                m.weight = nn.Parameter(w[offset:offset + m.out_features], requires_grad=False)
                offset += m.out_features
        return lin
    for kind in (Int4Linear, Int8Linear):
        if all(type(m) is kind for m in mods):
            joined = kind.concat(mods)
            with torch.no_grad():
                x = torch.randn(3, mods[0].in_features, device=joined.scales_and_zeros.device if kind is Int4Linear
                                else joined.scales.device)
                want = torch.cat([m(x) for m in mods], dim=-1)
                if torch.allclose(joined(x), want, rtol=1e-2, atol=1e-2 * float(want.abs().max())):
                    return joined
    return Concat(mods)


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
