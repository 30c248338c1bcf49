"""Weight-only quantized linears on PyTorch's own kernels, so serving needs no GPTQModel.

    int4: tinygemm (`_weight_int4pack_mm` on CUDA sm80+, `_weight_int4pack_mm_for_cpu` on CPU) for few
          input rows; optionally a dequantized dense weight and a plain matmul from a row threshold on
    int8: `_weight_int8pack_mm` (per output channel, symmetric); refused where torch has no such kernel
          (dequantizing the whole weight every call is slower than bf16: int8 would not pay)
    dense: the same codes dequantized to a float weight: the reference that parity tests compare with
`fuse` joins linears that read the same input (q/k/v, gate/up) into one matmul for the decoder step;
the parts then read views of the joined module's buffers, so the codes exist once.

tinygemm dequantizes a 4-bit code q as (q - 8) * scale + zero, per group along k. GPTQ's
scale * (q - z) is the same with zero = scale * (8 - z), so any GPTQ zero point converts exactly.

int4 per batch size: tinygemm wins at one row (H100, 2B decode: 1.79 vs bf16 2.48 ms/token) and loses
at 32 (5.96 vs 3.72). `choose_int4_threshold` times both at the decode shapes and batch buckets on the
device; `set_int4_threshold` gives every int4 linear a dense copy used from that many rows on. The
branch is on the static row count, so a CUDA graph per batch bucket records one kernel and stays
valid; set it before capturing (a graph keeps the kernels and buffers it was recorded with).
Memory: the dense copy costs 2 bytes/param in bf16 (4 in fp32) on top of the int4 codes (0.5 + 1/32
bytes/param, kept for the small batches): for the 2B text decoder (28 layers x 50.3 M params in its 7
linears = 1.41 G params) +2.82 GB bf16 next to 0.75 GB int4. No threshold, no copy.
"""
from __future__ import annotations

import statistics
import time
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from shelfsight.errors import FailedPrecondition
from shelfsight.model.gptq import QuantizedTensor

TINYGEMM_GROUPS = (32, 64, 128, 256)
# shelfsight/engine/graphs.py's batch buckets up to 32 (model/ may not import the engine)
DECODE_BUCKETS = (1, 2, 4, 8, 16, 24, 32)


def _inner_k_tiles(k: int) -> int:
    for tiles in (8, 4, 2):
        if k % (tiles * 16) == 0:
            return tiles
    raise ValueError(f"in_features {k} must be a multiple of 32 for the int4 kernel")


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """codes [n, k] int32 in [0, 16) -> the device kernel's layout: CUDA int32 [n/8, k/(16 tiles), 32,
    tiles/2] (n in tiles of 8 rows); CPU uint8 [n, k/2] (n in blocks of 64 rows with AVX512, 32 without)."""
    tiles = _inner_k_tiles(codes.shape[1])
    if codes.device.type == "cuda":
        nibbles = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)  # [n, k/2]
        return torch.ops.aten._convert_weight_to_int4pack(nibbles, tiles)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, tiles)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Any packed layout's bytes as 4-bit values, low nibble first: uint8 [n * k]."""
    b = packed.contiguous().view(torch.uint8).reshape(-1)
    return torch.stack([b & 15, b >> 4], dim=-1).reshape(-1)


def _code_order(rows: int, k: int, device: torch.device) -> torch.Tensor | None:
    """For `rows` x k codes packed by this device's converter: the flat index (row * k + col) of the code
    behind each nibble, learned by packing the indices themselves 4 bits a pass. None where the packing
    is not a permutation of the codes. Reads the layout of this torch and CPU without assuming it."""
    total = rows * k
    index = torch.arange(total, device=device)
    source = torch.zeros(total, dtype=torch.int64, device=device)
    for shift in range(0, max(total - 1, 1).bit_length(), 4):
        codes = (index >> shift & 15).to(torch.int32).view(rows, k)
        source |= _nibbles(_pack(codes)).to(torch.int64) << shift
    return source if torch.equal(source.sort().values, index) else None


