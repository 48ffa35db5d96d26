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
"""
from typing import Optional, Tuple

import torch
from torch import nn as nn
from timm.layers import register_notrace_function

__all__ = ['SpeModule', 'spe_penalty', 'set_auto_penalty', 'FORMULATIONS']

FORMULATIONS = ('official', 'paper')


class _PenaltyGrad(torch.autograd.Function):
    """Identity in forward; in backward adds ``2 * eta * p``, the gradient of ``eta * sum(p^2)``.

    ``eta`` and the on/off switch are read from the owning layer at backward time, so that
    ``loss = task_loss + spe_penalty(model)`` (which switches the automatic penalty off after the
    forward already ran) still counts the penalty exactly once.
    """

    @staticmethod
    def forward(ctx, p: torch.Tensor, owner: nn.Module) -> torch.Tensor:
        ctx.save_for_backward(p)
        ctx.owner = owner
        return p.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        p, = ctx.saved_tensors
        owner = ctx.owner
        if owner.auto_penalty and owner.eta > 0:
            grad = grad + (2. * owner.eta) * p
        return grad, None


@register_notrace_function
def with_penalty_grad(p: torch.Tensor, owner: nn.Module) -> torch.Tensor:
    """Return ``p`` unchanged; backward adds ``owner``'s Eq. 8 penalty gradient if it is switched on."""
    return _PenaltyGrad.apply(p, owner)


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


class _GlobalMaxMin(torch.autograd.Function):
    """Per-channel global max and min over H x W that saves only the two N x C index tensors.

    autograd's ``amax``/``amin`` keep the whole input and spend several full-size passes in backward
    (mask, count, cast, multiply); here backward is one zero-fill and two N x C scatters. With ties
    the gradient goes to the first maximal (minimal) element, where ``amax`` would split it evenly.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor):
        flat = x.reshape(x.shape[0], x.shape[1], -1)  # a view for NCHW-contiguous input
        f_max, i_max = flat.max(dim=-1)
        f_min, i_min = flat.min(dim=-1)
        ctx.save_for_backward(i_max, i_min)
        ctx.shape = x.shape
        return f_max, f_min

    @staticmethod
    def backward(ctx, g_max: torch.Tensor, g_min: torch.Tensor):
        i_max, i_min = ctx.saved_tensors
        n, c = ctx.shape[0], ctx.shape[1]
        grad = g_max.new_zeros(n, c, ctx.shape[2] * ctx.shape[3])
        grad.scatter_(-1, i_max.unsqueeze(-1), g_max.unsqueeze(-1))
        grad.scatter_add_(-1, i_min.unsqueeze(-1), g_min.unsqueeze(-1))
        return grad.view(ctx.shape)


@register_notrace_function
def global_max_min(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x.amax((2, 3)), x.amin((2, 3)))`` with a lean backward (see :class:`_GlobalMaxMin`)."""
    return _GlobalMaxMin.apply(x)


class _ScaleAddReLU(torch.autograd.Function):
    """``relu(x * gate + shortcut)`` with ``gate`` of shape N x C x 1 x 1, and a lean backward: one
    threshold pass, one multiply for ``x``'s gradient and a batched matrix product that multiplies and
    reduces over H x W in one pass for ``gate``'s (autograd's ``addcmul`` backward materialises both
    full-size products and then reduces)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shortcut: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        out = torch.addcmul(shortcut, x, gate).relu_()
        ctx.save_for_backward(x, gate, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, gate, out = ctx.saved_tensors
        grad = torch.ops.aten.threshold_backward(grad, out, 0)
        n, c = x.shape[0], x.shape[1]
        grad_gate = None
        if ctx.needs_input_grad[2]:
            grad_gate = torch.matmul(
                grad.reshape(n, c, 1, -1), x.reshape(n, c, -1, 1)).view(n, c, 1, 1).to(gate.dtype)
        grad_x = grad * gate if ctx.needs_input_grad[0] else None
        return grad_x, grad, grad_gate


@register_notrace_function
def scale_add_relu(x: torch.Tensor, shortcut: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``relu(x * gate + shortcut)``, the tail of a bottleneck block with SPE (see :class:`_ScaleAddReLU`)."""
    return _ScaleAddReLU.apply(x, shortcut, gate)


# FX leaves wherever they are called from (also via SpeModule.gate, which is not a module call)
torch.fx.wrap('with_penalty_grad')
torch.fx.wrap('mix_weights')
torch.fx.wrap('global_max_min')
torch.fx.wrap('scale_add_relu')


# kwargs timm models pass to attention layers in general (e.g. cspnet: act_layer; efficientnet: rd_ratio)
_IGNORED_TIMM_ATTN_KWARGS = frozenset(
    {'act_layer', 'gate_layer', 'norm_layer', 'rd_ratio', 'rd_channels', 'rd_divisor', 'round_chs_fn'})


