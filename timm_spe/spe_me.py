""" Memory-efficient autograd functions for SPE in training, and the block tail they fuse

SPE (:mod:`timm_spe.spe`, its math in :mod:`timm_spe.spe_math`) reads a whole activation for two N x C pools. Written with autograd's ops, training keeps
that activation and several full-size temporaries for backward; the functions here save only N x C pools, indices
and gates (besides what the layers around them keep anyway) and compute backward in closed form, as timm's
``activations_me.py`` does for activations. :func:`batch_norm_spe_add_relu` fuses a bottleneck block's last
BatchNorm, SPE, residual add and ReLU into one function that saves no more full-size activations than the block
without SPE (used by :class:`timm_spe.resnet.SpeBottleneck` through :func:`timm_spe.spe.batch_norm_spe_add_relu`).

Every function here takes tensors, not modules. :func:`fused_applies` says where a fused function cannot be told
apart from the plain ops (grad enabled, a dense layout, one dtype, no autocast); :func:`spe_scale` falls back to them
by itself, and the layers (:mod:`timm_spe.spe`) check what only they know (training mode, the variant, hooks,
tracing) before calling in. The results are the same either way. Where a CPU kernel can do a pass in one read, the dispatch in
:mod:`timm_spe.cpu_kernels` picks it.

Paper: `SPEM: Self-adaptive Pooling Enhanced Attention Module for Image Recognition`
    (also `Mix-Pooling Strategy for Attention Mechanism`) - https://arxiv.org/abs/2208.10322
"""
from typing import Tuple

import torch
from timm.layers import register_notrace_function
from torch.autograd.function import once_differentiable

from .cpu_kernels import (
    LOW_PRECISION,
    _compiling,
    _out,
    block_backward_coefficients,
    bn_input_grad_,
    max_min,
    max_min_with_indices,
    per_map_sums,
    scale_add_relu_,
    scatter_add_at_,
)
from .cpu_kernels import spe_gate as rounded_gate
from .spe_math import gate_terms, penalty_grad, spe_gate

__all__ = [
    'with_penalty_grad', 'global_max_min', 'scale_add_relu', 'spe_scale', 'fused_batch_norm_spe_add_relu',
    'fused_applies',
]


def _dense_layout(t: torch.Tensor) -> bool:
    return t.ndim == 4 and (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last))


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    return torch.contiguous_format if t.is_contiguous() else torch.channels_last


def sum_hw(t: torch.Tensor) -> torch.Tensor:
    """Per-(n, c) sums over H x W, as float32 for a bfloat16 / float16 ``t`` (the N x C math after it is float32).

    Summed in ``t``'s own dtype (the reduction accumulates in float32; only the N x C result is rounded), as autograd's
    ops do: ``sum(dtype=torch.float32)`` would copy the whole tensor to float32 first on the CPU."""
    return t.sum((2, 3)).float() if t.dtype in LOW_PRECISION else t.sum((2, 3))


