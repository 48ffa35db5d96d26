""" SPE's Triton kernels as launch functions, and as ``torch.ops.timm_spe.*`` ops

Each function allocates its outputs and launches one kernel of :mod:`timm_spe._triton_kernels`. They are registered
as ``torch.library.triton_op``s, so ``torch.compile`` (``fullgraph``) traces each as one call in Dynamo's graph and
then, in AOTAutograd, into its allocations and its kernel launch, which inductor puts in its own generated code (no
op dispatch at run time); ``torch.export`` keeps each as one op, and an op counter (``benchmarks/count_ops.py``) sees
one op per launch. Under Triton's interpreter (``TRITON_INTERPRET=1``: CPU tensors, the tests) the kernels cannot be
traced, so there they are opaque ``torch.library.custom_op``s with fake implementations, traced as one call each.
Plain eager code calls the same functions directly (:data:`direct`), without the dispatcher (on an H200 one call
took 85.1 us of host time through the custom op, 46.7 us direct): same arguments, same kernels, same values
(:func:`timm_spe.spe_triton.kernels` picks). Imported where the kernels run (:func:`timm_spe.spe_triton.applies`,
:class:`timm_spe.config.set_triton_kernels`).
"""
from types import SimpleNamespace

import torch
import triton
from torch.library import custom_op
from triton.runtime.jit import JITFunction

try:  # torch 2.6 and newer: ops whose Triton kernels torch.compile sees
    from torch._library.triton import set_wrap_triton_enabled
    from torch.library import triton_op, wrap_triton
except ImportError:
    triton_op = set_wrap_triton_enabled = None

    def wrap_triton(kernel):
        return kernel

from ._triton_kernels import (
    _dot_kernel,
    _gate_backward_kernel,
    _input_grad_kernel,
    _mix_backward_kernel,
    _sums_kernel,
    _tail_kernel,
)

__all__ = ['direct', 'geometry', 'probe', 'TRACEABLE']

# triton_ops where the kernels are compiled ones (JITFunction; under the interpreter they are InterpretedFunctions,
# which torch.compile cannot trace: custom ops with fake implementations there)
TRACEABLE = triton_op is not None and isinstance(_tail_kernel, JITFunction)

# the launch functions by op name, called directly in plain eager code
direct = SimpleNamespace()
_GEOMETRY = {}


