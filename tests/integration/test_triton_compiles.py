"""The CUDA path's Triton kernels compile for an H200 (sm_90) here, without a GPU: what the interpreter, which runs
them in the unit tests, cannot check (types, constexpr branches, the GPU passes and ptxas), and what torch.compile makes
of their ops there (the interpreter's kernels cannot be traced)."""
import os
import subprocess
import sys

from helpers import ROOT


def test_every_triton_kernel_compiles_for_sm_90_in_every_dtype_and_variant():
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    proc = subprocess.run([sys.executable, str(ROOT / 'tests' / 'triton_compile_check.py')], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [f'{act}: 13 kernels compiled for sm_90' for act in ('fp32', 'bf16', 'fp16')]


def test_under_torch_compile_every_triton_op_is_its_kernel_launch_and_eager_calls_launch_it_unwrapped():
    """AOTAutograd (torch.compile's tracer) turns each op into its kernel launch, which inductor compiles into its own
    code (no opaque op call left); eager calls launch the kernel itself (tests/triton_trace_check.py, on fake CUDA
    tensors: no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    proc = subprocess.run([sys.executable, str(ROOT / 'tests' / 'triton_trace_check.py')], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels = ('_tail_kernel _sums_kernel _gate_backward_kernel _input_grad_kernel _mix_backward_kernel '
               '_tail_kernel _dot_kernel _gate_backward_kernel _input_grad_kernel')
    assert proc.stdout.splitlines() == [
        f'nchw: {kernels}', f'channels_last: {kernels}',
        'eager map_dot: direct: grid (2, 1) wrapped False, op: grid (2, 1) wrapped False']
