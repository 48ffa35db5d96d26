""" SPE: Self-adaptive Pooling Enhanced attention

A channel attention module that pools each channel with a learned mix of global max and global
min pooling, excites it with a per-channel linear map, and reweights the result with a second
gate driven by the same two pools.

Paper: `SPEM: Self-adaptive Pooling Enhanced Attention Module for Image Recognition`
    (also `Mix-Pooling Strategy for Attention Mechanism`) - https://arxiv.org/abs/2208.10322
Official code: https://github.com/Qrange-group/SPEM

Two formulations are offered:
  * ``'official'`` (default) - what the authors' released code computes, which produced the
    paper's tables: the reweighting map is applied to each pool *before* the mix.
  * ``'paper'`` - Eq. 2-7 of the paper read literally.

The Eq. 8 penalty ``eta * (p0^2 + p1^2)`` is applied automatically in training mode by adding its
exact gradient to ``p`` during backward, so it works in unmodified training loops (timm's
``train.py``). See :func:`spe_penalty` and :func:`set_auto_penalty` for custom loops.

The paper's ablations (Tables 3 and 4) are options of :class:`SpeModule`: a constant ``lam`` and the reweight-module
variants ``reweight``; see ``docs/design_space.md``. They run as plain autograd ops (no fused path, no CPU kernel).
"""
import math
import numbers
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function
from torch import nn as nn
from torch.autograd.function import once_differentiable

from .cpu_kernels import kernels_apply, kernels_apply_per_map

__all__ = ['SpeModule', 'spe_penalty', 'set_auto_penalty', 'spe_gate', 'FORMULATIONS', 'REWEIGHTS']

FORMULATIONS = ('official', 'paper')
# the reweight module (RM) of SPE and its Table 4 / Fig. 4 ablations: 'sum' is SPE itself, then (a) ... (g), without RM
REWEIGHTS = ('sum', 'unshared', 'no_sigmoid', 'product', 'sigmoid_sum', 'sigmoid_product', 'max', 'min', 'none')


class _PenaltyGrad(torch.autograd.Function):
    """Identity in forward; in backward adds ``2 * eta * p``, the gradient of ``eta * sum(p^2)``, where the
    owning layer's switch ``on`` (a bool tensor) is set.

    The switch is read at backward time, so that ``loss = task_loss + spe_penalty(model)`` (which switches the
    automatic penalty off after the forward already ran) still counts the penalty exactly once. It is a tensor,
    not a Python flag, because ``torch.compile`` traces the backward when it compiles the forward and would bake a
    Python flag in as it was then; the tensor's value is read when the backward runs, eager or compiled. ``eta``
    is read from ``owner`` (at backward time in eager mode; compiled code guards on it).

    Forward without ``ctx`` plus :meth:`setup_context`, as ``torch.func`` transforms require (also for the other
    autograd functions here).
    """

    @staticmethod
    def forward(p: torch.Tensor, on: torch.Tensor, owner: nn.Module) -> torch.Tensor:
        return p.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        p, on, owner = inputs
        ctx.save_for_backward(p, on)
        ctx.owner = owner

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        p, on = ctx.saved_tensors
        eta = ctx.owner.eta
        if eta > 0:
            grad = torch.where(on, grad + (2. * eta) * p, grad)
        return grad, None, None


@register_notrace_function
def with_penalty_grad(p: torch.Tensor, owner: nn.Module) -> torch.Tensor:
    """Return ``p`` unchanged; backward adds ``owner``'s Eq. 8 penalty gradient if it is switched on."""
    return _PenaltyGrad.apply(p, owner.penalty_on, owner)


@register_notrace_function  # dtype branch: an FX leaf
def mix_weights(p: torch.Tensor) -> torch.Tensor:
    """Eq. 3: ``(lambda, 1 - lambda) = p^2 / sum(p^2)``, finite (0.5, 0.5) when all ``p`` are 0.

    Computed in float32 (float64 stays float64). The ``tiny`` offset, float32's smallest normal number,
    leaves the result bit-identical to ``p^2 / sum(p^2)`` for any ``p^2`` above ~1e-31 and only matters
    at exactly zero.
    """
    tiny = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny; a literal for TorchScript
    acc = p if p.dtype == torch.float64 else p.float()
    p_sq = acc * acc
    return ((p_sq + tiny) / (p_sq.sum() + 2 * tiny)).to(p.dtype)


