"""Compiles every Triton kernel of the CUDA path for an H200 (sm_90) without a GPU: Triton's front end, its GPU passes
and the bundled ptxas, for float32 / bfloat16 / float16 activations and every constexpr variant. Run in a process
without TRITON_INTERPRET (tests/integration/test_triton_compiles.py); prints one line per dtype."""
import os
import sys

assert not os.environ.get('TRITON_INTERPRET'), 'run without TRITON_INTERPRET: the interpreter compiles nothing'

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from timm_spe import _triton_kernels as K  # noqa: E402

TARGET = GPUTarget('cuda', 90, 32)


def compile_kernel(fn, signature, constexprs):
    """``triton.compile`` of ``fn`` to a cubin; ``signature`` types the arguments that are not constexpr."""
    full = {name: 'constexpr' if name in constexprs else signature[name] for name in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=full, constexprs=constexprs), target=TARGET)


def compile_all(act: str) -> int:
    """Every kernel and variant for activations of Triton type ``act`` ('fp32', 'bf16', 'fp16'); how many compiled."""
    a = '*' + act
    index = dict(C='i32', HW='i32', NC='i32', s_n='i32', s_c='i32', s_hw='i32', g_n='i32', g_c='i32', g_hw='i32')

    def signature(kernel, **types):
        """float32 pointers but for ``types``; the index arguments the kernel takes as i32."""
        sig = {n: '*fp32' for n in kernel.arg_names}
        sig.update({n: t for n, t in index.items() if n in sig}, **types)
        return sig
    done = 0
    for paper in (False, True):
        for tail in (False, True):
            sig = signature(K._tail_kernel, y_ptr=a, s_ptr=a, out_ptr=a, stats_ptr=a, idx_ptr='*i64')
            compile_kernel(K._tail_kernel, sig, dict(PAPER=paper, TAIL=tail, BLOCK_C=16, BLOCK_HW=64))
            done += 1
    sig = signature(K._sums_kernel, g_ptr=a, out_ptr=a, x_ptr=a, gr_ptr=a, idx_ptr='*i64')
    compile_kernel(K._sums_kernel, sig, dict(BLOCK_C=16, BLOCK_HW=64))
    compile_kernel(K._dot_kernel, signature(K._dot_kernel, g_ptr=a, x_ptr=a), dict(BLOCK_C=16, BLOCK_HW=64))
    done += 2
    for bn in (False, True):
        for paper in (False, True):
            sig = signature(K._gate_backward_kernel, stats_ptr=a, N='i32', C='i32')
            compile_kernel(K._gate_backward_kernel, sig, dict(PAPER=paper, BN=bn, BLOCK_N=64, BLOCK_C=32))
            done += 1
        sig = signature(K._input_grad_kernel, g_ptr=a, x_ptr=a, dx_ptr=a, stats_ptr=a, idx_ptr='*i64', on_ptr='*i1',
                        count='fp32', NUM='i32', eta='fp32')
        compile_kernel(K._input_grad_kernel, sig, dict(BN=bn, BLOCK_C=16, BLOCK_HW=64, BLOCK_MIX=8))
        done += 1
    sig = dict(vv_ptr='*fp32', NC='i32', p_ptr='*fp32', on_ptr='*i1', gp_ptr='*fp32', NUM='i32', eta='fp32')
    compile_kernel(K._mix_backward_kernel, sig, dict(BLOCK=8))
    return done + 1


if __name__ == '__main__':
    for act in sys.argv[1:] or ['fp32', 'bf16', 'fp16']:
        print(f'{act}: {compile_all(act)} kernels compiled for sm_90', flush=True)