def _spe_gate_backward(
        grad: torch.Tensor, f_max: torch.Tensor, f_min: torch.Tensor, lam: torch.Tensor,
        w_exc: torch.Tensor, b_exc: torch.Tensor, w_rew: torch.Tensor, b_rew: torch.Tensor, paper: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed-form vector-Jacobian product of :func:`~timm_spe.spe_math.spe_gate` (N x C sized work only): the gradients
    of ``f_max, f_min, lam, w_exc, b_exc, w_rew, b_rew`` for ``grad``, the gradient of the gate. (TorchScript
    compiles it as it is: the benchmark's primitives time the same ops run from C++.)"""
    m_max, m_min, u, v_exc, v_rew = gate_terms(f_max, f_min, lam, w_exc, b_exc, w_rew, b_rew, paper)
    d_exc = grad * v_rew * v_exc * (1 - v_exc)  # through sigmoid(w_exc * u + b_exc)
    d_rew = grad * v_exc * v_rew * (1 - v_rew)  # through v_rew's sigmoid
    d_u = d_exc * w_exc
    g_w_exc, g_b_exc = (d_exc * u).sum(0), d_exc.sum(0)
    g_lam = torch.stack(((d_u * m_max).sum(), (d_u * m_min).sum()))
    if paper:
        d_pooled = d_rew * w_rew
        g_max, g_min = d_u * lam[0] + d_pooled, d_u * lam[1] + d_pooled
        g_w_rew, g_b_rew = (d_rew * (f_max + f_min)).sum(0), d_rew.sum(0)
    else:
        d_max, d_min = d_u * lam[0] + d_rew, d_u * lam[1] + d_rew
        g_max, g_min = d_max * w_rew, d_min * w_rew
        g_w_rew, g_b_rew = (d_max * f_max + d_min * f_min).sum(0), (d_max + d_min).sum(0)
    return g_max, g_min, g_lam, g_w_exc, g_b_exc, g_w_rew, g_b_rew


class _PenaltyGrad(torch.autograd.Function):
    """Identity in forward; in backward adds ``2 * eta * p``, the gradient of ``eta * sum(p^2)`` (Eq. 8), where the
    owning layer's switch ``on`` (a bool tensor) is set.

    The switch is read at backward time, so that ``loss = task_loss + spe_penalty(model)`` (which switches the
    automatic penalty off after the forward already ran) still counts the penalty exactly once. It is a tensor,
    not a Python flag, because ``torch.compile`` traces the backward when it compiles the forward and would bake a
    Python flag in as it was then; the tensor's value is read when the backward runs, eager or compiled. ``eta``
    is the layer's at forward time (compiled code guards on it).

    Forward without ``ctx`` plus :meth:`setup_context`, as ``torch.func`` transforms require (also for the other
    autograd functions here).
    """

    @staticmethod
    def forward(p: torch.Tensor, on: torch.Tensor, eta: float) -> torch.Tensor:
        return p.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        p, on, eta = inputs
        ctx.save_for_backward(p, on)
        ctx.eta = eta

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        p, on = ctx.saved_tensors
        if ctx.eta > 0:
            grad = torch.where(on, grad + penalty_grad(p, ctx.eta), grad)
        return grad, None, None


@register_notrace_function
def with_penalty_grad(p: torch.Tensor, on: torch.Tensor, eta: float) -> torch.Tensor:
    """Return ``p`` unchanged; backward adds the Eq. 8 penalty's gradient ``2 * eta * p`` where ``on`` is set."""
    return _PenaltyGrad.apply(p, on, eta)


class _GlobalMaxMin(torch.autograd.Function):
    """Per-channel global max and min over H x W that saves only the two N x C index tensors.

    autograd's ``amax``/``amin`` keep the whole input and spend several full-size passes in backward
    (mask, count, cast, multiply); here backward is one zero-fill and two N x C scatters. With ties
    the gradient goes to the first maximal (minimal) element, where ``amax`` would split it evenly.
    """

    @staticmethod
    def forward(x: torch.Tensor):
        """``(f_max, f_min, i_max, i_min)``: the indices are outputs so that :meth:`setup_context` can save them."""
        if not _dense_layout(x):
            x = x.contiguous()
        f_max, i_max, f_min, i_min = max_min_with_indices(x)
        return f_max, f_min, i_max, i_min

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, = inputs
        _, _, i_max, i_min = output
        ctx.mark_non_differentiable(i_max, i_min)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the indices (or an unused pool)
        ctx.save_for_backward(i_max, i_min)
        ctx.shape = x.shape
        ctx.memory_format = _memory_format(x) if _dense_layout(x) else torch.contiguous_format

    @staticmethod
    @once_differentiable
    def backward(ctx, g_max: torch.Tensor, g_min: torch.Tensor, g_i_max=None, g_i_min=None):
        if g_max is None and g_min is None:
            return None
        i_max, i_min = ctx.saved_tensors
        like = g_max if g_max is not None else g_min
        grad = torch.empty(
            ctx.shape, dtype=like.dtype, device=like.device, memory_format=ctx.memory_format).zero_()
        if g_max is not None:
            scatter_add_at_(grad, i_max, g_max)
        if g_min is not None:
            scatter_add_at_(grad, i_min, g_min)
        return grad


@register_notrace_function
def global_max_min(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x.amax((2, 3)), x.amin((2, 3)))`` with a lean backward (see :class:`_GlobalMaxMin`)."""
    f_max, f_min, _, _ = _GlobalMaxMin.apply(x)
    return f_max, f_min


class _ScaleAddReLU(torch.autograd.Function):
    """``relu(x * gate + shortcut)`` with ``gate`` of shape N x C x 1 x 1, and a lean backward: one
    threshold pass, one multiply for ``x``'s gradient and a batched matrix product that multiplies and
    reduces over H x W in one pass for ``gate``'s (autograd's ``addcmul`` backward materialises both
    full-size products and then reduces)."""

    @staticmethod
    def forward(x: torch.Tensor, shortcut: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(shortcut, x, gate).relu_()

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, gate = inputs
        ctx.save_for_backward(x, gate, output)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, gate, out = ctx.saved_tensors
        grad = torch.ops.aten.threshold_backward(grad, out, 0)
        n, c = x.shape[0], x.shape[1]
        grad_gate = None
        if ctx.needs_input_grad[2]:
            # under autocast x may be of lower precision than grad (the output takes the gate's dtype)
            grad_gate = torch.matmul(
                grad.reshape(n, c, 1, -1), x.reshape(n, c, -1, 1).to(grad.dtype)).view(n, c, 1, 1).to(gate.dtype)
        grad_x = grad * gate if ctx.needs_input_grad[0] else None
        return grad_x, grad, grad_gate


@register_notrace_function
def scale_add_relu(x: torch.Tensor, shortcut: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``relu(x * gate + shortcut)``, the tail of a bottleneck block with SPE (see :class:`_ScaleAddReLU`)."""
    return _ScaleAddReLU.apply(x, shortcut, gate)


class _SpeScale(torch.autograd.Function):
    """``x * spe_gate(x)`` in training mode, as one function: the SPE layer on its own (any timm model).

    Saves ``x`` (the multiply's gradient needs it, as SE's does), the N x C gate, pools and indices.
    Backward allocates one full-size tensor: ``grad * x`` is formed in it and summed for the gate's
    gradient, then it is overwritten with ``grad * gate`` and the pooling gradients are scattered in place
    (autograd would allocate three: the two products and the pooling gradient's zero fill).
    """

    @staticmethod
    def forward(x, lam, w_exc, b_exc, w_rew, b_rew, paper: bool):
        """The output, then the gate, pools and indices backward needs (outputs, so :meth:`setup_context` can save
        them; marked non-differentiable)."""
        n, ch = x.shape[0], x.shape[1]
        f_max, i_max, f_min, i_min = max_min_with_indices(x)
        gate = rounded_gate(f_max, f_min, lam, w_exc, b_exc, w_rew, b_rew, paper)  # in x's dtype
        return x * gate.view(n, ch, 1, 1), gate, f_max, f_min, i_max, i_min

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, lam, w_exc, b_exc, w_rew, b_rew, paper = inputs
        _, gate, f_max, f_min, i_max, i_min = output
        ctx.mark_non_differentiable(gate, f_max, f_min, i_max, i_min)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for those five
        ctx.save_for_backward(x, gate, f_max, f_min, i_max, i_min, lam, w_exc, b_exc, w_rew, b_rew)
        ctx.paper = paper

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor, *unused):
        if grad is None:  # the output's gradient is undefined (not materialised as zeros): so are the inputs'
            return (None,) * 7
        x, gate, f_max, f_min, i_max, i_min, lam, w_exc, b_exc, w_rew, b_rew = ctx.saved_tensors
        n, ch = x.shape[0], x.shape[1]
        grad_x = torch.mul(grad.contiguous(memory_format=_memory_format(x)), x)
        grad_gate = sum_hw(grad_x)
        g_max, g_min, g_lam, g_w_exc, g_b_exc, g_w_rew, g_b_rew = _spe_gate_backward(
            grad_gate, f_max, f_min, lam, w_exc, b_exc, w_rew, b_rew, ctx.paper)
        _out(torch.mul, grad, gate.view(n, ch, 1, 1), out=grad_x)
        scatter_add_at_(grad_x, i_max, g_max.to(x.dtype))
        scatter_add_at_(grad_x, i_min, g_min.to(x.dtype))
        return grad_x, g_lam, g_w_exc, g_b_exc, g_w_rew, g_b_rew, None


