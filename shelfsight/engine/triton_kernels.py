"""The Triton kernels behind shelfsight.engine.kernels (imported only where they run: CUDA, or
Triton's interpreter in tests). Shapes and semantics are documented with their torch references there."""
import triton
import triton.language as tl


@triton.jit
def add_rms_kernel(res_ptr, delta_ptr, w_ptr, res_out_ptr, out_ptr, N, eps,
                    HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    m = offs < N
    dtype = out_ptr.dtype.element_ty
    x = tl.load(res_ptr + row * N + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_DELTA:
        d = tl.load(delta_ptr + row * N + offs, mask=m, other=0.0).to(tl.float32)
        x = (x + d).to(dtype).to(tl.float32)  # the residual stream is kept in the model dtype
        tl.store(res_out_ptr + row * N + offs, x.to(dtype), mask=m)
    var = tl.sum(x * x, axis=0) / N
    y = (x * tl.rsqrt(var + eps)).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + offs, (y * w).to(dtype), mask=m)

@triton.jit
def qk_rope_kernel(qkv_ptr, qkv_stride, qw_ptr, kw_ptr, cos_ptr, sin_ptr, rope_ptr, q_ptr, kc_ptr, vc_ptr,
                    slot_ptr, pos_ptr, T, eps, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)  # q heads, then k heads, then v heads
    HALF: tl.constexpr = D // 2
    o = tl.arange(0, HALF)
    dtype = q_ptr.dtype.element_ty
    src = qkv_ptr + row * qkv_stride + head * D
    x1 = tl.load(src + o).to(tl.float32)
    x2 = tl.load(src + HALF + o).to(tl.float32)
    slot = tl.load(slot_ptr + row)
    pos = tl.load(pos_ptr + row)
    if head >= HQ + HKV:  # v: straight into the cache
        dst = vc_ptr + ((slot * HKV + (head - HQ - HKV)) * T + pos) * D
        tl.store(dst + o, x1.to(dtype))
        tl.store(dst + HALF + o, x2.to(dtype))
    else:
        if head < HQ:
            w1 = tl.load(qw_ptr + o).to(tl.float32)
            w2 = tl.load(qw_ptr + HALF + o).to(tl.float32)
        else:
            w1 = tl.load(kw_ptr + o).to(tl.float32)
            w2 = tl.load(kw_ptr + HALF + o).to(tl.float32)
        var = (tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / D
        r = tl.rsqrt(var + eps)
        y1 = (x1 * r).to(dtype).to(tl.float32) * w1
        y2 = (x2 * r).to(dtype).to(tl.float32) * w2
        y1 = y1.to(dtype).to(tl.float32)
        y2 = y2.to(dtype).to(tl.float32)
        p = tl.load(rope_ptr + row)
        c = tl.load(cos_ptr + p * D + o).to(tl.float32)  # cos = cat(f, f): one half serves both
        s = tl.load(sin_ptr + p * D + o).to(tl.float32)
        out1 = (y1 * c - y2 * s).to(dtype)
        out2 = (y2 * c + y1 * s).to(dtype)
        if head < HQ:
            dst = q_ptr + (row * HQ + head) * D
        else:
            dst = kc_ptr + ((slot * HKV + (head - HQ)) * T + pos) * D
        tl.store(dst + o, out1)
        tl.store(dst + HALF + o, out2)

@triton.jit
def silu_mul_kernel(gu_ptr, out_ptr, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < inter
    dtype = out_ptr.dtype.element_ty
    g = tl.load(gu_ptr + row * 2 * inter + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * inter + inter + offs, mask=m, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * inter + offs, (s * u).to(dtype), mask=m)
