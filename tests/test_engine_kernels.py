"""The fused decode kernels (used on CUDA) under Triton's CPU interpreter: each against its torch
reference, and a whole decoder step with them against the torch step on the tiny model (fp32).
The interpreter must be chosen before triton is imported, so this runs in a child process."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = r"""
import torch
from transformers import Qwen3VLForConditionalGeneration
from shelfsight.engine import kernels
from shelfsight.engine.decoder import Decoder
from shelfsight.export import tiny

assert kernels.self_check(torch.device("cpu"), torch.float32) < 1e-5
torch.manual_seed(0)
model = Qwen3VLForConditionalGeneration(tiny.make_config("tiny")).eval()
with torch.inference_mode():
    dec = Decoder(model, slots=4, max_len=256)
    assert not dec.fused  # CPU: the torch ops
    for c in dec.k + dec.v:
        c.normal_()
    tokens = torch.tensor([11, 500, 0, 151645])
    cache_pos = torch.tensor([7, 0, 0, 200])
    rope_pos = torch.tensor([3, 0, 0, 150])
    write_slot = torch.tensor([0, 4, 4, 3])  # rows 1 and 2 are padding: they write to the spare slot
    kv_len = torch.tensor([8, 1, 1, 201])
    want = dec.forward(tokens, cache_pos, rope_pos, write_slot, kv_len, 256)
    k_want = [c.clone() for c in dec.k]
    dec.fused = True
    got = dec.forward(tokens, cache_pos, rope_pos, write_slot, kv_len, 256)
    err = float((got - want).abs().max() / want.abs().max())
    assert err < 1e-4, err
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(dec.k, k_want))
print("ok", err)
"""


def test_fused_kernels_match_torch_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_kernels_compile_for_hopper_without_a_gpu():
    """Triton compiles ahead of time for a target: catches what the interpreter lets through
    (typing, control flow, lowering) for the H100 (sm_90) the engine runs on, bf16 and fp32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from shelfsight.engine import triton_kernels as k

    def compile_(fn, sig, consts):
        sig = {**sig, **{name: "constexpr" for name in consts}}
        out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
        assert out.asm.get("ptx")

    for dt in ("bf16", "fp32"):
        p = f"*{dt}"
        for has_delta in (True, False):
            compile_(k.add_rms_kernel, dict(res_ptr=p, delta_ptr=p, w_ptr=p, res_out_ptr=p, out_ptr=p, N="i32",
                                            eps="fp32"), {"HAS_DELTA": has_delta, "BLOCK": 2048})
        compile_(k.qk_rope_kernel, dict(qkv_ptr=p, qkv_stride="i32", qw_ptr=p, kw_ptr=p, cos_ptr=p, sin_ptr=p,
                                        rope_ptr="*i64", q_ptr=p, kc_ptr=p, vc_ptr=p, slot_ptr="*i64", pos_ptr="*i64",
                                        T="i32", eps="fp32"), {"HQ": 16, "HKV": 8, "D": 128})
        compile_(k.silu_mul_kernel, dict(gu_ptr=p, out_ptr=p, inter="i32"), {"BLOCK": 1024})
