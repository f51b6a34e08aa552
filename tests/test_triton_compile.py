"""Every kernel compiles for an H100 (sm_90), on any machine, checked in a fresh Python process.

The interpreter that runs the other kernel tests on CPU executes Python, not the compiler, so it misses
what only compilation rejects (an if/else whose branches leave a name with different types, a dtype the
lowering refuses). Triton compiles ahead of time without a GPU, but not in a process where the
interpreter is on, hence the subprocess.
"""
import importlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (module, kernel, pointer dtypes by argument, constexprs, warps)
BF16 = "*bf16"
SAMPLER_PTRS = dict(base_ptr=BF16, reward_ptr=BF16, k_ptr="*i32", w_ptr="*fp32", t_ptr="*fp32",
                    seed_ptr="*i64", pos_ptr="*i64", val_ptr="*fp32", tok_ptr="*i32", out_tok_ptr="*i64",
                    out_lp_ptr="*fp32", tp_ptr="*fp32", mp_ptr="*fp32", top_tok_ptr="*i64", top_lp_ptr="*fp32")
ATTN_PTRS = dict(q_ptr=BF16, k_ptr=BF16, v_ptr=BF16, bt_ptr="*i32", len_ptr="*i64", out_ptr=BF16,
                 m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32", cu_ptr="*i32", qk_scale="fp32")
KERNELS = [
    ("pad_sample", "_chunk_kernel", SAMPLER_PTRS, dict(HAS_REWARD=True, CHUNK=4096, K_TILE=256, KEY_BITS=16), 8),
    ("pad_sample", "_merge_kernel", SAMPLER_PTRS,
     dict(HAS_REWARD=True, CHUNK=4096, K_TILE=256, CHUNKS_PAD=32, KEY_BITS=16, HAS_FILTER=False, NUM_TOP=0), 16),
    ("pad_sample", "_merge_kernel", SAMPLER_PTRS,       # top-p / min-p sort the whole tile; 20 alternatives
     dict(HAS_REWARD=True, CHUNK=4096, K_TILE=256, CHUNKS_PAD=32, KEY_BITS=16, HAS_FILTER=True, NUM_TOP=20), 16),
    ("pad_sample", "_merge_kernel", SAMPLER_PTRS,
     dict(HAS_REWARD=False, CHUNK=4096, K_TILE=16, CHUNKS_PAD=32, KEY_BITS=16, HAS_FILTER=True, NUM_TOP=5), 4),
    ("paged_attention", "_decode_kernel", ATTN_PTRS,
     dict(GROUP=4, G_PAD=16, D=128, D_PAD=128, BLOCK_SIZE=16, TILE=64, PARTITION=256, SPLIT=True,
          PRECISION="tf32"), 8),
    ("paged_attention", "_combine_kernel", ATTN_PTRS, dict(D=128, D_PAD=128, PARTITION=256, P_PAD=64), 8),
    ("paged_attention", "_prefill_kernel", ATTN_PTRS,
     dict(GROUP=4, D=128, D_PAD=128, BLOCK_SIZE=16, BLOCK_M=64, BLOCK_N=64, PRECISION="tf32"), 8),
    ("kv_write", "_write_kv_kernel", dict(k_ptr=BF16, v_ptr=BF16, kc_ptr=BF16, vc_ptr=BF16, slot_ptr="*i64"),
     dict(KV_HEADS=8, D=128, H_PAD=8, D_PAD=128, BLOCK_SIZE=16), 4),
    ("activation", "_silu_and_mul_kernel", dict(x_ptr=BF16, out_ptr=BF16), dict(BLOCK=1024), 4),
    ("rms_norm", "_rms_norm_kernel", dict(x_ptr=BF16, res_ptr=BF16, w_ptr=BF16, out_ptr=BF16, eps="fp32"),
     dict(HAS_RESIDUAL=True, BLOCK=4096), 16),
    ("rotary", "_rotary_kernel", dict(q_ptr=BF16, k_ptr=BF16, pos_ptr="*i64", cos_ptr="*fp32", sin_ptr="*fp32"),
     dict(HEADS=32, KV_HEADS=8, H_PAD=32, KV_PAD=8, HALF=64, HALF_PAD=64), 4),
]


def compile_all():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for module, name, types, constexprs, warps in KERNELS:
        fn = getattr(importlib.import_module(f"triton_kernels.{module}"), name)
        signature = {arg: "constexpr" if arg in constexprs else types.get(arg, "i32") for arg in fn.arg_names}
        triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps})


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


if __name__ == "__main__":
    compile_all()