def _hw_view(t: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """An NCHW-contiguous or channels_last N x C x H x W tensor as a view with H x W flattened, and the
    flattened dim: ``(N x C x HW, 2)`` or ``(N x HW x C, 1)``. Index ``h * W + w`` either way."""
    n, c = t.shape[0], t.shape[1]
    if t.is_contiguous():
        return t.view(n, c, -1), 2
    return t.permute(0, 2, 3, 1).reshape(n, -1, c), 1


def _dense_layout(t: torch.Tensor) -> bool:
    return t.ndim == 4 and (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last))


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    return torch.contiguous_format if t.is_contiguous() else torch.channels_last


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[n, c].flatten()[index[n, c]]`` for every (n, c): N x C values at flattened H x W indices."""
    view, dim = _hw_view(t)
    return view.gather(dim, index.unsqueeze(dim)).squeeze(dim)


def _scatter_add_(t: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """In place: ``t[n, c].flatten()[index[n, c]] += values[n, c]`` for every (n, c)."""
    view, dim = _hw_view(t)
    view.scatter_add_(dim, index.unsqueeze(dim), values.unsqueeze(dim))


def _first_at(t: torch.Tensor, value: torch.Tensor, largest: bool) -> torch.Tensor:
    """Index of the first element of each row of ``t`` (R x L, contiguous) that is ``>= value`` (``<=`` with
    ``largest=False``), i.e. of the first maximum (minimum) when ``value`` is the row's max (min).

    Three vectorised passes (compare into float flags, multiply by ``L-1, ..., 0``, ``amax``) instead of
    ``max(dim)``'s scalar index loop. Rows without a hit (NaN) give ``L - 1``.
    """
    length = t.shape[1]
    flag_dtype = torch.float32 if length <= 2 ** 24 else torch.float64  # exact integers up to L
    flags = torch.empty(t.shape, dtype=flag_dtype, device=t.device)
    compare = torch.ge if largest else torch.le
    compare(t, value.unsqueeze(1), out=flags)
    flags.mul_(torch.arange(length - 1, -1, -1, dtype=flag_dtype, device=t.device))
    return (length - 1) - flags.amax(1).long()


def _max_over_rows(t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Max over dim 1 of an N x K x C contiguous tensor and the first index of it, each N x C: ``max_pool2d``
    on the channels_last view, which is vectorised over C and keeps the index of the first maximum."""
    n, k, c = t.shape
    values, index = F.max_pool2d(t.view(n, k, 1, c).permute(0, 3, 1, 2), (k, 1), return_indices=True)
    return values.view(n, c), index.view(n, c)


