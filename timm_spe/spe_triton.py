""" SPE in training on Triton kernels, for CUDA: the block tail ``relu(spe(bn(x)) + shortcut)`` and the layer alone

:class:`~timm_spe.spe_me._BatchNormSpeAddReLU` in stock ops issues ~150 ATen ops per block beyond the plain block's,
mostly N x C gate math that is one kernel launch each on a GPU. The function here computes the same values with one
kernel per pass (:mod:`timm_spe._triton_kernels`): forward = BN + one kernel (pools, gate, Eq. 3, scale, add, ReLU),
backward = ReLU's threshold + four kernels (per-map sums, the gate's backward, ``p``'s gradient with the Eq. 8
penalty's, BN's input gradient), where the plain block runs BN, add and ReLU forward and BN's and ReLU's backward.
It takes ``p`` and the layer's penalty switch instead of ``(lambda, 1 - lambda)``: Eq. 3 and the penalty are inside.
The SPE layer alone (``x * gate``: :class:`~timm_spe.spe_me._SpeScale`, in timm's ResNets with ``attn_layer='spe'``)
likewise: one kernel forward, four backward.

Opt-in: ``timm_spe.set_triton_kernels(True)`` or ``TIMM_SPE_TRITON_KERNELS=1`` (:mod:`timm_spe.config`), for CUDA
tensors; CPU tensors only under ``TRITON_INTERPRET=1`` (how the tests run it). Where :func:`applies` says no, the
stock-op function runs. Same values as it to float32 rounding (summation order differs), same saved tensors.
"""
import os

import torch
from timm.layers import register_notrace_function
from torch.autograd.function import once_differentiable

from .config import triton_kernels_enabled
from .spe_me import LOW_PRECISION, _memory_format

__all__ = ['applies', 'fused_batch_norm_spe_add_relu', 'spe_scale']


def ops():
    """The kernels' ops (registered when the switch was turned on: :class:`timm_spe.config.set_triton_kernels`)."""
    return torch.ops.timm_spe


def _interpreting() -> bool:
    return os.environ.get('TRITON_INTERPRET', '').strip().lower() in ('1', 'true', 'yes', 'on')


def applies(x: torch.Tensor) -> bool:
    """The Triton kernels are switched on and take ``x``: CUDA (CPU under ``TRITON_INTERPRET=1``), float32 / bfloat16 /
    float16, NCHW-contiguous or channels_last (the caller checked the rest: :func:`~timm_spe.spe_me.fused_applies`),
    and offsets within int32."""
    return (
        triton_kernels_enabled() and (x.is_cuda or (x.device.type == 'cpu' and _interpreting()))
        and x.dtype in (torch.float32,) + LOW_PRECISION and x.numel() < 2 ** 31
    )


class _BatchNormSpeAddReLUTriton(torch.autograd.Function):
    """As :class:`~timm_spe.spe_me._BatchNormSpeAddReLU` (same saved tensors: BN's input, the output, N x C pools,
    indices, gate), with ``p``, the penalty switch ``on`` and ``eta`` in place of ``lam``."""

    @staticmethod
    def forward(x, shortcut, bn_weight, bn_bias, running_mean, running_var, momentum: float, eps: float,
                p, on, eta: float, w_exc, b_exc, w_rew, b_rew, paper: bool):
        y, mean, invstd = torch.native_batch_norm(x, bn_weight, bn_bias, running_mean, running_var, True, momentum, eps)
        f_max, f_min, i_max, i_min, gate = ops().bn_spe_tail_(y, shortcut, p, w_exc, b_exc, w_rew, b_rew, paper)
        return y, mean, invstd, f_max, f_min, i_max, i_min, gate

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, bn_weight, bn_bias, _, _, _, _, p, on, eta, w_exc, b_exc, w_rew, b_rew, paper = inputs
        out, mean, invstd, f_max, f_min, i_max, i_min, gate = output
        ctx.mark_non_differentiable(mean, invstd, f_max, f_min, i_max, i_min, gate)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(
            x, out, bn_weight, bn_bias, mean, invstd, f_max, f_min, i_max, i_min, gate, p, on, w_exc, b_exc, w_rew, b_rew)
        ctx.eta, ctx.paper = eta, paper

    @staticmethod
    @once_differentiable  # double backward raises instead of returning a wrong gradient
    def backward(ctx, grad: torch.Tensor, *unused):
        if grad is None:
            return (None,) * 16
        (x, out, bn_weight, bn_bias, mean, invstd, f_max, f_min, i_max, i_min, gate,
         p, on, w_exc, b_exc, w_rew, b_rew) = ctx.saved_tensors
        k = ops()
        grad = torch.ops.aten.threshold_backward(grad, out, 0).contiguous(memory_format=_memory_format(x))
        sg, sgx, x_max, x_min = k.map_sums(grad, x, mean, i_max, i_min)
        v_max, v_min, g_we, g_be, g_wr, g_br, s_dy, s_dyx, g_lam = k.bn_gate_backward(
            sg, sgx, x_max, x_min, f_max, f_min, gate, mean, invstd, bn_weight, bn_bias, p, w_exc, b_exc, w_rew, b_rew,
            ctx.paper)
        g_p = k.mix_backward(g_lam, p, on, ctx.eta)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = k.bn_input_grad(grad, x, gate, mean, invstd, bn_weight, s_dy, s_dyx, i_max, v_max, i_min, v_min)
        dtype = w_exc.dtype  # the kernels accumulate in float32; parameters of another dtype get theirs
        return (grad_x, grad if ctx.needs_input_grad[1] else None, s_dyx.to(bn_weight.dtype), s_dy.to(bn_bias.dtype),
                None, None, None, None, g_p, None, None, g_we.to(dtype), g_be.to(dtype), g_wr.to(dtype), g_br.to(dtype),
                None)