class SpeModule(nn.Module):
    """ SPE channel attention: ``out = x * v_exc * v_rew``.

    Args:
        channels: Number of input (and output) channels C.
        formulation: ``'official'`` (authors' code, default) or ``'paper'`` (Eq. 2-7).
        eta: Penalty coefficient of Eq. 8 (0.1 in the paper).
        auto_penalty: Add the penalty's gradient to ``p`` in every training-mode backward.
        **timm_attn_kwargs: Arguments timm's models pass to any attention layer (``act_layer``,
            ``rd_ratio``...); SPE has no MLP, so they are accepted and ignored. Others raise.
    """
    def __init__(
            self,
            channels: int,
            formulation: str = 'official',
            eta: float = 0.1,
            auto_penalty: bool = True,
            device=None,
            dtype=None,
            **timm_attn_kwargs,
    ):
        dd = {'device': device, 'dtype': dtype}
        unknown = set(timm_attn_kwargs) - _IGNORED_TIMM_ATTN_KWARGS
        if unknown:
            raise TypeError(f'SpeModule got unexpected arguments {sorted(unknown)}; it accepts formulation, eta, '
                            f'auto_penalty and (ignored) timm attention kwargs {sorted(_IGNORED_TIMM_ATTN_KWARGS)}.')
        super().__init__()
        if formulation not in FORMULATIONS:
            raise ValueError(f"SpeModule formulation must be one of {FORMULATIONS}, got {formulation!r}.")
        if channels <= 0:
            raise ValueError(f'SpeModule channels must be a positive int, got {channels!r}.')
        if eta < 0:
            raise ValueError(f'SpeModule eta (penalty coefficient) must be >= 0, got {eta!r}.')
        self.channels = channels
        self.formulation = formulation
        self.paper = formulation == 'paper'
        self.eta = float(eta)
        self.auto_penalty = auto_penalty
        self.p = nn.Parameter(torch.empty(2, **dd))
        self.w_exc = nn.Parameter(torch.empty(channels, **dd))
        self.b_exc = nn.Parameter(torch.empty(channels, **dd))
        self.w_rew = nn.Parameter(torch.empty(channels, **dd))
        self.b_rew = nn.Parameter(torch.empty(channels, **dd))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.p, 0.5)
        nn.init.zeros_(self.w_exc)
        nn.init.constant_(self.b_exc, -1.)
        nn.init.zeros_(self.w_rew)
        nn.init.constant_(self.b_rew, -1.)

    def mix_weights(self) -> torch.Tensor:
        """``(lambda, 1 - lambda)`` of the self-adaptive pooling (Eq. 3)."""
        p = self.p
        if not torch.jit.is_scripting() and self.training:
            p = with_penalty_grad(p, self)
        return mix_weights(p)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The attention map ``v_exc * v_rew`` of shape ``N x C x 1 x 1``."""
        torch._assert(x.ndim == 4, 'SpeModule expects a 4-D N x C x H x W input')
        if not torch.jit.is_scripting() and self.training and torch.is_grad_enabled():
            f_max, f_min = global_max_min(x)
        else:
            f_max, f_min = x.amax((2, 3)), x.amin((2, 3))
        lam = self.mix_weights()
        if self.paper:
            u = lam[0] * f_max + lam[1] * f_min
            v_rew = torch.sigmoid(torch.addcmul(self.b_rew, self.w_rew, f_max + f_min))
        else:
            r_max = torch.addcmul(self.b_rew, self.w_rew, f_max)
            r_min = torch.addcmul(self.b_rew, self.w_rew, f_min)
            u = lam[0] * r_max + lam[1] * r_min
            v_rew = torch.sigmoid(r_max + r_min)
        v_exc = torch.sigmoid(torch.addcmul(self.b_exc, self.w_exc, u))
        return (v_exc * v_rew).unsqueeze(-1).unsqueeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x).to(x.dtype)

    def penalty(self) -> torch.Tensor:
        """Eq. 8 term of this layer: ``eta * (p0^2 + p1^2)``."""
        return self.eta * (self.p * self.p).sum()

    def extra_repr(self) -> str:
        return f'{self.channels}, formulation={self.formulation!r}, eta={self.eta}, auto_penalty={self.auto_penalty}'


def set_auto_penalty(model: nn.Module, enabled: bool = True, eta: Optional[float] = None) -> int:
    """Switch the automatic (gradient-hook) penalty of every SPE layer in ``model`` on or off.

    Args:
        model: Any module containing :class:`SpeModule` layers.
        enabled: Apply the Eq. 8 gradient automatically in training-mode backward.
        eta: Optionally set a new penalty coefficient on every layer (e.g. ``0.1 / k`` for
            gradient accumulation over ``k`` micro-batches).

    Returns:
        The number of SPE layers changed.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, SpeModule):
            m.auto_penalty = enabled
            if eta is not None:
                if eta < 0:
                    raise ValueError(f'eta must be >= 0, got {eta!r}.')
                m.eta = float(eta)
            n += 1
    return n


def spe_penalty(model: nn.Module) -> torch.Tensor:
    """Explicit Eq. 8 term ``sum over SPE layers of eta * (p0^2 + p1^2)`` for custom training loops.

    Add it to your loss: ``loss = criterion(model(x), y) + spe_penalty(model)``. Calling it hands the
    penalty over to you: it switches the automatic penalty of those layers off (as
    ``set_auto_penalty(model, False)`` does) so the term is never counted twice.
    Returns a 0-dim tensor (0. when the model has no SPE layer).
    """
    layers = [m for m in model.modules() if isinstance(m, SpeModule)]
    if not layers:
        return torch.zeros(())
    total = layers[0].penalty()
    for m in layers:
        m.auto_penalty = False
    for m in layers[1:]:
        total = total + m.penalty()
    return total