def fused_applies(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """The fused training functions apply to ``x`` and the layer's ``params``: grad enabled, a dense layout
    (NCHW-contiguous or channels_last), and one dtype, or mixed precision as autocast / AMP makes it: ``x`` in
    bfloat16 or float16 and float32 parameters. Then the full-size work stays in ``x``'s dtype and the N x C gate
    math in float32, as the plain ops do it (the gate is rounded to ``x``'s dtype before it scales ``x``). (The layers
    check the rest: training mode, the default variant, hooks and tracing.)"""
    if not (torch.is_grad_enabled() and _dense_layout(x)):
        return False
    dtype = x.dtype
    if dtype in LOW_PRECISION and all(t.dtype == torch.float32 for t in params):
        return True
    return all(t.dtype == dtype for t in params)


@register_notrace_function
def spe_scale(
        x: torch.Tensor, lam: torch.Tensor, w_exc: torch.Tensor, b_exc: torch.Tensor, w_rew: torch.Tensor,
        b_rew: torch.Tensor, paper: bool,
) -> torch.Tensor:
    """``x * spe_gate(x)`` of the default SPE variant in training: one autograd function (:class:`_SpeScale`) where
    :func:`fused_applies`, else the plain ops (:func:`global_max_min` with grad, the gate, a multiply). Same results.
    ``lam`` is ``(lambda, 1 - lambda)`` (:func:`~timm_spe.spe_math.mix_weights`)."""
    if fused_applies(x, lam, w_exc):
        return _SpeScale.apply(x, lam, w_exc, b_exc, w_rew, b_rew, paper)[0]
    f_max, f_min = global_max_min(x) if torch.is_grad_enabled() else max_min(x)
    gate = spe_gate(f_max, f_min, lam, w_exc, b_exc, w_rew, b_rew, paper)
    return x * gate.unsqueeze(-1).unsqueeze(-1).to(x.dtype)


class _BatchNormSpeAddReLU(torch.autograd.Function):
    """``relu(y * spe_gate(y) + shortcut)`` with ``y = batch_norm(x)`` in training mode, as one function.

    Keeps for backward only what the plain block's BN and ReLU keep anyway (BN's input ``x``, its batch
    statistics, the block output) plus N x C pools, indices and gate: the pre-gate activation ``y`` is not
    kept, its buffer becomes the output. Backward works from per-(n, c) sums: with
    ``xhat = (x - mean) * invstd``, the gate's gradient is ``w * sum_hw(g * xhat) + b * sum_hw(g)`` and BN's
    backward of ``dy = g * gate + (pooling gradient at the argmax / argmin)`` needs only the per-channel
    sums of ``dy`` and ``dy * xhat``, which follow from the same N x C sums (:func:`~timm_spe.cpu_kernels.per_map_sums`).
    Full-size work: one threshold pass, one read of ``g`` and ``x`` for the sums (NCHW; channels_last with the CPU
    kernels), two multiply-add passes for ``x``'s gradient (written into one buffer; one pass with the CPU kernels),
    as many new full-size tensors as the plain block's backward allocates. ``x`` at the argmax / argmin and the
    pooling gradients there are N x C gathers and scatters, folded into the sums' and the gradient's passes on the
    CPU kernels (channels_last: both; NCHW: the scatters).
    """

    @staticmethod
    def forward(
            x, shortcut, bn_weight, bn_bias, running_mean, running_var, momentum: float, eps: float,
            lam, w_exc, b_exc, w_rew, b_rew, paper: bool,
    ):
        """The output, then the batch statistics, pools, indices and gate backward needs (outputs, so
        :meth:`setup_context` can save them; marked non-differentiable). Updates the running statistics."""
        y, mean, invstd = torch.native_batch_norm(x, bn_weight, bn_bias, running_mean, running_var, True, momentum, eps)
        if _compiling() and mean.dtype != bn_weight.dtype:
            # the CPU kernel returns the statistics in the parameters' dtype (float32 under autocast), the fake one
            # traced here in x's (bfloat16 / float16): backward's N x C terms would round to x's dtype, unlike eager
            mean, invstd = mean.to(bn_weight.dtype), invstd.to(bn_weight.dtype)
        n, c = x.shape[0], x.shape[1]
        f_max, i_max, f_min, i_min = max_min_with_indices(y)
        gate = rounded_gate(f_max, f_min, lam, w_exc, b_exc, w_rew, b_rew, paper)  # in y's dtype
        out = scale_add_relu_(y, shortcut, gate.view(n, c, 1, 1))
        return out, mean, invstd, f_max, f_min, i_max, i_min, gate

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, bn_weight, bn_bias, _, _, _, eps, lam, w_exc, b_exc, w_rew, b_rew, paper = inputs
        out, mean, invstd, f_max, f_min, i_max, i_min, gate = output
        ctx.mark_non_differentiable(mean, invstd, f_max, f_min, i_max, i_min, gate)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for those seven
        ctx.save_for_backward(
            x, out, bn_weight, bn_bias, mean, invstd, f_max, f_min, i_max, i_min, gate, lam, w_exc, b_exc, w_rew, b_rew)
        ctx.eps, ctx.paper = eps, paper

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor, *unused):
        if grad is None:  # the output's gradient is undefined (not materialised as zeros): so are the inputs'
            return (None,) * 14
        (x, out, bn_weight, bn_bias, mean, invstd, f_max, f_min, i_max, i_min, gate,
         lam, w_exc, b_exc, w_rew, b_rew) = ctx.saved_tensors
        n = x.shape[0]
        count = n * x.shape[2] * x.shape[3]
        # through ReLU: the shortcut's gradient, in x's layout
        grad = torch.ops.aten.threshold_backward(grad, out, 0).contiguous(memory_format=_memory_format(x))
        # per (n, c) sums of grad and grad * xhat, with xhat = (x - mean) * invstd, and x at the argmax / argmin
        buf = torch.empty_like(grad)
        sum_grad, sum_grad_xhat, x_max, x_min = per_map_sums(grad, x, mean, invstd, buf, i_max, i_min)
        # the N x C work: one op on the CPU kernels for 16-bit activations, else the eager ops below
        coefficients = block_backward_coefficients(
            sum_grad, sum_grad_xhat, x_max, x_min, f_max, f_min, gate, mean, invstd, bn_weight, bn_bias,
            lam, w_exc, b_exc, w_rew, b_rew, ctx.paper, count)
        if coefficients is not None:
            (grad_scale, sum_term, x_coef, v_max, v_min, sum_dy_xhat, sum_dy,
             g_lam, g_w_exc, g_b_exc, g_w_rew, g_b_rew) = coefficients
        else:
            grad_gate = bn_weight * sum_grad_xhat + bn_bias * sum_grad
            g_max, g_min, g_lam, g_w_exc, g_b_exc, g_w_rew, g_b_rew = _spe_gate_backward(
                grad_gate, f_max, f_min, lam, w_exc, b_exc, w_rew, b_rew, ctx.paper)
            # BN's backward for dy = grad * gate + (g_max, g_min scattered to the argmax / argmin), from N x C sums only
            xhat_max = (x_max - mean) * invstd
            xhat_min = (x_min - mean) * invstd
            sum_dy = (gate * sum_grad + g_max + g_min).sum(0)
            sum_dy_xhat = (gate * sum_grad_xhat + g_max * xhat_max + g_min * xhat_min).sum(0)
            # dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)): one multiply-add pass over grad and x, with
            # the pooling gradients added at the argmax / argmin
            scale = bn_weight * invstd
            x_coef = scale * invstd * sum_dy_xhat / count
            grad_scale, sum_term, v_max, v_min = scale * gate, scale * sum_dy / count, scale * g_max, scale * g_min
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = bn_input_grad_(buf, grad, x, grad_scale, sum_term, x_coef, mean, i_max, v_max, i_min, v_min)
        return (grad_x, grad if ctx.needs_input_grad[1] else None, sum_dy_xhat, sum_dy, None, None, None, None,
                g_lam, g_w_exc, g_b_exc, g_w_rew, g_b_rew, None)


@register_notrace_function
def fused_batch_norm_spe_add_relu(
        x: torch.Tensor, shortcut: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
        running_mean: torch.Tensor, running_var: torch.Tensor, momentum: float, eps: float,
        lam: torch.Tensor, w_exc: torch.Tensor, b_exc: torch.Tensor, w_rew: torch.Tensor, b_rew: torch.Tensor,
        paper: bool,
) -> torch.Tensor:
    """``relu(y * spe_gate(y) + shortcut)`` with ``y`` a training-mode batch norm of ``x`` (``momentum`` as
    ``F.batch_norm`` takes it; the caller keeps ``num_batches_tracked``), as one autograd function that saves no more
    full-size activations for backward than the block without SPE (see :class:`_BatchNormSpeAddReLU`). Only where
    :func:`fused_applies` (:func:`timm_spe.spe.batch_norm_spe_add_relu` checks, with the modules)."""
    return _BatchNormSpeAddReLU.apply(
        x, shortcut, bn_weight, bn_bias, running_mean, running_var, momentum, eps,
        lam, w_exc, b_exc, w_rew, b_rew, paper)[0]