@register_notrace_function
def fused_batch_norm_spe_add_relu(
        x: torch.Tensor, shortcut: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
        running_mean: torch.Tensor, running_var: torch.Tensor, momentum: float, eps: float,
        p: torch.Tensor, on: torch.Tensor, eta: float, w_exc: torch.Tensor, b_exc: torch.Tensor, w_rew: torch.Tensor,
        b_rew: torch.Tensor, paper: bool,
) -> torch.Tensor:
    """``relu(y * spe_gate(y) + shortcut)`` with ``y`` a training-mode batch norm of ``x``, on the Triton kernels
    (where :func:`applies`; the caller checks). ``p`` is the layer's raw parameter (Eq. 3 and the Eq. 8 penalty's
    gradient, where ``on`` is set, are computed in the kernels)."""
    return _BatchNormSpeAddReLUTriton.apply(
        x, shortcut, bn_weight, bn_bias, running_mean, running_var, momentum, eps, p, on, eta,
        w_exc, b_exc, w_rew, b_rew, paper)[0]


class _SpeScaleTriton(torch.autograd.Function):
    """As :class:`~timm_spe.spe_me._SpeScale` (saves ``x``, the N x C gate, pools and indices), with ``p``, the
    penalty switch ``on`` and ``eta`` in place of ``lam``."""

    @staticmethod
    def forward(x, p, on, eta: float, w_exc, b_exc, w_rew, b_rew, paper: bool):
        return ops().spe_scale(x, p, w_exc, b_exc, w_rew, b_rew, paper)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, p, on, eta, w_exc, b_exc, w_rew, b_rew, paper = inputs
        _, f_max, f_min, i_max, i_min, gate = output
        ctx.mark_non_differentiable(f_max, f_min, i_max, i_min, gate)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, f_max, f_min, i_max, i_min, gate, p, on, w_exc, b_exc, w_rew, b_rew)
        ctx.eta, ctx.paper = eta, paper

    @staticmethod
    @once_differentiable  # double backward raises instead of returning a wrong gradient
    def backward(ctx, grad: torch.Tensor, *unused):
        if grad is None:
            return (None,) * 9
        x, f_max, f_min, i_max, i_min, gate, p, on, w_exc, b_exc, w_rew, b_rew = ctx.saved_tensors
        k = ops()
        grad = grad.contiguous(memory_format=_memory_format(x))
        g_max, g_min, g_we, g_be, g_wr, g_br, g_lam = k.gate_backward(
            k.map_dot(grad, x), f_max, f_min, p, w_exc, b_exc, w_rew, b_rew, ctx.paper)
        g_p = k.mix_backward(g_lam, p, on, ctx.eta)
        grad_x = k.scale_input_grad(grad, gate, i_max, g_max, i_min, g_min) if ctx.needs_input_grad[0] else None
        dtype = w_exc.dtype
        return grad_x, g_p, None, None, g_we.to(dtype), g_be.to(dtype), g_wr.to(dtype), g_br.to(dtype), None


@register_notrace_function
def spe_scale(x: torch.Tensor, p: torch.Tensor, on: torch.Tensor, eta: float, w_exc: torch.Tensor,
              b_exc: torch.Tensor, w_rew: torch.Tensor, b_rew: torch.Tensor, paper: bool) -> torch.Tensor:
    """``x * spe_gate(x)`` of the default SPE variant in training, on the Triton kernels (where :func:`applies` and
    :func:`~timm_spe.spe_me.fused_applies`; the caller checks). ``p`` as in :func:`fused_batch_norm_spe_add_relu`."""
    return _SpeScaleTriton.apply(x, p, on, eta, w_exc, b_exc, w_rew, b_rew, paper)[0]
