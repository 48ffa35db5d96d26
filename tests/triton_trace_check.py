"""What torch.compile's inductor receives from SPE's Triton ops, without a GPU: each ``torch.ops.timm_spe.*`` op,
traced by AOTAutograd (as ``torch.compile`` traces a train step) on fake CUDA tensors, is its own kernel launch
(``triton_kernel_wrapper_functional``), which inductor puts in its generated code, and no opaque op call is left.
The ops of a block tail's forward and backward and of the SPE layer alone are traced in the order the autograd
functions call them, for NCHW and channels_last. Run in a process without TRITON_INTERPRET (the interpreter's kernels
cannot be traced: there the ops are opaque custom ops; tests/integration/test_triton_compiles.py); prints one line
per layout: the kernels launched, in order; then that eager calls, direct or through the op, launch the kernel itself
(its ``run``, recorded here instead of running, with ``wrapped False``), not through the tracing wrapper."""
import os

assert not os.environ.get('TRITON_INTERPRET'), 'run without TRITON_INTERPRET: interpreted kernels are not traced'

import torch  # noqa: E402
from functorch.compile import make_boxed_func  # noqa: E402
from torch._functorch.aot_autograd import aot_function  # noqa: E402
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: E402
from torch._library.triton import is_wrap_triton_enabled  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from timm_spe import _triton_ops  # noqa: E402


def chain(x, shortcut, w, b, running_mean, running_var, p, on, w_exc, b_exc, w_rew, b_rew, grad):
    """The ops as the Triton autograd functions call them: the block tail's forward and backward (with and without
    BN's input gradient), then the SPE layer alone's."""
    k = torch.ops.timm_spe
    y, mean, invstd = torch.native_batch_norm(x, w, b, running_mean, running_var, True, 0.1, 1e-5)
    stats, idx = k.bn_spe_tail_(y, shortcut, p, w_exc, b_exc, w_rew, b_rew, False)
    gr, sums = k.relu_map_sums(grad, y, x, mean, idx)
    vv, *g_tail = k.bn_gate_backward(sums, stats, mean, invstd, w, b, p, w_exc, b_exc, w_rew, b_rew, False)
    dx, g_p = k.bn_input_grad(gr, x, stats, mean, invstd, w, g_tail[4], g_tail[5], idx, vv, p, on, 0.1)
    g_p_alone = k.mix_backward(stats, vv, p, on, 0.1)
    out, stats2, idx2 = k.spe_scale(x, p, w_exc, b_exc, w_rew, b_rew, True)
    vv2, *g_layer = k.gate_backward(k.map_dot(grad, x), stats2, p, w_exc, b_exc, w_rew, b_rew, True)
    dx2, g_p2 = k.scale_input_grad(grad, x, stats2, idx2, vv2, p, on, 0.1)
    return y, gr, dx, g_p, g_p_alone, out, dx2, g_p2, *g_tail, *g_layer


def traced_launches(memory_format) -> list:
    """The graph AOTAutograd hands the compiler for :func:`chain`: its Triton kernels' names in order, and ``OPAQUE
    <op>`` for any timm_spe op left as a call."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)
    traced = aot_function(chain, fw_compiler=capture)
    with FakeTensorMode(allow_non_fake_inputs=True):
        n, c, h, w = 4, 24, 8, 8

        def t(*shape, dtype=torch.float32):
            return torch.empty(shape, dtype=dtype, device='cuda')
        x, shortcut, grad = (t(n, c, h, w).contiguous(memory_format=memory_format) for _ in range(3))
        traced(x, shortcut, t(c), t(c), t(c), t(c), t(2), t(dtype=torch.bool), t(c), t(c), t(c), t(c), grad)
    names = []
    for node in graphs[0].graph.nodes:
        target = str(node.target)
        if node.op == 'call_function' and 'triton_kernel_wrapper' in target:
            names.append(kernel_side_table.get_kernel(node.kwargs['kernel_idx']).fn.__name__)
        elif node.op == 'call_function' and 'timm_spe' in target:
            names.append(f'OPAQUE {target}')
    return names


def eager_launches() -> list:
    """``(call, kernel launched)`` of ``map_dot`` called directly and through its op on CPU tensors, with the kernel's
    ``run`` recorded instead of launched."""
    launched = []
    kernel = _triton_ops._dot_kernel
    kernel.run = lambda *args, grid, **kwargs: launched.append(f'grid {grid} wrapped {is_wrap_triton_enabled()}')
    try:
        x = torch.ones((2, 3, 4, 4))
        calls = []
        for call, fn in (('direct', _triton_ops.direct.map_dot), ('op', torch.ops.timm_spe.map_dot)):
            fn(x, x)
            calls.append(f'{call}: {launched.pop() if launched else None}')
    finally:
        del kernel.run
    return calls


if __name__ == '__main__':
    assert _triton_ops.TRACEABLE, 'the ops are custom ops here (torch without triton_op?)'
    for layout, memory_format in (('nchw', torch.contiguous_format), ('channels_last', torch.channels_last)):
        print(f'{layout}: {" ".join(traced_launches(memory_format))}', flush=True)
    print(f'eager map_dot: {", ".join(eager_launches())}', flush=True)
