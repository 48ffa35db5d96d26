""" SPE's Triton kernels as ``torch.ops.timm_spe.*`` ops: one kernel launch per op, with fake implementations

Each op allocates its outputs and launches one kernel of :mod:`timm_spe._triton_kernels`. They are opaque
``torch.library.custom_op``s, so ``torch.compile`` (``fullgraph``) and ``torch.export`` trace each as one call, and an
op counter (``benchmarks/count_ops.py``) sees one op per launch. Imported when the switch is turned on
(:class:`timm_spe.config.set_triton_kernels`); called by :mod:`timm_spe.spe_triton`.
"""
import torch
import triton
from torch.library import custom_op

from ._triton_kernels import (
    _dot_kernel,
    _gate_backward_kernel,
    _input_grad_kernel,
    _mix_backward_kernel,
    _sums_kernel,
    _tail_kernel,
)


def _geometry(t):
    """``(N, C, HW, grid, BLOCK_C, BLOCK_HW)`` of the per-(n, c) kernels: a program per n and block of channels."""
    n, c, h, w = t.shape
    block_c = min(triton.next_power_of_2(c), 16)
    block_hw = max(16, min(triton.next_power_of_2(h * w), 4096 // block_c))
    return n, c, h * w, (n, triton.cdiv(c, block_c)), block_c, block_hw


def _pools_and_gate(y, shortcut, out, p, w_exc, b_exc, w_rew, b_rew, paper):
    n, c, hw, grid, block_c, block_hw = _geometry(y)
    f_max, f_min, gate = (y.new_empty((n, c)) for _ in range(3))
    i_max, i_min = (y.new_empty((n, c), dtype=torch.long) for _ in range(2))
    _tail_kernel[grid](
        y, y if shortcut is None else shortcut, out, p, w_exc, b_exc, w_rew, b_rew, f_max, f_min, i_max, i_min, gate,
        c, hw, y.stride(0), y.stride(1), y.stride(3), PAPER=paper, TAIL=shortcut is not None, BLOCK_C=block_c,
        BLOCK_HW=block_hw)
    return f_max, f_min, i_max, i_min, gate


@custom_op('timm_spe::bn_spe_tail_', mutates_args={'y'})
def bn_spe_tail_(y: torch.Tensor, shortcut: torch.Tensor, p: torch.Tensor, w_exc: torch.Tensor,
                 b_exc: torch.Tensor, w_rew: torch.Tensor, b_rew: torch.Tensor, paper: bool,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``relu(y * gate + shortcut)`` written over ``y``; the pools, their indices and the gate returned."""
    return _pools_and_gate(y, shortcut, y, p, w_exc, b_exc, w_rew, b_rew, paper)


@custom_op('timm_spe::spe_scale', mutates_args=())
def spe_scale(x: torch.Tensor, p: torch.Tensor, w_exc: torch.Tensor, b_exc: torch.Tensor, w_rew: torch.Tensor,
              b_rew: torch.Tensor, paper: bool,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x * gate`` (a new tensor), then the pools, their indices and the gate."""
    out = torch.empty_like(x)
    return (out, *_pools_and_gate(x, None, out, p, w_exc, b_exc, w_rew, b_rew, paper))


@custom_op('timm_spe::map_sums', mutates_args=())
def map_sums(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, i_max: torch.Tensor, i_min: torch.Tensor,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (n, c): ``sum_hw(grad)``, ``sum_hw(grad * (x - mean))``, ``x`` at the max and at the min (float32)."""
    n, c, hw, grid, block_c, block_hw = _geometry(x)
    sg, sgx, x_max, x_min = (x.new_empty((n, c), dtype=torch.float32) for _ in range(4))
    _sums_kernel[grid](grad, x, mean, i_max, i_min, sg, sgx, x_max, x_min, c, hw,
                                    x.stride(0), x.stride(1), x.stride(3), BLOCK_C=block_c, BLOCK_HW=block_hw)
    return sg, sgx, x_max, x_min


@custom_op('timm_spe::map_dot', mutates_args=())
def map_dot(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per (n, c): ``sum_hw(grad * x)`` (float32)."""
    n, c, hw, grid, block_c, block_hw = _geometry(x)
    out = x.new_empty((n, c), dtype=torch.float32)
    _dot_kernel[grid](grad, x, out, c, hw, x.stride(0), x.stride(1), x.stride(3), BLOCK_C=block_c,
                                   BLOCK_HW=block_hw)
    return out


def _gate_geometry(n, c):
    """``(BLOCK_N, BLOCK_C, programs)`` of the gate's backward: a program per block of channels."""
    block_c = min(triton.next_power_of_2(c), 32)
    return min(triton.next_power_of_2(n), 64), block_c, triton.cdiv(c, block_c)


def _gate_backward(sg, sgx, x_max, x_min, f_max, f_min, gate, mean, invstd, bn_w, bn_b, p, w_exc, b_exc, w_rew,
                   b_rew, paper, bn):
    n, c = sgx.shape
    block_n, block_c, num = _gate_geometry(n, c)
    v_max, v_min = (sgx.new_empty((n, c)) for _ in range(2))
    g_we, g_be, g_wr, g_br = (sgx.new_empty((c,)) for _ in range(4))
    s_dy, s_dyx = (sgx.new_empty((c if bn else 0,)) for _ in range(2))
    g_lam = sgx.new_empty((num, 2))
    _gate_backward_kernel[(num,)](
        sg, sgx, x_max, x_min, f_max, f_min, gate, mean, invstd, bn_w, bn_b, p, w_exc, b_exc, w_rew, b_rew,
        v_max, v_min, g_we, g_be, g_wr, g_br, s_dy, s_dyx, g_lam, n, c, PAPER=paper, BN=bn, BLOCK_N=block_n,
        BLOCK_C=block_c)
    return v_max, v_min, g_we, g_be, g_wr, g_br, s_dy, s_dyx, g_lam


@custom_op('timm_spe::bn_gate_backward', mutates_args=())
def bn_gate_backward(sg: torch.Tensor, sgx: torch.Tensor, x_max: torch.Tensor, x_min: torch.Tensor,
                     f_max: torch.Tensor, f_min: torch.Tensor, gate: torch.Tensor, mean: torch.Tensor,
                     invstd: torch.Tensor, bn_w: torch.Tensor, bn_b: torch.Tensor, p: torch.Tensor,
                     w_exc: torch.Tensor, b_exc: torch.Tensor, w_rew: torch.Tensor, b_rew: torch.Tensor, paper: bool,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gate's backward behind a training-mode BN: the pooling gradients scaled for BN's input gradient
    (``v_max, v_min``), the gradients of ``w_exc, b_exc, w_rew, b_rew``, BN's ``sum(dy)`` and ``sum(dy * xhat)``, and
    per channel block the two partial gradients of ``(lambda, 1 - lambda)``."""
    return _gate_backward(sg, sgx, x_max, x_min, f_max, f_min, gate, mean, invstd, bn_w, bn_b, p, w_exc, b_exc,
                          w_rew, b_rew, paper, True)


@custom_op('timm_spe::gate_backward', mutates_args=())
def gate_backward(grad_gate: torch.Tensor, f_max: torch.Tensor, f_min: torch.Tensor, p: torch.Tensor,
                  w_exc: torch.Tensor, b_exc: torch.Tensor, w_rew: torch.Tensor, b_rew: torch.Tensor, paper: bool,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                             torch.Tensor]:
    """The gate's backward for its gradient ``grad_gate``: the pooling gradients, the gradients of ``w_exc, b_exc,
    w_rew, b_rew`` and the partial gradients of ``(lambda, 1 - lambda)``."""
    v_max, v_min, g_we, g_be, g_wr, g_br, _, _, g_lam = _gate_backward(
        grad_gate, grad_gate, grad_gate, grad_gate, f_max, f_min, grad_gate, grad_gate, grad_gate, grad_gate,
        grad_gate, p, w_exc, b_exc, w_rew, b_rew, paper, False)
    return v_max, v_min, g_we, g_be, g_wr, g_br, g_lam


@custom_op('timm_spe::mix_backward', mutates_args=())
def mix_backward(g_lam: torch.Tensor, p: torch.Tensor, on: torch.Tensor, eta: float) -> torch.Tensor:
    """``p``'s gradient from the partial gradients of ``(lambda, 1 - lambda)``, plus ``2 * eta * p`` where ``on``."""
    g_p = torch.empty_like(p)
    num = g_lam.shape[0]
    _mix_backward_kernel[(1,)](g_lam, p, on, g_p, num, eta, BLOCK=triton.next_power_of_2(num))
    return g_p


@custom_op('timm_spe::bn_input_grad', mutates_args=())
def bn_input_grad(grad: torch.Tensor, x: torch.Tensor, gate: torch.Tensor, mean: torch.Tensor,
                  invstd: torch.Tensor, bn_w: torch.Tensor, s_dy: torch.Tensor, s_dyx: torch.Tensor,
                  i_max: torch.Tensor, v_max: torch.Tensor, i_min: torch.Tensor, v_min: torch.Tensor,
                  ) -> torch.Tensor:
    """BN's input gradient for ``dy = grad * gate + (v_max, v_min at the extrema)``, in ``x``'s dtype and layout."""
    n, c, hw, grid, block_c, block_hw = _geometry(x)
    dx = torch.empty_like(x)
    _input_grad_kernel[grid](
        grad, x, dx, gate, mean, invstd, bn_w, s_dy, s_dyx, i_max, v_max, i_min, v_min, c, hw, float(n * hw),
        x.stride(0), x.stride(1), x.stride(3), BN=True, BLOCK_C=block_c, BLOCK_HW=block_hw)
    return dx


@custom_op('timm_spe::scale_input_grad', mutates_args=())
def scale_input_grad(grad: torch.Tensor, gate: torch.Tensor, i_max: torch.Tensor, g_max: torch.Tensor,
                     i_min: torch.Tensor, g_min: torch.Tensor) -> torch.Tensor:
    """``x``'s gradient of ``x * gate``: ``grad * gate``, with ``g_max, g_min`` added at the extrema."""
    n, c, hw, grid, block_c, block_hw = _geometry(grad)
    dx = torch.empty_like(grad)
    _input_grad_kernel[grid](
        grad, grad, dx, gate, gate, gate, gate, gate, gate, i_max, g_max, i_min, g_min, c, hw, 1.,
        grad.stride(0), grad.stride(1), grad.stride(3), BN=False, BLOCK_C=block_c, BLOCK_HW=block_hw)
    return dx


# Fake (meta) implementations: torch.compile and torch.export trace each op as one opaque call.
@bn_spe_tail_.register_fake
def _(y, shortcut, p, w_exc, b_exc, w_rew, b_rew, paper):
    n, c = y.shape[0], y.shape[1]
    return (y.new_empty((n, c)), y.new_empty((n, c)), y.new_empty((n, c), dtype=torch.long),
            y.new_empty((n, c), dtype=torch.long), y.new_empty((n, c)))


@spe_scale.register_fake
def _(x, p, w_exc, b_exc, w_rew, b_rew, paper):
    n, c = x.shape[0], x.shape[1]
    return (torch.empty_like(x), x.new_empty((n, c)), x.new_empty((n, c)), x.new_empty((n, c), dtype=torch.long),
            x.new_empty((n, c), dtype=torch.long), x.new_empty((n, c)))


@map_sums.register_fake
def _(grad, x, mean, i_max, i_min):
    return tuple(x.new_empty((x.shape[0], x.shape[1]), dtype=torch.float32) for _ in range(4))


@map_dot.register_fake
def _(grad, x):
    return x.new_empty((x.shape[0], x.shape[1]), dtype=torch.float32)


def _fake_gate_grads(t, n, c):
    num = _gate_geometry(n, c)[2]
    return (t.new_empty((n, c)), t.new_empty((n, c)), *(t.new_empty((c,)) for _ in range(4))), t.new_empty((num, 2))


@bn_gate_backward.register_fake
def _(sg, sgx, x_max, x_min, f_max, f_min, gate, mean, invstd, bn_w, bn_b, p, w_exc, b_exc, w_rew, b_rew, paper):
    grads, g_lam = _fake_gate_grads(sgx, *sgx.shape)
    return (*grads, sgx.new_empty((sgx.shape[1],)), sgx.new_empty((sgx.shape[1],)), g_lam)


@gate_backward.register_fake
def _(grad_gate, f_max, f_min, p, w_exc, b_exc, w_rew, b_rew, paper):
    grads, g_lam = _fake_gate_grads(grad_gate, *grad_gate.shape)
    return (*grads, g_lam)


@mix_backward.register_fake
def _(g_lam, p, on, eta):
    return torch.empty_like(p)


@bn_input_grad.register_fake
def _(grad, x, gate, mean, invstd, bn_w, s_dy, s_dyx, i_max, v_max, i_min, v_min):
    return torch.empty_like(x)


@scale_input_grad.register_fake
def _(grad, gate, i_max, g_max, i_min, g_min):
    return torch.empty_like(grad)
