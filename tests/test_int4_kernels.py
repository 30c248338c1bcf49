"""int4 per batch size and fusion without copies (shelfsight/model/qlinear.py), on the CPU kernels:
from a row threshold on an Int4Linear runs a dense matmul on its dequantized weight and otherwise
tinygemm; the threshold chooser's table and rule; fused q|k|v-like parts read the joined module's
bytes (codes and dense weights) and answer as before."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shelfsight.model import qlinear
from shelfsight.model.gptq import rtn_quantize
from shelfsight.model.qlinear import Int4Linear, Int8Linear

CPU = torch.device("cpu")
K = 256  # in_features: two groups of 128
# one ulp of the compute dtype, relative: the dense weight is the kernel's dequantized value rounded to it
ROUNDING = {torch.float32: 1e-5, torch.bfloat16: 2**-7}


def int4(n: int, dtype=torch.bfloat16, seed: int = 0, k: int = K) -> Int4Linear:
    torch.manual_seed(seed)
    return Int4Linear(rtn_quantize(torch.randn(n, k) * 0.05, 4, 128), CPU, dtype)


def storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, k", [(192, K), (96, K), (128, 1536)])  # 96: no multiple of the 64-row block
def test_dequantized_weight_is_the_reference_weight_and_the_kernels(dtype, n, k):
    torch.manual_seed(3)
    q = rtn_quantize(torch.randn(n, k) * 0.05, 4, 64)
    m = Int4Linear(q, CPU, dtype)
    w = m.dequantized()
    assert w.shape == (n, k) and w.dtype == dtype
    assert rel_err(w, q.dequantize(torch.float32)) <= ROUNDING[dtype]
    # the packed layout read from the bytes equals what the kernel computes on the identity
    assert torch.equal(w, m.dequantized_by_kernel())


def test_a_layout_that_does_not_decode_falls_back_to_the_kernel(monkeypatch):
    m = int4(128, torch.float32)
    want = m.dequantized_by_kernel()
    calls = []
    monkeypatch.setattr(Int4Linear, "dequantized_by_kernel", lambda self: calls.append(1) or want)
    assert torch.equal(m.dequantized(), want) and calls == []  # this CPU's layout decodes
    monkeypatch.setattr(qlinear, "_code_order", lambda rows, k, device: None)  # not a permutation
    assert torch.equal(m.dequantized(), want) and calls == [1]
    # a permutation, but the wrong one: caught by the check against the kernel
    monkeypatch.setattr(qlinear, "_code_order", lambda rows, k, device: torch.arange(rows * k).flip(0))
    assert torch.equal(m.dequantized(), want) and calls == [1, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_path_from_the_threshold_on_equals_tinygemm_within_rounding(dtype):
    m = int4(128, dtype)
    torch.manual_seed(1)
    x = torch.randn(40, K, dtype=dtype)
    want = {M: m._tinygemm(x[:M]) for M in (1, 3, 4, 8, 33, 40)}
    qlinear.set_int4_threshold(m, 4)
    assert m.dense_from == 4 and m.dense.shape == (128, K) and m.dense.dtype == dtype
    for M, y in want.items():
        got = m(x[:M])
        if M < 4:
            assert torch.equal(got, y)
        else:
            assert torch.equal(got, F.linear(x[:M], m.dense))
            assert rel_err(got, y) <= 2 * ROUNDING[dtype]
    # the rows counted are those of x.reshape(-1, k): [2, 2, k] is 4 rows, dense
    x3 = x[:4].reshape(2, 2, K)
    assert torch.equal(m(x3), F.linear(x[:4], m.dense).reshape(2, 2, 128))
    # and the branch really switches kernels: a zeroed dense weight shows from 4 rows on only
    m.dense.zero_()
    assert m(x[:3]).abs().max() > 0 and m(x[:4]).abs().max() == 0


def test_no_threshold_keeps_no_dense_weight():
    m = int4(128)
    assert m.dense is None and m.dense_from is None
    assert qlinear.set_int4_threshold([m], None) == 0 and m.dense is None
    assert qlinear.set_int4_threshold([m], 8) == 128 * K * 2  # bf16: 2 bytes/param
    assert "dense" not in m.state_dict()  # a runtime copy, never saved
    assert qlinear.set_int4_threshold(nn.Sequential(m), None) == 0
    assert m.dense is None and m.dense_from is None
    x = torch.randn(16, K, dtype=torch.bfloat16)
    assert torch.equal(m(x), m._tinygemm(x))
    with pytest.raises(ValueError, match="threshold"):
        m.set_dense_threshold(0)


def test_the_chooser_times_each_shape_once_and_weights_it_by_count(monkeypatch):
    mods = [int4(128, seed=0), int4(128, seed=1), int4(64, seed=2, k=512)]
    calls = []

    def fake(fn, device, reps=None):
        calls.append(device)
        return 1.0

    monkeypatch.setattr(qlinear, "time_call", fake)
    threshold, table = qlinear.choose_int4_threshold(nn.ModuleList(mods), buckets=(4, 1, 2))
    assert len(calls) == 2 * 2 * 3  # 2 shapes x 2 kernels x 3 buckets
    assert [r["rows"] for r in table] == [1, 2, 4]
    assert all(r["tinygemm_ms"] == r["dense_ms"] == 3.0 for r in table)  # 3 modules, 1 ms each
    assert threshold is None and {r["kernel"] for r in table} == {"tinygemm"}  # a tie buys no copy
    assert all(m.dense is None for m in mods)


def test_the_chooser_measures_a_sane_table():
    mods = [int4(128), int4(256, seed=1)]
    threshold, table = qlinear.choose_int4_threshold(mods, buckets=(1, 8, 32), reps=2)
    assert [r["rows"] for r in table] == [1, 8, 32]
    for r in table:
        assert 0 < r["tinygemm_ms"] < 1000 and 0 < r["dense_ms"] < 1000
        assert math.isfinite(r["tinygemm_ms"]) and math.isfinite(r["dense_ms"])
        assert r["kernel"] == ("dense" if threshold is not None and r["rows"] >= threshold else "tinygemm")
    assert threshold is None or threshold in (1, 8, 32)
    assert threshold == qlinear.pick_threshold([1, 8, 32], [r["tinygemm_ms"] for r in table],
                                               [r["dense_ms"] for r in table])
    assert all(m.dense is None for m in mods)  # choosing keeps nothing
    assert qlinear.choose_int4_threshold([nn.Linear(4, 4)]) == (None, [])


@pytest.mark.parametrize("tiny, dense, want", [
    ([1, 1, 1, 1], [2, 0.5, 2, 0.5], 8),        # dense wins at 2 too, but not at every larger bucket
    ([1, 1, 1, 1], [2, 2, 0.5, 0.5], 4),
    ([1, 1, 1, 1], [0.5, 0.5, 0.5, 0.5], 1),
    ([1, 1, 1, 1], [0.5, 0.5, 0.5, 2], None),   # loses at the largest: never dense
    ([1, 1, 1, 1], [2, 2, 0.97, 0.97], None),   # 3% faster is within the 5% margin
])
def test_the_threshold_rule(tiny, dense, want):
    assert qlinear.pick_threshold([1, 2, 4, 8], tiny, dense) == want


def fused_parts(dtype, widths=(128, 64, 64)):
    return [int4(n, dtype, seed=i) for i, n in enumerate(widths)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_int4_parts_share_the_joined_codes_and_answer_as_before(dtype):
    parts = fused_parts(dtype)
    torch.manual_seed(5)
    x = torch.randn(9, K, dtype=dtype)
    before = [p(x) for p in parts]
    own_scales = [p.scales_and_zeros for p in parts]
    joined = qlinear.fuse(parts)
    assert isinstance(joined, Int4Linear) and joined.out_features == 256
    assert torch.equal(joined(x), torch.cat(before, -1))
    offset = 0
    for p, y, s in zip(parts, before, own_scales):
        assert storage(p.packed) == storage(joined.packed)
        assert p.packed.data_ptr() == joined.packed.data_ptr() + offset  # CPU layout: [n, k/2] uint8
        assert p.packed.is_contiguous() and p.packed.shape == (p.out_features, K // 2)
        offset += p.out_features * K // 2
        assert p.scales_and_zeros is s and s.is_contiguous()  # the small part the parts keep
        assert torch.equal(p(x), y)
    total = sum({storage(t): t.untyped_storage().nbytes() for p in parts for t in p.buffers()}.values())
    assert total == 256 * K // 2 + sum(s.numel() * s.element_size() for s in own_scales)


@pytest.mark.parametrize("before_fuse", [False, True])
def test_fused_parts_view_the_joined_dense_weight(before_fuse):
    parts = fused_parts(torch.bfloat16)
    torch.manual_seed(6)
    x = torch.randn(16, K, dtype=torch.bfloat16)
    tiny = [p(x) for p in parts]
    if before_fuse:  # the threshold was set on the model before the decoder fused its linears
        qlinear.set_int4_threshold(parts, 8)
    joined = qlinear.fuse(parts)
    assert isinstance(joined, Int4Linear)
    # set through the parts (the model's modules): the joined module takes it, and its parts view it
    held = qlinear.set_int4_threshold(nn.ModuleList(parts), 8)
    assert held == 256 * K * 2  # one dense weight for all four modules
    assert joined.dense_from == 8 and all(p.dense_from == 8 for p in parts)
    col = 0
    for p, y in zip(parts, tiny):
        assert storage(p.dense) == storage(joined.dense)
        assert p.dense.data_ptr() == joined.dense[col].data_ptr()
        col += p.out_features
        assert torch.equal(p(x), F.linear(x, p.dense)) and rel_err(p(x), y) <= 2 * ROUNDING[torch.bfloat16]
    assert torch.equal(joined(x), torch.cat([p(x) for p in parts], -1))
    assert qlinear.set_int4_threshold([joined], None) == 0
    assert joined.dense is None and all(p.dense is None and p.dense_from is None for p in parts)


def test_parts_that_do_not_join_keep_their_own_codes_and_dense_weights():
    parts = fused_parts(torch.bfloat16, widths=(64, 32, 32))  # split the CPU kernel's 64-row n tiles
    ptrs = [storage(p.packed) for p in parts]
    fused = qlinear.fuse(parts)
    assert isinstance(fused, qlinear.Concat)
    assert [storage(p.packed) for p in parts] == ptrs
    assert qlinear.set_int4_threshold(fused, 2) == 128 * K * 2
    assert len({storage(p.dense) for p in parts}) == 3
    x = torch.randn(4, K, dtype=torch.bfloat16)
    assert torch.equal(fused(x), torch.cat([F.linear(x, p.dense) for p in parts], -1))


def test_fused_int8_parts_share_weight_and_scales():
    torch.manual_seed(7)
    parts = [Int8Linear(rtn_quantize(torch.randn(n, K) * 0.05, 8, -1), CPU) for n in (128, 64, 64)]
    x = torch.randn(5, K, dtype=torch.bfloat16)
    before = [p(x) for p in parts]
    joined = qlinear.fuse(parts)
    assert isinstance(joined, Int8Linear)
    assert torch.equal(joined(x), torch.cat(before, -1))
    col = 0
    for p, y in zip(parts, before):
        assert storage(p.weight) == storage(joined.weight) and storage(p.scales) == storage(joined.scales)
        assert p.weight.data_ptr() == joined.weight[col].data_ptr() and p.weight.is_contiguous()
        assert p.scales.data_ptr() == joined.scales[col:].data_ptr()
        col += p.out_features
        assert torch.equal(p(x), y)