def geometry(t: torch.Tensor):
    """``(N, C, HW, N * C, s_n, s_c, s_hw, grid, BLOCK_C, BLOCK_HW)`` of the per-(n, c) kernels for a 4-D ``t``
    (a program per n and block of channels), cached per shape and strides. ``s_hw`` steps through H x W as one
    dimension (``None`` where ``t``'s H and W do not merge into one); a dimension of size 1 gets stride 0, so that
    equal strides mean equal addresses."""
    key = (t.shape, t.stride())
    try:
        g = _GEOMETRY.get(key)
    except TypeError:  # symbolic sizes (torch.compile's dynamic shapes) do not hash: computed, not kept
        key = g = None
    if g is None:
        if len(_GEOMETRY) > 1024:  # shapes that keep changing: start over rather than grow
            _GEOMETRY.clear()
        n, c, h, w = t.shape
        s_n, s_c, s_h, s_w = t.stride()
        s_hw = 0 if h * w == 1 else s_w if w > 1 else s_h
        if h > 1 and w > 1 and s_h != w * s_w:
            s_hw = None
        block_c = min(triton.next_power_of_2(c), 16)
        block_hw = max(16, min(triton.next_power_of_2(h * w), 4096 // block_c))
        g = (n, c, h * w, n * c, s_n if n > 1 else 0, s_c if c > 1 else 0, s_hw, (n, triton.cdiv(c, block_c)),
             block_c, block_hw)
        if key is not None:
            _GEOMETRY[key] = g
    return g


def _in_layout(t: torch.Tensor, like: torch.Tensor, g) -> torch.Tensor:
    """``t`` where it has the strides of geometry ``g`` (``like``'s), else a copy in ``like``'s layout."""
    if geometry(t)[4:7] == g[4:7]:
        return t
    return t.contiguous(memory_format=torch.contiguous_format if like.is_contiguous() else torch.channels_last)


def _merged(grad: torch.Tensor, like: torch.Tensor):
    """``grad`` and its geometry, copied to ``like``'s layout first where its H and W do not merge (an odd view)."""
    g = geometry(grad)
    if g[6] is None:
        grad = grad.contiguous(memory_format=torch.contiguous_format if like.is_contiguous() else torch.channels_last)
        g = geometry(grad)
    return grad, g


def _op(name: str, mutates_args=()):
    """Register the decorated launch function as ``timm_spe::<name>`` (a ``triton_op`` where :data:`TRACEABLE`, else a
    ``custom_op``) and keep it in :data:`direct`, called there with ``wrap_triton`` passing the kernels through (as
    the op's own eager call does)."""
    def register(fn):
        if not TRACEABLE:
            setattr(direct, name, fn)
            return custom_op(f'timm_spe::{name}', fn, mutates_args=mutates_args)

        def launch(*args):
            with set_wrap_triton_enabled(False):
                return fn(*args)
        launch.__name__ = launch.__qualname__ = name
        setattr(direct, name, launch)
        return triton_op(f'timm_spe::{name}', fn, mutates_args=mutates_args)
    return register


def _fake(op):
    """Register the decorated function as ``op``'s fake implementation where ``op`` is a custom op (a ``triton_op``
    traces its own function with fake tensors)."""
    def register(fn):
        if not TRACEABLE:
            op.register_fake(fn)
        return fn
    return register


def _pools_and_gate(y, shortcut, out, p, w_exc, b_exc, w_rew, b_rew, paper):
    g = n, c, hw, nc, s_n, s_c, s_hw, grid, block_c, block_hw = geometry(y)
    if shortcut is not None:
        shortcut = _in_layout(shortcut, y, g)
    stats = torch.empty((3, n, c), dtype=y.dtype, device=y.device)
    idx = torch.empty((2, n, c), dtype=torch.long, device=y.device)
    wrap_triton(_tail_kernel)[grid](
        y, y if shortcut is None else shortcut, out, p, w_exc, b_exc, w_rew, b_rew, stats, idx, c, hw, nc,
        s_n, s_c, s_hw, PAPER=paper, TAIL=shortcut is not None, BLOCK_C=block_c, BLOCK_HW=block_hw)
    return stats, idx


@_op('bn_spe_tail_', mutates_args={'y'})
def bn_spe_tail_(y: torch.Tensor, shortcut: torch.Tensor, p: torch.Tensor, w_exc: torch.Tensor,
                 b_exc: torch.Tensor, w_rew: torch.Tensor, b_rew: torch.Tensor, paper: bool,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``relu(y * gate + shortcut)`` written over ``y``; ``stats`` (max, min, gate) and ``idx`` (their indices)
    returned."""
    return _pools_and_gate(y, shortcut, y, p, w_exc, b_exc, w_rew, b_rew, paper)


@_op('spe_scale')
def spe_scale(x: torch.Tensor, p: torch.Tensor, w_exc: torch.Tensor, b_exc: torch.Tensor, w_rew: torch.Tensor,
              b_rew: torch.Tensor, paper: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x * gate`` (a new tensor), then ``stats`` and ``idx``."""
    out = torch.empty_like(x)
    return (out, *_pools_and_gate(x, None, out, p, w_exc, b_exc, w_rew, b_rew, paper))


@_op('relu_map_sums')
def relu_map_sums(grad: torch.Tensor, out: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, idx: torch.Tensor,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient through the block's ReLU (``grad`` where ``out > 0``; a new tensor in ``x``'s layout), and per
    (n, c) ``sum_hw`` of it, of it times ``x - mean``, and ``x`` at the max and at the min (``sums``, float32)."""
    g = n, c, hw, nc, s_n, s_c, s_hw, grid, block_c, block_hw = geometry(x)
    grad, (_, _, _, _, g_n, g_c, g_hw, _, _, _) = _merged(grad, x)
    out = _in_layout(out, x, g)
    gr = torch.empty_like(x)
    sums = torch.empty((4, n, c), dtype=torch.float32, device=x.device)
    wrap_triton(_sums_kernel)[grid](grad, out, x, gr, mean, idx, sums, c, hw, nc, s_n, s_c, s_hw, g_n, g_c, g_hw,
                       BLOCK_C=block_c, BLOCK_HW=block_hw)
    return gr, sums


@_op('map_dot')
def map_dot(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per (n, c): ``sum_hw(grad * x)`` (float32)."""
    n, c, hw, nc, s_n, s_c, s_hw, grid, block_c, block_hw = geometry(x)
    grad, (_, _, _, _, g_n, g_c, g_hw, _, _, _) = _merged(grad, x)
    out = torch.empty((n, c), dtype=torch.float32, device=x.device)
    wrap_triton(_dot_kernel)[grid](
        grad, x, out, c, hw, s_n, s_c, s_hw, g_n, g_c, g_hw, BLOCK_C=block_c, BLOCK_HW=block_hw)
    return out


def _gate_geometry(n, c):
    """``(BLOCK_N, BLOCK_C, programs)`` of the gate's backward: a program per block of channels."""
    block_c = min(triton.next_power_of_2(c), 32)
    return min(triton.next_power_of_2(n), 64), block_c, triton.cdiv(c, block_c)


def _gate_backward(sums, stats, mean, invstd, bn_w, bn_b, p, w_exc, b_exc, w_rew, b_rew, paper, bn):
    n, c = stats.shape[1], stats.shape[2]
    block_n, block_c, num = _gate_geometry(n, c)
    vv = torch.empty((2 * n * c + 2 * num,), dtype=torch.float32, device=stats.device)
    g_we, g_be, g_wr, g_br = (torch.empty((c,), dtype=torch.float32, device=stats.device) for _ in range(4))
    s_dy, s_dyx = (torch.empty((c if bn else 0,), dtype=torch.float32, device=stats.device) for _ in range(2))
    wrap_triton(_gate_backward_kernel)[(num,)](
        sums, stats, mean, invstd, bn_w, bn_b, p, w_exc, b_exc, w_rew, b_rew, vv, g_we, g_be, g_wr, g_br, s_dy, s_dyx,
        n, c, PAPER=paper, BN=bn, BLOCK_N=block_n, BLOCK_C=block_c)
    return vv, g_we, g_be, g_wr, g_br, s_dy, s_dyx


@_op('bn_gate_backward')
def bn_gate_backward(sums: torch.Tensor, stats: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                     bn_w: torch.Tensor, bn_b: torch.Tensor, p: torch.Tensor, w_exc: torch.Tensor, b_exc: torch.Tensor,
                     w_rew: torch.Tensor, b_rew: torch.Tensor, paper: bool,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                torch.Tensor]:
    """The gate's backward behind a training-mode BN: ``vv`` (the pooling gradients scaled for BN's input gradient,
    then per channel block the two partial gradients of ``(lambda, 1 - lambda)``), the gradients of ``w_exc, b_exc,
    w_rew, b_rew``, BN's ``sum(dy)`` and ``sum(dy * xhat)``."""
    return _gate_backward(sums, stats, mean, invstd, bn_w, bn_b, p, w_exc, b_exc, w_rew, b_rew, paper, True)


@_op('gate_backward')
def gate_backward(grad_gate: torch.Tensor, stats: torch.Tensor, p: torch.Tensor, w_exc: torch.Tensor,
                  b_exc: torch.Tensor, w_rew: torch.Tensor, b_rew: torch.Tensor, paper: bool,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gate's backward for its gradient ``grad_gate`` (N x C): ``vv`` (the pooling gradients, then the partial
    gradients of ``(lambda, 1 - lambda)``) and the gradients of ``w_exc, b_exc, w_rew, b_rew``."""
    vv, g_we, g_be, g_wr, g_br, _, _ = _gate_backward(
        grad_gate, stats, stats, stats, stats, stats, p, w_exc, b_exc, w_rew, b_rew, paper, False)
    return vv, g_we, g_be, g_wr, g_br


def _mix_geometry(stats, vv):
    """``(N * C, programs of the gate's backward, BLOCK)`` of ``p``'s gradient from ``vv``."""
    nc = stats.shape[1] * stats.shape[2]
    num = (vv.shape[0] - 2 * nc) // 2
    return nc, num, triton.next_power_of_2(num)


@_op('mix_backward')
def mix_backward(stats: torch.Tensor, vv: torch.Tensor, p: torch.Tensor, on: torch.Tensor, eta: float) -> torch.Tensor:
    """``p``'s gradient from the partial gradients of ``(lambda, 1 - lambda)`` in ``vv``, plus ``2 * eta * p`` where
    ``on`` (where no input gradient is needed; else the input gradient's op computes it)."""
    g_p = torch.empty_like(p)
    nc, num, block = _mix_geometry(stats, vv)
    wrap_triton(_mix_backward_kernel)[(1,)](vv, nc, p, on, g_p, num, eta, BLOCK=block)
    return g_p


@_op('bn_input_grad')
def bn_input_grad(grad: torch.Tensor, x: torch.Tensor, stats: torch.Tensor, mean: torch.Tensor,
                  invstd: torch.Tensor, bn_w: torch.Tensor, s_dy: torch.Tensor, s_dyx: torch.Tensor,
                  idx: torch.Tensor, vv: torch.Tensor, p: torch.Tensor, on: torch.Tensor, eta: float,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """BN's input gradient for ``dy = grad * gate + (the pooling gradients at the extrema)``, in ``x``'s dtype and
    layout, and ``p``'s gradient (:func:`mix_backward`'s)."""
    n, c, hw, nc, s_n, s_c, s_hw, grid, block_c, block_hw = geometry(x)
    grad, (_, _, _, _, g_n, g_c, g_hw, _, _, _) = _merged(grad, x)
    _, num, block = _mix_geometry(stats, vv)
    dx, g_p = torch.empty_like(x), torch.empty_like(p)
    wrap_triton(_input_grad_kernel)[grid](
        grad, x, dx, stats, mean, invstd, bn_w, s_dy, s_dyx, idx, vv, p, on, g_p, c, hw, nc, float(n * hw), num, eta,
        s_n, s_c, s_hw, g_n, g_c, g_hw, BN=True, BLOCK_C=block_c, BLOCK_HW=block_hw, BLOCK_MIX=block)
    return dx, g_p


@_op('scale_input_grad')
def scale_input_grad(grad: torch.Tensor, x: torch.Tensor, stats: torch.Tensor, idx: torch.Tensor, vv: torch.Tensor,
                     p: torch.Tensor, on: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``x``'s gradient of ``x * gate`` (``grad * gate`` with the pooling gradients added at the extrema, in ``x``'s
    layout), and ``p``'s gradient (:func:`mix_backward`'s)."""
    n, c, hw, nc, s_n, s_c, s_hw, grid, block_c, block_hw = geometry(x)
    grad, (_, _, _, _, g_n, g_c, g_hw, _, _, _) = _merged(grad, x)
    _, num, block = _mix_geometry(stats, vv)
    dx, g_p = torch.empty_like(x, dtype=grad.dtype), torch.empty_like(p)
    wrap_triton(_input_grad_kernel)[grid](
        grad, grad, dx, stats, stats, stats, stats, stats, stats, idx, vv, p, on, g_p, c, hw, nc, 1., num, eta,
        s_n, s_c, s_hw, g_n, g_c, g_hw, BN=False, BLOCK_C=block_c, BLOCK_HW=block_hw, BLOCK_MIX=block)
    return dx, g_p


def probe(device: torch.device) -> None:
    """Compile and launch one small kernel on ``device``; raises what Triton raises where it cannot (no C compiler,
    no ptxas, a driver too old for its code, ...)."""
    x = torch.ones((1, 1, 1, 1), device=device)
    direct.map_dot(x, x)


# Fake (meta) implementations of the custom ops (under the interpreter): torch.compile and torch.export trace each
# op as one opaque call.
@_fake(bn_spe_tail_)
def _(y, shortcut, p, w_exc, b_exc, w_rew, b_rew, paper):
    n, c = y.shape[0], y.shape[1]
    return y.new_empty((3, n, c)), y.new_empty((2, n, c), dtype=torch.long)


@_fake(spe_scale)
def _(x, p, w_exc, b_exc, w_rew, b_rew, paper):
    n, c = x.shape[0], x.shape[1]
    return torch.empty_like(x), x.new_empty((3, n, c)), x.new_empty((2, n, c), dtype=torch.long)


@_fake(relu_map_sums)
def _(grad, out, x, mean, idx):
    return torch.empty_like(x), x.new_empty((4, x.shape[0], x.shape[1]), dtype=torch.float32)


@_fake(map_dot)
def _(grad, x):
    return x.new_empty((x.shape[0], x.shape[1]), dtype=torch.float32)


def _fake_gate_grads(stats):
    n, c = stats.shape[1], stats.shape[2]
    num = _gate_geometry(n, c)[2]
    return (stats.new_empty((2 * n * c + 2 * num,), dtype=torch.float32),
            *(stats.new_empty((c,), dtype=torch.float32) for _ in range(4)))


@_fake(bn_gate_backward)
def _(sums, stats, mean, invstd, bn_w, bn_b, p, w_exc, b_exc, w_rew, b_rew, paper):
    c = stats.shape[2]
    return (*_fake_gate_grads(stats), *(stats.new_empty((c,), dtype=torch.float32) for _ in range(2)))


@_fake(gate_backward)
def _(grad_gate, stats, p, w_exc, b_exc, w_rew, b_rew, paper):
    return _fake_gate_grads(stats)


@_fake(mix_backward)
def _(stats, vv, p, on, eta):
    return torch.empty_like(p)


@_fake(bn_input_grad)
def _(grad, x, stats, mean, invstd, bn_w, s_dy, s_dyx, idx, vv, p, on, eta):
    return torch.empty_like(x), torch.empty_like(p)


@_fake(scale_input_grad)
def _(grad, x, stats, idx, vv, p, on, eta):
    return torch.empty_like(x, dtype=grad.dtype), torch.empty_like(p)