def max_min_with_indices(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-(n, c) max, its index, min, its index over H x W (index ``h * W + w`` of the first extremum) of an
    NCHW-contiguous or channels_last tensor: ``max(dim)`` / ``min(dim)`` results (for NaN-free input) from
    vectorised ops, as PyTorch's CPU ``max(dim)`` searches the index element by element (~10x ``amax``).

    NCHW: rows whose length is a multiple of 32 (from 8 x 8 maps up) are reduced in blocks of 32 with
    ``amax``/``amin``, the first winning block is found with :func:`_first_at` and only that block is
    searched (no full-size temporary); other rows are searched whole. channels_last: the max and its index
    come from one ``max_pool2d`` over H x W; the min from the row minima over W (vectorised over C) and
    :func:`_max_over_rows` on their negation, then the winning row. With the CPU kernels on
    (:mod:`timm_spe.cpu_kernels`), float32/float64 CPU input takes one pass instead.
    """
    if kernels_apply(x):  # one pass (see timm_spe.cpu_kernels)
        return torch.ops.timm_spe.max_min_with_indices(x)
    n, c, h, w = x.shape
    if not x.is_contiguous():
        f_max, i_max = F.max_pool2d(x, (h, w), return_indices=True)
        rows = x.permute(0, 2, 3, 1)  # N x H x W x C, contiguous
        neg_min, r_min = _max_over_rows(rows.amin(2).neg_())
        in_row = rows.gather(1, r_min.view(n, 1, 1, c).expand(n, 1, w, c)).view(n, w, c)
        _, j_min = _max_over_rows(in_row.neg_())
        return f_max.view(n, c), i_max.view(n, c), neg_min.neg_(), r_min * w + j_min
    flat = x.view(n * c, h * w)
    block = 32
    if h * w < 2 * block or (h * w) % block:
        f_max, f_min = flat.amax(1), flat.amin(1)
        i_max, i_min = _first_at(flat, f_max, True), _first_at(flat, f_min, False)
    else:
        blocks = flat.view(n * c, -1, block)
        num_blocks = blocks.shape[1]
        b_max, b_min = blocks.amax(2), blocks.amin(2)
        f_max, f_min = b_max.amax(1), b_min.amin(1)
        k_max, k_min = _first_at(b_max, f_max, True), _first_at(b_min, f_min, False)
        first_block = torch.arange(0, n * c * num_blocks, num_blocks, device=x.device)
        all_blocks = blocks.view(-1, block)
        i_max = k_max * block + _first_at(all_blocks.index_select(0, first_block + k_max), f_max, True)
        i_min = k_min * block + _first_at(all_blocks.index_select(0, first_block + k_min), f_min, False)
    return f_max.view(n, c), i_max.view(n, c), f_min.view(n, c), i_min.view(n, c)


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
        ctx.save_for_backward(i_max, i_min)
        ctx.shape = x.shape
        ctx.memory_format = _memory_format(x) if _dense_layout(x) else torch.contiguous_format

    @staticmethod
    @once_differentiable
    def backward(ctx, g_max: torch.Tensor, g_min: torch.Tensor, g_i_max=None, g_i_min=None):
        i_max, i_min = ctx.saved_tensors
        grad = torch.empty(
            ctx.shape, dtype=g_max.dtype, device=g_max.device, memory_format=ctx.memory_format).zero_()
        _scatter_add_(grad, i_max, g_max)
        _scatter_add_(grad, i_min, g_min)
        return grad


@register_notrace_function
def max_min(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x.amax((2, 3)), x.amin((2, 3)))``; one pass with the CPU kernels (:mod:`timm_spe.cpu_kernels`) where
    they apply and no gradient is needed (not while tracing: the trace must not depend on grad mode, and plain ops
    keep a traced model free of the extension)."""
    if not torch.jit.is_scripting():  # TorchScript (e.g. of an FX graph calling this leaf) skips the kernels
        if not torch.jit.is_tracing() and kernels_apply(x) and not (torch.is_grad_enabled() and x.requires_grad):
            return torch.ops.timm_spe.max_min(x)
    return x.amax((2, 3)), x.amin((2, 3))


@register_notrace_function
def global_max_min(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x.amax((2, 3)), x.amin((2, 3)))`` with a lean backward (see :class:`_GlobalMaxMin`)."""
    f_max, f_min, _, _ = _GlobalMaxMin.apply(x)
    return f_max, f_min


@register_notrace_function
def scale_add_relu_(x: torch.Tensor, shortcut: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``relu(x * gate + shortcut)`` written into ``x`` and returned (``gate``: N x C x 1 x 1); no autograd. One pass
    with the CPU kernels where they apply, else ``addcmul`` and ``relu_``, same results."""
    if not torch.jit.is_scripting():  # as in max_min
        if kernels_apply_per_map(x, shortcut, gate):
            torch.ops.timm_spe.scale_add_relu_(x, shortcut, gate)
            return x
    return torch.addcmul(shortcut, x, gate, out=x).relu_()


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


def _gate_terms(
        f_max: torch.Tensor, f_min: torch.Tensor, lam: torch.Tensor, w_exc: torch.Tensor, b_exc: torch.Tensor,
        w_rew: torch.Tensor, b_rew: torch.Tensor, paper: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(m_max, m_min, u, v_exc, v_rew)``: the two terms the pooling mix ``u = lambda * m_max + (1 - lambda) * m_min``
    mixes (the reweighted pools ``w_rew * f + b_rew`` in the authors' code, the raw pools in the paper), ``u``, and the
    two gates ``v_exc = sigmoid(w_exc * u + b_exc)`` and ``v_rew`` (``sigmoid(r_max + r_min)`` in the authors' code,
    ``sigmoid(w_rew * (f_max + f_min) + b_rew)`` in the paper)."""
    if paper:
        m_max, m_min = f_max, f_min
        v_rew = torch.sigmoid(torch.addcmul(b_rew, w_rew, f_max + f_min))
    else:
        m_max = torch.addcmul(b_rew, w_rew, f_max)
        m_min = torch.addcmul(b_rew, w_rew, f_min)
        v_rew = torch.sigmoid(m_max + m_min)
    u = lam[0] * m_max + lam[1] * m_min
    v_exc = torch.sigmoid(torch.addcmul(b_exc, w_exc, u))
    return m_max, m_min, u, v_exc, v_rew


def spe_gate(
        f_max: torch.Tensor, f_min: torch.Tensor, lam: torch.Tensor, w_exc: torch.Tensor, b_exc: torch.Tensor,
        w_rew: torch.Tensor, b_rew: torch.Tensor, paper: bool,
) -> torch.Tensor:
    """The N x C gate ``v_exc * v_rew`` from the pools ``f_max``, ``f_min`` (N x C) and ``lam = (lambda, 1 - lambda)``;
    ``paper`` selects Eq. 2-7 over the authors' code (see :func:`_gate_terms`)."""
    _, _, _, v_exc, v_rew = _gate_terms(f_max, f_min, lam, w_exc, b_exc, w_rew, b_rew, paper)
    return v_exc * v_rew


def ablation_gate(
        f_max: torch.Tensor, f_min: torch.Tensor, lam: torch.Tensor, w_exc: torch.Tensor, b_exc: torch.Tensor,
        w_rew: Optional[torch.Tensor], b_rew: Optional[torch.Tensor], w_rew_min: Optional[torch.Tensor],
        b_rew_min: Optional[torch.Tensor], paper: bool, reweight: str,
) -> torch.Tensor:
    """The N x C gate of any variant (Tables 3 and 4), in plain autograd ops; for ``reweight='sum'`` the same as
    :func:`spe_gate`. ``g_rew(f) = w_rew * f + b_rew`` (``'unshared'``: ``w_rew_min, b_rew_min`` for ``f_min``);
    ``r_max = g_rew(f_max)``, ``r_min = g_rew(f_min)``. ``u`` mixes ``r_max, r_min`` (``'official'``) or the raw
    pools (``'paper'``, and always for ``'none'``, which has no ``g_rew``); ``v_exc = sigmoid(w_exc * u + b_exc)``;
    ``v_rew`` is ``sigmoid(r_max + r_min)`` (``'sum'``; Eq. 6 with ``b_rew`` once for ``'paper'``),
    ``r_max + r_min`` (``'no_sigmoid'``), ``sigmoid(r_max * r_min)`` (``'product'``), ``sigmoid(r_max) +
    sigmoid(r_min)`` (``'sigmoid_sum'``), ``sigmoid(r_max) * sigmoid(r_min)`` (``'sigmoid_product'``),
    ``sigmoid(r_max)`` (``'max'``), ``sigmoid(r_min)`` (``'min'``), 1 (``'none'``)."""
    if w_rew is None or b_rew is None:  # 'none': no reweight module
        u = lam[0] * f_max + lam[1] * f_min
        return torch.sigmoid(w_exc * u + b_exc)
    r_max = w_rew * f_max + b_rew
    if w_rew_min is not None and b_rew_min is not None:  # 'unshared'
        r_min = w_rew_min * f_min + b_rew_min
    else:
        r_min = w_rew * f_min + b_rew
    if paper:
        u = lam[0] * f_max + lam[1] * f_min
    else:
        u = lam[0] * r_max + lam[1] * r_min
    v_exc = torch.sigmoid(w_exc * u + b_exc)
    if reweight == 'sum' or reweight == 'unshared':
        v_rew = torch.sigmoid(w_rew * (f_max + f_min) + b_rew) if paper and reweight == 'sum' \
            else torch.sigmoid(r_max + r_min)
    elif reweight == 'no_sigmoid':
        v_rew = r_max + r_min
    elif reweight == 'product':
        v_rew = torch.sigmoid(r_max * r_min)
    elif reweight == 'sigmoid_sum':
        v_rew = torch.sigmoid(r_max) + torch.sigmoid(r_min)
    elif reweight == 'sigmoid_product':
        v_rew = torch.sigmoid(r_max) * torch.sigmoid(r_min)
    elif reweight == 'max':
        v_rew = torch.sigmoid(r_max)
    elif reweight == 'min':
        v_rew = torch.sigmoid(r_min)
    else:
        raise ValueError('unknown reweight ' + reweight)
    return v_exc * v_rew


def _spe_gate_backward(
        grad: torch.Tensor, f_max: torch.Tensor, f_min: torch.Tensor, lam: torch.Tensor,
        w_exc: torch.Tensor, b_exc: torch.Tensor, w_rew: torch.Tensor, b_rew: torch.Tensor, paper: bool,
) -> Tuple[torch.Tensor, ...]:
    """Closed-form vector-Jacobian product of :func:`spe_gate` (N x C sized work only): the gradients
    of ``f_max, f_min, lam, w_exc, b_exc, w_rew, b_rew`` for ``grad``, the gradient of the gate."""
    m_max, m_min, u, v_exc, v_rew = _gate_terms(f_max, f_min, lam, w_exc, b_exc, w_rew, b_rew, paper)
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
        gate = spe_gate(f_max, f_min, lam, w_exc, b_exc, w_rew, b_rew, paper)
        return x * gate.view(n, ch, 1, 1), gate, f_max, f_min, i_max, i_min

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, lam, w_exc, b_exc, w_rew, b_rew, paper = inputs
        _, gate, f_max, f_min, i_max, i_min = output
        ctx.mark_non_differentiable(gate, f_max, f_min, i_max, i_min)
        ctx.save_for_backward(x, gate, f_max, f_min, i_max, i_min, lam, w_exc, b_exc, w_rew, b_rew)
        ctx.paper = paper

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor, *unused):
        x, gate, f_max, f_min, i_max, i_min, lam, w_exc, b_exc, w_rew, b_rew = ctx.saved_tensors
        n, ch = x.shape[0], x.shape[1]
        grad_x = torch.mul(grad.contiguous(memory_format=_memory_format(x)), x)
        grad_gate = grad_x.sum((2, 3))
        g_max, g_min, g_lam, g_w_exc, g_b_exc, g_w_rew, g_b_rew = _spe_gate_backward(
            grad_gate, f_max, f_min, lam, w_exc, b_exc, w_rew, b_rew, ctx.paper)
        torch.mul(grad, gate.view(n, ch, 1, 1), out=grad_x)
        _scatter_add_(grad_x, i_max, g_max)
        _scatter_add_(grad_x, i_min, g_min)
        return grad_x, g_lam, g_w_exc, g_b_exc, g_w_rew, g_b_rew, None


def has_module_hooks(*modules: nn.Module) -> bool:
    """Whether any forward (pre-)hook or backward (pre-)hook, global or on one of ``modules``, would fire on a
    call of these modules: a fused path that skips their calls may only run where this is False."""
    from torch.nn.modules import module as nn_module
    if (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
            or nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks):
        return True
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in modules)


def _spe_fusable(x: torch.Tensor, spe: 'SpeModule') -> bool:
    """The fused training functions apply: the default variant (learned ``lambda``, ``reweight='sum'``; every
    ablation takes plain autograd ops), training with grad, a dense layout, one dtype, no autocast."""
    dtype = x.dtype
    return (
        spe.default_variant and spe.training and torch.is_grad_enabled() and _dense_layout(x)
        and spe.p.dtype == dtype and spe.w_exc.dtype == dtype and not torch.is_autocast_enabled(x.device.type)
    )


@register_notrace_function
def spe_scale(x: torch.Tensor, spe: 'SpeModule') -> torch.Tensor:
    """``x * spe.gate(x)`` for training: one autograd function (:class:`_SpeScale`) for NCHW-contiguous or
    channels_last input of the parameters' dtype without autocast; plain autograd ops otherwise. Same results."""
    if not _spe_fusable(x, spe):
        return x * spe.gate(x).to(x.dtype)
    return _SpeScale.apply(x, spe.mix_weights(), spe.w_exc, spe.b_exc, spe.w_rew, spe.b_rew, spe.paper)[0]


def _bn_input_grad(
        out: torch.Tensor, grad: torch.Tensor, c: torch.Tensor, grad_scale: torch.Tensor, shift: torch.Tensor,
        c_coef: torch.Tensor) -> torch.Tensor:
    """``grad * grad_scale + shift - c * c_coef`` into ``out`` (``grad_scale`` N x C, ``shift`` and ``c_coef`` C): two
    multiply-add passes, or one with the CPU kernels where they apply (same rounding)."""
    n, ch = c.shape[0], c.shape[1]
    if kernels_apply_per_map(c, grad, grad_scale) and out.stride() == c.stride() and out.dtype == c.dtype \
            and shift.dtype == c.dtype and c_coef.dtype == c.dtype:
        torch.ops.timm_spe.bn_input_grad_(out, grad, c, grad_scale.contiguous(), shift.contiguous(), c_coef.contiguous())
        return out
    out = torch.addcmul(shift.view(1, ch, 1, 1), grad, grad_scale.view(n, ch, 1, 1), out=out)
    return out.addcmul_(c, c_coef.view(1, ch, 1, 1), value=-1)


def _per_map_sums(
        grad: torch.Tensor, c: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, buf: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-(n, c) ``sum_hw(grad)`` and ``sum_hw(grad * (c - mean) * invstd)`` (N x C each) of two N x C x H x W
    tensors of one layout, ``mean`` and ``invstd`` per channel.

    NCHW on CPU: BatchNorm's own backward kernel on the 1 x NC x H x W views, i.e. with every (n, c) map as a channel,
    returns exactly these two as its bias and weight gradients, from one read of both tensors. channels_last
    (no such view): with the CPU kernels, one read of both in the ``(c - mean)`` form; else ``sum_hw(grad * c)``
    through ``buf`` (scratch of ``grad``'s shape), which loses relative precision ~``|mean| / std`` of ``c``
    against the ``(c - mean)`` form.
    """
    n, ch, h, w = c.shape
    if c.is_contiguous() and c.device.type == 'cpu':  # CUDA's kernel needs a weight tensor: the generic path there
        _, sum_grad_xhat, sum_grad = torch.ops.aten.native_batch_norm_backward(
            grad.view(1, n * ch, h, w), c.view(1, n * ch, h, w), None, None, None,
            mean.repeat(n), invstd.repeat(n), True, 0., [False, True, True])
        return sum_grad.view(n, ch), sum_grad_xhat.view(n, ch)
    if kernels_apply(c) and grad.stride() == c.stride() and grad.dtype == c.dtype and mean.dtype == c.dtype:
        sum_grad, sum_grad_centered = torch.ops.timm_spe.channels_last_per_map_sums(grad, c, mean.contiguous())
        return sum_grad, invstd * sum_grad_centered
    sum_grad = grad.sum((2, 3))
    sum_grad_c = torch.mul(grad, c, out=buf).sum((2, 3))
    return sum_grad, invstd * (sum_grad_c - mean * sum_grad)


class _BatchNormSpeAddReLU(torch.autograd.Function):
    """``relu(x * spe_gate(x) + shortcut)`` with ``x = batch_norm(c)`` in training mode, as one function.

    Keeps for backward only what the plain block's BN and ReLU keep anyway (BN's input ``c``, its batch
    statistics, the block output) plus N x C pools, indices and gate: the pre-gate activation ``x`` is not
    kept, its buffer becomes the output. Backward works from per-(n, c) sums: with
    ``xhat = (c - mean) * invstd``, the gate's gradient is ``w * sum_hw(g * xhat) + b * sum_hw(g)`` and BN's
    backward of ``dx = g * gate + (pooling gradient at the argmax / argmin)`` needs only the per-channel
    sums of ``dx`` and ``dx * xhat``, which follow from the same N x C sums (:func:`_per_map_sums`). Full-size
    work: one threshold pass, one read of ``g`` and ``c`` for the sums (NCHW; channels_last with the CPU kernels),
    two multiply-add passes for ``c``'s gradient (written into one buffer; one pass with the CPU kernels), as many
    new full-size tensors as the plain block's backward allocates.
    """

    @staticmethod
    def forward(
            c, shortcut, bn_weight, bn_bias, running_mean, running_var, momentum: float, eps: float,
            lam, w_exc, b_exc, w_rew, b_rew, paper: bool,
    ):
        """The output, then the batch statistics, pools, indices and gate backward needs (outputs, so
        :meth:`setup_context` can save them; marked non-differentiable). Updates the running statistics."""
        x, mean, invstd = torch.native_batch_norm(c, bn_weight, bn_bias, running_mean, running_var, True, momentum, eps)
        n, ch = c.shape[0], c.shape[1]
        f_max, i_max, f_min, i_min = max_min_with_indices(x)
        gate = spe_gate(f_max, f_min, lam, w_exc, b_exc, w_rew, b_rew, paper)
        out = scale_add_relu_(x, shortcut, gate.view(n, ch, 1, 1))
        return out, mean, invstd, f_max, f_min, i_max, i_min, gate

    @staticmethod
    def setup_context(ctx, inputs, output):
        c, _, bn_weight, bn_bias, _, _, _, eps, lam, w_exc, b_exc, w_rew, b_rew, paper = inputs
        out, mean, invstd, f_max, f_min, i_max, i_min, gate = output
        ctx.mark_non_differentiable(mean, invstd, f_max, f_min, i_max, i_min, gate)
        ctx.save_for_backward(
            c, out, bn_weight, bn_bias, mean, invstd, f_max, f_min, i_max, i_min, gate, lam, w_exc, b_exc, w_rew, b_rew)
        ctx.eps, ctx.paper = eps, paper

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor, *unused):
        (c, out, bn_weight, bn_bias, mean, invstd, f_max, f_min, i_max, i_min, gate,
         lam, w_exc, b_exc, w_rew, b_rew) = ctx.saved_tensors
        n = c.shape[0]
        count = n * c.shape[2] * c.shape[3]
        # through ReLU: the shortcut's gradient, in c's layout
        grad = torch.ops.aten.threshold_backward(grad, out, 0).contiguous(memory_format=_memory_format(c))
        # per (n, c) sums of grad, grad * xhat and grad * x, with xhat = (c - mean) * invstd and x = w * xhat + b
        buf = torch.empty_like(grad)
        sum_grad, sum_grad_xhat = _per_map_sums(grad, c, mean, invstd, buf)
        grad_gate = bn_weight * sum_grad_xhat + bn_bias * sum_grad
        g_max, g_min, g_lam, g_w_exc, g_b_exc, g_w_rew, g_b_rew = _spe_gate_backward(
            grad_gate, f_max, f_min, lam, w_exc, b_exc, w_rew, b_rew, ctx.paper)
        # BN's backward for dx = grad * gate + (g_max, g_min scattered to the argmax / argmin), from N x C sums only
        xhat_max = (_take(c, i_max) - mean) * invstd
        xhat_min = (_take(c, i_min) - mean) * invstd
        sum_dx = (gate * sum_grad + g_max + g_min).sum(0)
        sum_dx_xhat = (gate * sum_grad_xhat + g_max * xhat_max + g_min * xhat_min).sum(0)
        grad_c = None
        if ctx.needs_input_grad[0]:
            # dc = w * invstd * (dx - mean(dx) - xhat * mean(dx * xhat)): one multiply-add pass over grad, one over c
            scale = bn_weight * invstd
            c_coef = scale * invstd * sum_dx_xhat / count
            grad_c = _bn_input_grad(buf, grad, c, scale * gate, mean * c_coef - scale * sum_dx / count, c_coef)
            _scatter_add_(grad_c, i_max, scale * g_max)
            _scatter_add_(grad_c, i_min, scale * g_min)
        return (grad_c, grad if ctx.needs_input_grad[1] else None, sum_dx_xhat, sum_dx, None, None, None, None,
                g_lam, g_w_exc, g_b_exc, g_w_rew, g_b_rew, None)


def _fusable(c: torch.Tensor, shortcut: torch.Tensor, bn: nn.Module, spe: 'SpeModule') -> bool:
    return (
        _spe_fusable(c, spe) and type(bn) is nn.BatchNorm2d and bn.training and bn.affine and bn.track_running_stats
        and shortcut.shape == c.shape and shortcut.dtype == c.dtype and bn.weight.dtype == c.dtype
    )


@register_notrace_function
def batch_norm_spe_add_relu(
        c: torch.Tensor, shortcut: torch.Tensor, bn: nn.Module, spe: 'SpeModule') -> torch.Tensor:
    """``relu(spe(bn(c)) + shortcut)``: the tail of a bottleneck block with SPE, for training.

    With a training-mode ``nn.BatchNorm2d``, NCHW-contiguous or channels_last input and one dtype (no
    autocast) it runs as one autograd function (see :class:`_BatchNormSpeAddReLU`) that saves no more
    full-size activations for backward than the block without SPE; otherwise as ``bn``, the SPE gate and
    :func:`scale_add_relu`; an ablation variant of ``spe`` (not ``spe.default_variant``) always as ``bn``, its gate
    and plain ``relu(addcmul(...))``.
    Same results either way, running statistics and ``num_batches_tracked`` included.
    """
    if not spe.default_variant:  # ablations (Tables 3, 4): plain autograd ops throughout
        x = bn(c)
        return torch.relu(torch.addcmul(shortcut, x, spe.gate(x)))
    if not _fusable(c, shortcut, bn, spe):
        x = bn(c)
        return scale_add_relu(x, shortcut, spe.gate(x))
    momentum = 0. if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:  # nn.BatchNorm2d's own bookkeeping
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1. / float(bn.num_batches_tracked)
    return _BatchNormSpeAddReLU.apply(
        c, shortcut, bn.weight, bn.bias, bn.running_mean, bn.running_var, momentum, bn.eps,
        spe.mix_weights(), spe.w_exc, spe.b_exc, spe.w_rew, spe.b_rew, spe.paper)[0]


# FX leaves wherever they are called from (also via SpeModule.gate, which is not a module call)
torch.fx.wrap('with_penalty_grad')
torch.fx.wrap('mix_weights')
torch.fx.wrap('max_min')
torch.fx.wrap('global_max_min')
torch.fx.wrap('scale_add_relu')
torch.fx.wrap('scale_add_relu_')
torch.fx.wrap('batch_norm_spe_add_relu')
torch.fx.wrap('spe_scale')


def _check_eta(eta, what: str) -> float:
    """``eta`` as a float: a finite real number >= 0 (a NaN would silently turn every gradient of ``p`` into NaN)."""
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real):
        raise TypeError(f'{what} (penalty coefficient) must be a finite number >= 0, got {eta!r} ({type(eta).__name__}).')
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f'{what} (penalty coefficient) must be a finite number >= 0, got {eta!r}.')
    return float(eta)


# kwargs timm models pass to attention layers in general (e.g. cspnet: act_layer; efficientnet: rd_ratio)
_IGNORED_TIMM_ATTN_KWARGS = frozenset(
    {'act_layer', 'gate_layer', 'norm_layer', 'rd_ratio', 'rd_channels', 'rd_divisor', 'round_chs_fn'})


def check_timm_attn_kwargs(layer: str, accepted: str, timm_attn_kwargs: dict) -> None:
    """Refuse arguments that neither the attention ``layer`` nor timm's generic attention kwargs name (one line)."""
    unknown = set(timm_attn_kwargs) - _IGNORED_TIMM_ATTN_KWARGS
    if unknown:
        raise TypeError(f'{layer} got unexpected arguments {sorted(unknown)}; it accepts {accepted} and (ignored) '
                        f'timm attention kwargs {sorted(_IGNORED_TIMM_ATTN_KWARGS)}.')


class SpeModule(nn.Module):
    """ SPE channel attention: ``out = x * v_exc * v_rew``.

    Args:
        channels: Number of input (and output) channels C.
        formulation: ``'official'`` (authors' code, default) or ``'paper'`` (Eq. 2-7).
        eta: Penalty coefficient of Eq. 8 (0.1 in the paper).
        auto_penalty: Add the penalty's gradient to ``p`` in every training-mode backward.
        lam: ``None`` (default): the learned ``lambda`` of Eq. 3. A number in [0, 1]: Table 3's constant ``lambda``
            (no ``p`` parameter, no penalty; ``eta`` and ``auto_penalty`` are then unused).
        reweight: The reweight module (RM), Table 4 / Fig. 4 (``g_rew(f) = w_rew * f + b_rew``,
            ``r_max = g_rew(f_max)``, ``r_min = g_rew(f_min)``):
            ``'sum'`` (default, SPE): ``v_rew = sigmoid(r_max + r_min)``;
            ``'unshared'`` (a): own ``w_rew_min, b_rew_min`` for ``r_min``, else as ``'sum'`` (+2 params/channel);
            ``'no_sigmoid'`` (b): ``v_rew = r_max + r_min``;
            ``'product'`` (c): ``v_rew = sigmoid(r_max * r_min)``;
            ``'sigmoid_sum'`` (d): ``v_rew = sigmoid(r_max) + sigmoid(r_min)``;
            ``'sigmoid_product'`` (e): ``v_rew = sigmoid(r_max) * sigmoid(r_min)``;
            ``'max'`` (f): ``v_rew = sigmoid(r_max)``;
            ``'min'`` (g): ``v_rew = sigmoid(r_min)``;
            ``'none'`` (without RM): no ``w_rew, b_rew``, ``out = x * v_exc`` with ``u`` mixing the raw pools.
            Only ``v_rew`` changes; ``u`` is as the formulation says (official: mixes ``r_max, r_min``).
            Every variant but the default (learned ``lambda``, ``'sum'``) runs as plain autograd ops.
        **timm_attn_kwargs: Arguments timm's models pass to any attention layer (``act_layer``,
            ``rd_ratio``...); SPE has no MLP, so they are accepted and ignored. Others raise.
    """
    def __init__(
            self,
            channels: int,
            formulation: str = 'official',
            eta: float = 0.1,
            auto_penalty: bool = True,
            lam: Optional[float] = None,
            reweight: str = 'sum',
            device=None,
            dtype=None,
            **timm_attn_kwargs,
    ):
        dd = {'device': device, 'dtype': dtype}
        check_timm_attn_kwargs('SpeModule', 'formulation, eta, auto_penalty, lam, reweight', timm_attn_kwargs)
        super().__init__()
        if formulation not in FORMULATIONS:
            raise ValueError(f"SpeModule formulation must be one of {FORMULATIONS}, got {formulation!r}.")
        if isinstance(channels, bool) or not isinstance(channels, numbers.Integral):
            raise TypeError(f'SpeModule channels must be a positive int, got {channels!r} ({type(channels).__name__}).')
        if channels <= 0:
            raise ValueError(f'SpeModule channels must be a positive int, got {channels!r}.')
        if reweight not in REWEIGHTS:
            raise ValueError(f"SpeModule reweight must be one of {REWEIGHTS}, got {reweight!r}.")
        if lam is not None:
            if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not 0. <= float(lam) <= 1.:
                raise ValueError(f'SpeModule lam must be None (learned) or a number in [0, 1], got {lam!r}.')
            lam = float(lam)
        self.channels = int(channels)
        self.lam = lam
        self.reweight = reweight
        # the fused training functions and the CPU kernels serve only this variant (see _spe_fusable)
        self.default_variant = lam is None and reweight == 'sum'
        self.formulation = formulation
        self.paper = formulation == 'paper'
        self.eta = _check_eta(eta, 'SpeModule eta')
        # the automatic penalty's switch as backward reads it (see _PenaltyGrad); ``auto_penalty`` sets it
        self.register_buffer('penalty_on', torch.ones((), dtype=torch.bool, device=device), persistent=False)
        self.auto_penalty = auto_penalty
        if lam is None:
            self.p = nn.Parameter(torch.empty(2, **dd))
        else:  # Table 3: a constant lambda (a Python float, so that it is exact in any dtype), no p
            self.register_parameter('p', None)
        self.w_exc = nn.Parameter(torch.empty(self.channels, **dd))
        self.b_exc = nn.Parameter(torch.empty(self.channels, **dd))
        if reweight == 'none':
            self.register_parameter('w_rew', None)
            self.register_parameter('b_rew', None)
        else:
            self.w_rew = nn.Parameter(torch.empty(self.channels, **dd))
            self.b_rew = nn.Parameter(torch.empty(self.channels, **dd))
        if reweight == 'unshared':  # (a): g_rew of f_min has its own weight and bias
            self.w_rew_min = nn.Parameter(torch.empty(self.channels, **dd))
            self.b_rew_min = nn.Parameter(torch.empty(self.channels, **dd))
        else:
            self.register_parameter('w_rew_min', None)
            self.register_parameter('b_rew_min', None)
        self.reset_parameters()

    @property
    def auto_penalty(self) -> bool:
        """Whether training-mode backward adds the Eq. 8 penalty's gradient (read when the backward runs)."""
        return self._auto_penalty

    @auto_penalty.setter
    def auto_penalty(self, enabled: bool) -> None:
        self._auto_penalty = bool(enabled)
        # through .data: a backward that saved the switch reads the new value instead of failing autograd's
        # check that saved tensors are unchanged
        self.penalty_on.data.fill_(self._auto_penalty)

    def reset_parameters(self) -> None:
        if self.p is not None:
            nn.init.constant_(self.p, 0.5)
        nn.init.zeros_(self.w_exc)
        nn.init.constant_(self.b_exc, -1.)
        for w, b in ((self.w_rew, self.b_rew), (self.w_rew_min, self.b_rew_min)):
            if w is not None:
                nn.init.zeros_(w)
                nn.init.constant_(b, -1.)

    def mix_weights(self) -> torch.Tensor:
        """``(lambda, 1 - lambda)`` of the self-adaptive pooling (Eq. 3), or the constant ones (``lam``)."""
        lam = self.lam
        if lam is not None:  # made from the Python float in the parameters' dtype: exact also after .double()
            return torch.tensor([lam, 1. - lam], dtype=self.w_exc.dtype, device=self.w_exc.device)
        p = self.p
        if not torch.jit.is_scripting() and self.training:
            p = with_penalty_grad(p, self)
        return mix_weights(p)

    def _fused_ops(self) -> bool:
        """Training-mode autograd functions apply (callers check TorchScript first): not while tracing, since
        torch.jit.trace checks its trace by tracing again under no_grad, so the recorded ops must not depend on
        grad mode."""
        return self.training and not torch.jit.is_tracing()

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The attention map ``v_exc * v_rew`` of shape ``N x C x 1 x 1``."""
        torch._assert(x.ndim == 4, 'SpeModule expects a 4-D N x C x H x W input')
        w_rew, b_rew = self.w_rew, self.b_rew
        if not self.default_variant or w_rew is None or b_rew is None:  # ablations: plain autograd ops only
            v = ablation_gate(
                x.amax((2, 3)), x.amin((2, 3)), self.mix_weights(), self.w_exc, self.b_exc, w_rew, b_rew,
                self.w_rew_min, self.b_rew_min, self.paper, self.reweight)
            return v.unsqueeze(-1).unsqueeze(-1)
        if not torch.jit.is_scripting() and self._fused_ops() and torch.is_grad_enabled():
            f_max, f_min = global_max_min(x)
        else:
            f_max, f_min = max_min(x)
        v = spe_gate(f_max, f_min, self.mix_weights(), self.w_exc, self.b_exc, w_rew, b_rew, self.paper)
        return v.unsqueeze(-1).unsqueeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self.default_variant and self._fused_ops():
            return spe_scale(x, self)
        return x * self.gate(x).to(x.dtype)

    def penalty(self) -> torch.Tensor:
        """Eq. 8 term of this layer: ``eta * (p0^2 + p1^2)`` (0. with a constant ``lam``: no ``p``)."""
        p = self.p
        if p is None:
            return self.w_exc.new_zeros(())
        return self.eta * (p * p).sum()

    def extra_repr(self) -> str:
        s = f'{self.channels}, formulation={self.formulation!r}'
        if self.lam is None:
            s += f', eta={self.eta}, auto_penalty={self.auto_penalty}'
        else:
            s += f', lam={self.lam}'
        if self.reweight != 'sum':
            s += f', reweight={self.reweight!r}'
        return s


def set_auto_penalty(model: nn.Module, enabled: bool = True, eta: Optional[float] = None) -> int:
    """Switch the automatic (gradient-hook) penalty of every SPE layer in ``model`` on or off.

    Args:
        model: Any module containing :class:`SpeModule` layers.
        enabled: Apply the Eq. 8 gradient automatically in training-mode backward.
        eta: Optionally set a new penalty coefficient on every layer (e.g. ``0.1 / k`` for
            gradient accumulation over ``k`` micro-batches).

    Returns:
        The number of SPE layers changed (layers with a constant ``lam`` have no penalty and are skipped).
    """
    if eta is not None:
        eta = _check_eta(eta, 'set_auto_penalty eta')
    n = 0
    for m in model.modules():
        if isinstance(m, SpeModule) and m.p is not None:
            m.auto_penalty = enabled
            if eta is not None:
                m.eta = eta
            n += 1
    return n


def spe_penalty(model: nn.Module) -> torch.Tensor:
    """Explicit Eq. 8 term ``sum over SPE layers of eta * (p0^2 + p1^2)`` for custom training loops.

    Add it to your loss: ``loss = criterion(model(x), y) + spe_penalty(model)``. Calling it hands the
    penalty over to you: it switches the automatic penalty of those layers off (as
    ``set_auto_penalty(model, False)`` does) so the term is never counted twice.
    Returns a 0-dim tensor (0. when the model has no SPE layer with a learned ``lambda``; layers with a constant
    ``lam`` have no ``p`` and no penalty).
    """
    layers = [m for m in model.modules() if isinstance(m, SpeModule) and m.p is not None]
    if not layers:
        return torch.zeros(())
    total = layers[0].penalty()
    for m in layers:
        m.auto_penalty = False
    for m in layers[1:]:
        total = total + m.penalty()
    return total
