"""Fused elementwise kernels (Triton) for the decode step on CUDA, each with its torch reference.

A decode step at batch 1 is bound by kernel count, not bytes: the torch version of a layer is ~60
small kernels (RMSNorm alone is 7). These three cut a layer to ~10 (with the 4 matmuls and attention):
    add_rms_norm      residual += delta, then RMSNorm of it (one kernel; transformers' rounding points)
    qk_norm_rope      per head of a fused q|k|v row: q/k RMSNorm over head_dim, RoPE at the row's
                      position; q to an output, k and v straight into the row's cache slot
    silu_mul          SiLU(gate) * up over a fused gate|up row
The decoder uses them only on CUDA and only after `usable()` has checked them against the references
on this device (else it keeps the torch ops, which are what CPU runs). Tests run the kernels under
Triton's interpreter on CPU (tests/test_engine_kernels.py).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_KERNELS = None  # built on first use: a CPU-only process never imports triton


# ---- torch references (also the CPU path) ----
def rms_norm_ref(x, weight, eps):
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def add_rms_norm_ref(res, delta, weight, eps):
    res = res + delta if delta is not None else res
    return res, rms_norm_ref(res, weight, eps)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def qk_norm_rope_ref(qkv, q_w, k_w, cos, sin, rope_pos, k_cache, v_cache, write_slot, cache_pos, hq, hkv, eps):
    """qkv [B, (hq+2hkv)*D] -> q [B, hq, D]; k, v written to cache[write_slot, :, cache_pos]."""
    B, D = qkv.shape[0], k_cache.shape[-1]
    q, k, v = qkv.split([hq * D, hkv * D, hkv * D], dim=-1)
    c, s = cos[rope_pos][:, None], sin[rope_pos][:, None]
    q = rms_norm_ref(q.reshape(B, hq, D), q_w, eps)
    k = rms_norm_ref(k.reshape(B, hkv, D), k_w, eps)
    q = q * c + rotate_half(q) * s
    k = k * c + rotate_half(k) * s
    T = k_cache.shape[2]
    where = ((write_slot[:, None] * hkv + torch.arange(hkv, device=qkv.device)[None]) * T
             + cache_pos[:, None]).reshape(-1)
    k_cache.view(-1, D).index_copy_(0, where, k.reshape(-1, D))
    v_cache.view(-1, D).index_copy_(0, where, v.reshape(-1, D))
    return q


def silu_mul_ref(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---- Triton ----
def _build():
    """-> (triton, add_rms, qk_rope, silu_mul); a CPU-only process never imports triton."""
    global _KERNELS
    if _KERNELS is None:
        import triton

        from shelfsight.engine import triton_kernels as k

        _KERNELS = (triton, k.add_rms_kernel, k.qk_rope_kernel, k.silu_mul_kernel)
    return _KERNELS


def add_rms_norm(res, delta, weight, eps):
    """-> (res + delta, RMSNorm(res + delta) * weight); res, delta [B, N] contiguous."""
    triton, kernel, _, _ = _build()
    B, N = res.shape
    out = torch.empty_like(res)
    res_out = torch.empty_like(res) if delta is not None else res
    kernel[(B,)](res, delta if delta is not None else res, weight, res_out, out, N, eps,
                          HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(N))
    return res_out, out


def qk_norm_rope(qkv, q_w, k_w, cos, sin, rope_pos, k_cache, v_cache, write_slot, cache_pos, hq, hkv, eps):
    _, _, kernel, _ = _build()
    B, D = qkv.shape[0], k_cache.shape[-1]
    q = torch.empty(B, hq, D, device=qkv.device, dtype=qkv.dtype)
    kernel[(B, hq + 2 * hkv)](qkv, qkv.stride(0), q_w, k_w, cos, sin, rope_pos, q, k_cache, v_cache,
                                       write_slot, cache_pos, k_cache.shape[2], eps, HQ=hq, HKV=hkv, D=D)
    return q


def silu_mul(gate_up):
    triton, _, _, kernel = _build()
    B, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(B, inter, device=gate_up.device, dtype=gate_up.dtype)
    block = min(1024, triton.next_power_of_2(inter))
    kernel[(B, triton.cdiv(inter, block))](gate_up, out, inter, BLOCK=block)
    return out


def self_check(device, dtype, hidden=256, inter=384, hq=4, hkv=2, d=64, slots=3, T=16, eps=1e-6) -> float:
    """Largest relative error of the kernels against the references on random data (raises if a
    kernel cannot run here)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    def rel(a, b):
        return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6))

    B = 3
    worst = 0.0
    res, delta, w = rnd(B, hidden), rnd(B, hidden), rnd(hidden)
    for dl in (delta, None):
        (r1, o1), (r2, o2) = add_rms_norm(res, dl, w, eps), add_rms_norm_ref(res, dl, w, eps)
        worst = max(worst, rel(r1, r2), rel(o1, o2))
    gu = rnd(B, 2 * inter)
    worst = max(worst, rel(silu_mul(gu), silu_mul_ref(gu)))
    qkv = rnd(B, (hq + 2 * hkv) * d)
    qw, kw = rnd(d), rnd(d)
    freqs = torch.arange(T, device=device).float()[:, None] * (1.0 / 1e4 ** (torch.arange(0, d, 2, device=device)
                                                                               .float() / d))[None]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    slot = torch.tensor([2, 0, 3], device=device)
    pos = torch.tensor([5, 0, 15], device=device)
    rope = torch.tensor([3, 0, 9], device=device)
    caches = [torch.zeros(slots + 1, hkv, T, d, device=device, dtype=dtype) for _ in range(4)]
    q1 = qk_norm_rope(qkv, qw, kw, cos, sin, rope, caches[0], caches[1], slot, pos, hq, hkv, eps)
    q2 = qk_norm_rope_ref(qkv, qw, kw, cos, sin, rope, caches[2], caches[3], slot, pos, hq, hkv, eps)
    return max(worst, rel(q1, q2), rel(caches[0], caches[2]), rel(caches[1], caches[3]))


def usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused kernels run here and agree with the references (bf16: within rounding)."""
    if device.type != "cuda":
        return False
    try:
        err = self_check(device, dtype)
    except Exception as e:
        log.warning("fused decode kernels unavailable (%s: %s); using torch ops", type(e).__name__, e)
        return False
    limit = 3e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4  # bf16: an ulp or two
    if not err <= limit:
        log.warning("fused decode kernels disagree with the reference (relative error %.3g); using torch ops", err)
        return False
    return True