class Int4Linear(nn.Module):
    """y = x @ W.T with W held as tinygemm-packed 4-bit codes + per-group bf16 scale/zero, and, once
    `set_dense_threshold(m)` is called, a dense weight [n, k] that inputs of m rows or more use."""

    def __init__(self, q: QuantizedTensor, device: torch.device, dtype=torch.bfloat16):
        super().__init__()
        if q.bits != 4 or q.group_size not in TINYGEMM_GROUPS:
            raise ValueError(f"int4 kernel needs 4-bit codes in groups of {TINYGEMM_GROUPS}, "
                             f"got {q.bits}-bit groups of {q.group_size}")
        self.in_features, self.out_features, self.group_size = q.in_features, q.out_features, q.group_size
        self.register_buffer("packed", _pack(q.codes.t().contiguous().to(device)))  # from [n, k] int32
        scales = q.scales.float()  # [k/g, n]
        zeros = scales * (8 - q.zeros.float())
        self.register_buffer("scales_and_zeros", torch.stack([scales, zeros], dim=-1).to(device, dtype))
        self._cuda = device.type == "cuda"
        self._init_dense()

    def _init_dense(self) -> None:
        self.dense_from: int | None = None  # rows from which `dense` [n, k] is used; None: never
        self.register_buffer("dense", None, persistent=False)
        # fusion links, in tuples so that nn.Module registers no cycle (modules(), state_dict)
        self._joined: tuple[Int4Linear, int] | None = None  # (joined module, first output column)
        self._parts: tuple[tuple[Int4Linear, int], ...] = ()  # (part, first output column)

    @classmethod
    def concat(cls, mods: list["Int4Linear"]) -> "Int4Linear":
        """One module whose output is the concatenation of `mods`' outputs (same input, same group).
        Packed codes tile along n (8 rows a tile on CUDA, 64 on CPU), so they join along dim 0; [k/g, n, 2]
        scales join along n. Dense weights join too where every part has one for the same threshold."""
        first = mods[0]
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.in_features, out.group_size, out._cuda = first.in_features, first.group_size, first._cuda
        out.out_features = sum(m.out_features for m in mods)
        out.register_buffer("packed", torch.cat([m.packed for m in mods]))
        out.register_buffer("scales_and_zeros", torch.cat([m.scales_and_zeros for m in mods], dim=1))
        out._init_dense()
        if first.dense is not None and all(m.dense is not None and m.dense_from == first.dense_from for m in mods):
            out.dense, out.dense_from = torch.cat([m.dense for m in mods]), first.dense_from
        return out

    def adopt(self, parts: list["Int4Linear"]) -> None:
        """Point `parts` (joined into this module) at views of its codes and dense weight: the bytes exist
        once. dim-0 slices of contiguous tensors are contiguous, as the kernels read them. The parts keep
        their own scales: [k/g, n, 2] sliced along n is strided (the CPU kernel reads it wrong)."""
        row = col = 0
        for p in parts:
            rows = p.packed.shape[0]  # n (CPU) or n/8 (CUDA) rows of this part in the joined codes
            p.packed = self.packed[row:row + rows]
            if self.dense is not None:
                p.dense, p.dense_from = self.dense[col:col + p.out_features], self.dense_from
            p._joined = (self, col)
            self._parts += ((p, col),)
            row, col = row + rows, col + p.out_features

    def _tinygemm(self, x2: torch.Tensor) -> torch.Tensor:
        if self._cuda:
            return torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_and_zeros)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype)
        if self.dense is not None and x2.shape[0] >= self.dense_from:  # static shape: graph-safe
            y = F.linear(x2, self.dense)
        else:
            y = self._tinygemm(x2)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    @torch.no_grad()
    def dequantized(self) -> torch.Tensor:
        """The weight [n, k] in the compute dtype as the kernel sees it, (q - 8) * scale + zero, with codes
        read through `_code_order` (per 64-row block, blocks pack alike; whole n if no multiple of 64),
        checked against the kernel on one-hot rows; should they differ, `dequantized_by_kernel`."""
        n, k, g = self.out_features, self.in_features, self.group_size
        dev, dtype = self.scales_and_zeros.device, self.scales_and_zeros.dtype
        rows = 64 if n % 64 == 0 else n
        order = _code_order(rows, k, dev)
        if order is not None:
            nibbles = _nibbles(self.packed).view(n // rows, rows * k)
            codes = torch.empty_like(nibbles)
            codes[:, order] = nibbles  # the code behind nibble p sits at order[p] of its block
            scale, zero = self.scales_and_zeros.float().unbind(-1)  # [k/g, n] each
            w = (codes.view(n, k // g, g).float() - 8) * scale.t()[:, :, None] + zero.t()[:, :, None]
            w = w.reshape(n, k).to(dtype)
            cols, tol = torch.linspace(0, k - 1, 16, device=dev).long(), 2 * torch.finfo(dtype).eps
            if torch.allclose(self._kernel_columns(cols).float(), w[:, cols].float(), rtol=tol,
                              atol=tol * float(w.abs().max())):
                return w
        return self.dequantized_by_kernel()

    def dequantized_by_kernel(self) -> torch.Tensor:
        """The same from tinygemm on the identity, 1024 rows at a time: exact up to the compute dtype's
        rounding (one term per output), but slow on CPU (a kernel row per input feature)."""
        cols = torch.arange(self.in_features, device=self.scales_and_zeros.device)
        return torch.cat([self._kernel_columns(c) for c in cols.split(1024)], dim=1)

    @torch.no_grad()
    def _kernel_columns(self, cols: torch.Tensor) -> torch.Tensor:
        """W[:, cols] [n, len(cols)] as the kernel dequantizes it: tinygemm on one-hot rows."""
        x = torch.zeros(len(cols), self.in_features, device=cols.device, dtype=self.scales_and_zeros.dtype)
        x[torch.arange(len(cols), device=cols.device), cols] = 1
        return self._tinygemm(x).t()

    @torch.no_grad()
    def set_dense_threshold(self, threshold: int | None) -> None:
        """Inputs of `threshold` rows or more use a dense weight (built now, once); None drops it. On a
        fused part this applies to its joined module, whose dense weight all its parts then view."""
        if threshold is not None and threshold < 1:
            raise ValueError(f"threshold must be a row count >= 1 or None, got {threshold}")
        if self._joined is not None:
            self._joined[0].set_dense_threshold(threshold)
            return
        if threshold is None:
            self.dense = None
        elif self.dense is None:
            self.dense = self.dequantized()
        self.dense_from = threshold
        for p, col in self._parts:
            p.dense = None if self.dense is None else self.dense[col:col + p.out_features]
            p.dense_from = threshold

    def extra_repr(self) -> str:
        dense = f", dense from {self.dense_from} rows" if self.dense is not None else ""
        return f"in={self.in_features}, out={self.out_features}, group={self.group_size}, int4 tinygemm{dense}"


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

    def adopt(self, parts: list["Int8Linear"]) -> None:
        """Point `parts` at views of this module's weight [n, k] and scales [n]: both slice along their
        first dim into contiguous views, so nothing of the parts stays behind."""
        sizes = [p.out_features for p in parts]
        for p, w, s in zip(parts, self.weight.split(sizes), self.scales.split(sizes)):
            p.weight, p.scales = w, s

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
    instead of several. The parts' weights become views of the joined weights: they exist once (int4
    parts keep their scales: 1/32 byte/param, 29 MB for the 2B decoder's q|k|v and gate|up). A joined
    quantized module is checked against its parts (packing layouts are the kernels' business); should
    they differ, the parts run one after another."""
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
                x = torch.randn(3, mods[0].in_features, device=next(joined.buffers()).device)
                want = torch.cat([m(x) for m in mods], dim=-1)
                if torch.allclose(joined(x), want, rtol=1e-2, atol=1e-2 * float(want.abs().max())):
                    joined.adopt(mods)  # only now: the parts' own buffers are freed with their last use
                    return joined
    return Concat(mods)


def _int4_modules(modules: nn.Module | Iterable[nn.Module]) -> list[Int4Linear]:
    """Every Int4Linear in `modules` (a model, or modules whose submodules count too), each once."""
    roots = [modules] if isinstance(modules, nn.Module) else list(modules)
    return list({id(m): m for root in roots for m in root.modules() if isinstance(m, Int4Linear)}.values())


def time_call(fn, device: torch.device | str, reps: int | None = None) -> float:
    """ms per call of fn() after warm-up. CUDA: best of 3 runs of `reps` calls (default 50), CUDA events.
    CPU: median of 3 x `reps` (default 5, or 3 once they took a second) single calls by perf_counter,
    so that a call stalled by a busy core (a thread pool waits for its slowest thread) does not decide."""
    cuda = torch.device(device).type == "cuda"
    fn()
    if not cuda:
        times = []
        while len(times) < 3 * (reps or 5):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
            if reps is None and len(times) >= 3 and sum(times) > 1000:  # slow calls: 3 say enough
                break
        return statistics.median(times)
    reps = reps or 50
    fn()
    best = float("inf")
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / reps)
    return best


@torch.no_grad()
def choose_int4_threshold(modules: nn.Module | Iterable[nn.Module], buckets: Iterable[int] = DECODE_BUCKETS,
                          reps: int | None = None, margin: float = 0.05) -> tuple[int | None, list[dict]]:
    """Time tinygemm against a dense matmul on the modules' own device, dtype and shapes at each batch
    bucket and pick the threshold for `set_int4_threshold` (see `pick_threshold`; `margin`: the copy
    costs memory, noise must not buy it). Pass the modules the decode step runs (its q|k|v, o, gate|up
    and down: the joined ones, not the parts); each shape is timed once, weighted by its count.
    Returns (threshold or None, a row per bucket: {"rows", "tinygemm_ms", "dense_ms", "kernel"}, ms
    summed over the modules). Scratch: one dense weight per distinct shape at a time; none is kept."""
    mods = _int4_modules(modules)
    if not mods:
        return None, []
    shapes: dict[tuple[int, int, int], list] = {}
    for m in mods:
        shapes.setdefault((m.in_features, m.out_features, m.group_size), [m, 0])[1] += 1
    buckets = sorted(set(buckets))
    tiny, dense = dict.fromkeys(buckets, 0.0), dict.fromkeys(buckets, 0.0)
    for (k, _, _), (m, count) in shapes.items():
        dev, dtype = m.scales_and_zeros.device, m.scales_and_zeros.dtype
        w = m.dense if m.dense is not None else m.dequantized()  # [n, k]
        for b in buckets:
            x = torch.randn(b, k, device=dev, dtype=dtype)
            tiny[b] += count * time_call(lambda: m._tinygemm(x), dev, reps)
            dense[b] += count * time_call(lambda: F.linear(x, w), dev, reps)
    threshold = pick_threshold(buckets, [tiny[b] for b in buckets], [dense[b] for b in buckets], margin)
    table = [{"rows": b, "tinygemm_ms": tiny[b], "dense_ms": dense[b],
              "kernel": "dense" if threshold is not None and b >= threshold else "tinygemm"} for b in buckets]
    return threshold, table


def pick_threshold(buckets: list[int], tinygemm_ms: list[float], dense_ms: list[float], margin=0.05) -> int | None:
    """The smallest of the (ascending) buckets from which dense is faster than tinygemm by more than the
    fraction `margin` at every larger bucket too; None where it is not at the largest (no dense copy)."""
    threshold = None
    for b, t, d in reversed(list(zip(buckets, tinygemm_ms, dense_ms))):
        if d >= (1 - margin) * t:
            break
        threshold = b
    return threshold


def set_int4_threshold(modules: nn.Module | Iterable[nn.Module], threshold: int | None) -> int:
    """Every Int4Linear in `modules` (fused parts through their joined module) uses a dense weight from
    `threshold` rows on; None drops the dense weights. Call before CUDA graphs are captured. Returns the
    bytes of dense weights now held (views of a joined module's weight counted once)."""
    mods = _int4_modules(modules)
    for m in mods:
        m.set_dense_threshold(threshold)
    return sum({m.dense.untyped_storage().data_ptr(): m.dense.untyped_storage().nbytes()
                for m in mods if m.dense is not None}.values())


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
