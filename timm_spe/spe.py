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

The math (Eq. 3, both gates, every ablation, the penalty) is in :mod:`timm_spe.spe_math`; this file is the layer.
In training the default variant runs as memory-efficient autograd functions (:mod:`timm_spe.spe_me`) wherever
nothing can tell them apart from those ops; results are the same either way.
"""
import math
import numbers
from typing import Optional

import torch
from timm.layers import register_notrace_function
from torch import nn as nn

from . import cpu_kernels, spe_me, spe_triton
from ._helpers import check_timm_attn_kwargs, is_fx_symbolic_tracing
from .cpu_kernels import max_min, scale_add_relu_
from .spe_math import ablation_gate, mix_weights, penalty, spe_gate
from .spe_me import fused_applies, global_max_min, scale_add_relu, spe_scale, with_penalty_grad

__all__ = [
    'SpeModule', 'spe_penalty', 'set_auto_penalty', 'batch_norm_spe_add_relu', 'spe_add_relu_', 'FORMULATIONS', 'REWEIGHTS',
]

FORMULATIONS = ('official', 'paper')
# the reweight module (RM) of SPE and its Table 4 / Fig. 4 ablations: 'sum' is SPE itself, then (a) ... (g), without RM
REWEIGHTS = ('sum', 'unshared', 'no_sigmoid', 'product', 'sigmoid_sum', 'sigmoid_product', 'max', 'min', 'none')


@register_notrace_function  # shape checks: an FX leaf
def check_spe_input(x: torch.Tensor, channels: int) -> None:
    """Readable errors for what the pooling and the per-channel parameters would otherwise fail on obscurely: not
    N x C x H x W, another C than the layer's, or an empty H x W map (nothing to pool). Skipped while
    torch.jit.trace records (the legacy ONNX exporter too): its shapes are the example's, and the checks would only
    add TracerWarnings."""
    if torch.jit.is_tracing():
        return
    if x.dim() != 4:
        raise ValueError(f'SpeModule expects a 4-D N x C x H x W input, got shape {list(x.shape)}.')
    if x.shape[1] != channels:
        raise ValueError(f'SpeModule({channels}) got an input with {x.shape[1]} channels (shape {list(x.shape)}): '
                         f'create it with the channel count of the feature map it follows.')
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f'SpeModule got an empty {x.shape[2]} x {x.shape[3]} feature map (shape {list(x.shape)}): '
                         f'global max/min pooling needs at least one pixel; use a larger input.')


# FX leaves wherever this module calls them (SpeModule.attn_map is a method, not a module call)
torch.fx.wrap('with_penalty_grad')
torch.fx.wrap('mix_weights')
torch.fx.wrap('check_spe_input')
torch.fx.wrap('max_min')
torch.fx.wrap('global_max_min')
torch.fx.wrap('spe_scale')
torch.fx.wrap('scale_add_relu_')


def _check_eta(eta, what: str) -> float:
    """``eta`` as a float: a finite real number >= 0 (a NaN would silently turn every gradient of ``p`` into NaN)."""
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real):
        raise TypeError(f'{what} (penalty coefficient) must be a finite number >= 0, got {eta!r} ({type(eta).__name__}).')
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f'{what} (penalty coefficient) must be a finite number >= 0, got {eta!r}.')
    return float(eta)


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
        # the fused training functions and the CPU kernels serve only this variant
        self.default_variant = lam is None and reweight == 'sum'
        self.formulation = formulation
        self.paper = formulation == 'paper'
        self.eta = _check_eta(eta, 'SpeModule eta')
        # the automatic penalty's switch as backward reads it (see spe_me._PenaltyGrad); ``auto_penalty`` sets it
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
        """Whether training-mode backward adds the Eq. 8 penalty's gradient (read when the backward runs). The
        switch is the ``penalty_on`` buffer alone, which a scripted copy of this layer shares."""
        return bool(self.penalty_on)

    @auto_penalty.setter
    def auto_penalty(self, enabled: bool) -> None:
        # through .data: a backward that saved the switch reads the new value instead of failing autograd's
        # check that saved tensors are unchanged
        self.penalty_on.data.fill_(bool(enabled))

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
        assert p is not None  # lam is None
        if torch.jit.is_scripting():
            # TorchScript cannot run the penalty's autograd.Function: refuse to train without the paper's objective
            if self.training and torch.is_grad_enabled() and p.requires_grad and self.eta > 0 and bool(self.penalty_on):
                raise RuntimeError(
                    'SpeModule: a TorchScript model cannot add the Eq. 8 penalty in training (its gradient hook is '
                    'a Python autograd.Function), so it would train without the paper\'s objective: train the eager '
                    'or torch.compile\'d model (timm train.py without --torchscript), or call '
                    'timm_spe.set_auto_penalty(model, False) before training and add timm_spe.spe_penalty(model) '
                    'to the loss.')
        elif self.training:
            p = with_penalty_grad(p, self.penalty_on, self.eta)
        return mix_weights(p)

    def _fused_ops(self) -> bool:
        """Training-mode autograd functions apply (callers check TorchScript first): not while tracing, since
        torch.jit.trace checks its trace by tracing again under no_grad, so the recorded ops must not depend on
        grad mode."""
        return self.training and not torch.jit.is_tracing()

    def attn_map(self, x: torch.Tensor) -> torch.Tensor:
        """The channel attention map ``v_exc * v_rew`` of shape ``N x C x 1 x 1`` (``forward`` scales ``x`` by it)."""
        check_spe_input(x, self.channels)
        w_rew, b_rew = self.w_rew, self.b_rew
        if not self.default_variant or w_rew is None or b_rew is None:  # ablations: plain autograd ops only
            v = ablation_gate(
                x.amax((2, 3)), x.amin((2, 3)), self.mix_weights(), self.w_exc, self.b_exc, w_rew, b_rew,
                self.w_rew_min, self.b_rew_min, self.paper, self.reweight)
            return v.unsqueeze(-1).unsqueeze(-1)
        f_max, f_min = self._pools(x)
        v = spe_gate(f_max, f_min, self.mix_weights(), self.w_exc, self.b_exc, w_rew, b_rew, self.paper)
        return v.unsqueeze(-1).unsqueeze(-1)

    def _pools(self, x: torch.Tensor):
        """``(f_max, f_min)`` of the default variant: with the lean backward where training, else one pass."""
        if not torch.jit.is_scripting() and self._fused_ops() and torch.is_grad_enabled():
            return global_max_min(x)
        return max_min(x)

    @torch.jit.unused
    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`attn_map` in ``x``'s dtype: what :meth:`forward` scales ``x`` by (under autocast the float32 map rounded
        to ``x``'s bfloat16 / float16, an N x C cast, never a full-size one). The default variant outside tracing goes
        through the CPU kernels' dispatch: one op from ``x`` and ``p`` where they are on and nothing records a gradient
        (inference, :func:`timm_spe.cpu_kernels.spe_gate_of`), else the pooling and :func:`timm_spe.cpu_kernels.spe_gate`;
        the same values either way. (Eager only: TorchScript calls :meth:`attn_map`.)"""
        if not self.default_variant or is_fx_symbolic_tracing():
            return self.attn_map(x).to(x.dtype)  # an FX graph keeps the gate's ops as nodes
        check_spe_input(x, self.channels)
        w_rew, b_rew, p = self.w_rew, self.b_rew, self.p
        assert w_rew is not None and b_rew is not None and p is not None  # the default variant
        v = cpu_kernels.spe_gate_of(x, p, self.w_exc, self.b_exc, w_rew, b_rew, self.paper)
        if v is None:
            f_max, f_min = self._pools(x)
            v = cpu_kernels.spe_gate(f_max, f_min, self.mix_weights(), self.w_exc, self.b_exc, w_rew, b_rew, self.paper)
        return v.unsqueeze(-1).unsqueeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self.default_variant and self._fused_ops():
            check_spe_input(x, self.channels)
            if spe_triton.applies(x) and fused_applies(x, self.p, self.w_exc):  # CUDA, where Triton runs
                return spe_triton.spe_scale(
                    x, self.p, self.penalty_on, self.eta, self.w_exc, self.b_exc, self.w_rew, self.b_rew, self.paper)
            return spe_scale(x, self.mix_weights(), self.w_exc, self.b_exc, self.w_rew, self.b_rew, self.paper)
        if not torch.jit.is_scripting():
            return x * self.gate(x)
        return x * self.attn_map(x).to(x.dtype)

    def penalty(self) -> torch.Tensor:
        """Eq. 8 term of this layer: ``eta * (p0^2 + p1^2)`` (0. with a constant ``lam``: no ``p``)."""
        p = self.p
        if p is None:
            return self.w_exc.new_zeros(())
        return penalty(p, self.eta)

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
    layers = _penalized_layers(model)
    for m in layers:
        _set_switch(m, enabled)
        if eta is not None:
            m.eta = eta
    return len(layers)


def _penalized_layers(model: nn.Module) -> list:
    """The SPE layers with a learned ``lambda`` (a ``p``) in ``model``, eager or TorchScript (a scripted model's
    layers are ``RecursiveScriptModule``s named after their class; they share ``p`` and the switch with the eager
    model they were scripted from)."""
    return [m for m in model.modules()
            if (isinstance(m, SpeModule) or getattr(m, 'original_name', None) == 'SpeModule') and m.p is not None]


def _set_switch(m: nn.Module, enabled: bool) -> None:
    m.penalty_on.data.fill_(bool(enabled))  # SpeModule.auto_penalty's setter, for scripted layers too


def spe_penalty(model: nn.Module) -> torch.Tensor:
    """Explicit Eq. 8 term ``sum over SPE layers of eta * (p0^2 + p1^2)`` for custom training loops.

    Add it to your loss: ``loss = criterion(model(x), y) + spe_penalty(model)``. Calling it hands the
    penalty over to you: it switches the automatic penalty of those layers off (as
    ``set_auto_penalty(model, False)`` does) so the term is never counted twice.
    Returns a 0-dim tensor (0. when the model has no SPE layer with a learned ``lambda``; layers with a constant
    ``lam`` have no ``p`` and no penalty).
    """
    layers = _penalized_layers(model)
    if not layers:
        return torch.zeros(())
    for m in layers:
        _set_switch(m, False)
    total = penalty(layers[0].p, layers[0].eta)  # not m.penalty(): a scripted layer has no such method
    for m in layers[1:]:
        total = total + penalty(m.p, m.eta)
    return total


def _block_tail_fusable(x: torch.Tensor, shortcut: torch.Tensor, bn: nn.Module, spe: SpeModule) -> bool:
    """:func:`~timm_spe.spe_me.fused_batch_norm_spe_add_relu` applies: the default variant in training, where
    :func:`~timm_spe.spe_me.fused_applies`, with a training-mode ``nn.BatchNorm2d`` that tracks running statistics
    and a shortcut of ``x``'s shape and dtype."""
    return (
        spe.default_variant and spe.training and type(bn) is nn.BatchNorm2d and bn.training and bn.affine
        and bn.track_running_stats and fused_applies(x, spe.p, spe.w_exc, bn.weight)
        and shortcut.shape == x.shape and shortcut.dtype == x.dtype
    )


@register_notrace_function
def batch_norm_spe_add_relu(x: torch.Tensor, shortcut: torch.Tensor, bn: nn.Module, spe: SpeModule) -> torch.Tensor:
    """``relu(spe(bn(x)) + shortcut)``: the tail of a bottleneck block with SPE, for training.

    With a training-mode ``nn.BatchNorm2d``, NCHW-contiguous or channels_last input and one dtype (or, under
    autocast / AMP, bfloat16 / float16 activations with float32 parameters) it runs as one autograd function (:func:`~timm_spe.spe_me.fused_batch_norm_spe_add_relu`) that saves no
    more full-size activations for backward than the block without SPE; otherwise as ``bn``, the SPE gate and
    :func:`~timm_spe.spe_me.scale_add_relu`; an ablation variant of ``spe`` (not ``spe.default_variant``) always as
    ``bn``, its gate and plain ``relu(addcmul(...))``.
    Same results either way, running statistics and ``num_batches_tracked`` included. The gate (float32 under
    autocast) is rounded to the activations' dtype before it scales them, as :meth:`SpeModule.forward` does: the block
    output keeps the dtype the block without SPE gives, with no full-size cast. Where the fused function would run and
    the Triton kernels take ``x`` (:func:`timm_spe.spe_triton.applies`: by default CUDA tensors, where Triton runs on
    the GPU), they run instead: same values to float32 rounding, one kernel per pass.
    """
    if not spe.default_variant:  # ablations (Tables 3, 4): plain autograd ops throughout
        y = bn(x)
        return torch.relu(torch.addcmul(shortcut, y, spe.attn_map(y).to(y.dtype)))
    if not _block_tail_fusable(x, shortcut, bn, spe):
        y = bn(x)
        return scale_add_relu(y, shortcut, spe.gate(y))
    momentum = 0. if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:  # nn.BatchNorm2d's own bookkeeping
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1. / float(bn.num_batches_tracked)
    if spe_triton.applies(x):  # CUDA, where Triton runs: one kernel per pass, Eq. 3 and the penalty inside
        return spe_triton.fused_batch_norm_spe_add_relu(
            x, shortcut, bn.weight, bn.bias, bn.running_mean, bn.running_var, momentum, bn.eps,
            spe.p, spe.penalty_on, spe.eta, spe.w_exc, spe.b_exc, spe.w_rew, spe.b_rew, spe.paper)
    return spe_me.fused_batch_norm_spe_add_relu(
        x, shortcut, bn.weight, bn.bias, bn.running_mean, bn.running_var, momentum, bn.eps,
        spe.mix_weights(), spe.w_exc, spe.b_exc, spe.w_rew, spe.b_rew, spe.paper)


def spe_add_relu_(y: torch.Tensor, shortcut: torch.Tensor, spe: SpeModule) -> torch.Tensor:
    """``relu(spe(y) + shortcut)`` written into ``y`` and returned: a bottleneck block's tail in inference (no autograd;
    ``y`` is the caller's own temporary, e.g. its BN's fresh output). The default variant with the CPU kernels on: one op
    (:func:`timm_spe.cpu_kernels.spe_add_relu_`: the pooling, Eq. 3, the gate and the tail); otherwise
    :meth:`SpeModule.gate` and :func:`~timm_spe.cpu_kernels.scale_add_relu_`. The same values either way; FX traces
    the second form."""
    p, w_rew, b_rew = spe.p, spe.w_rew, spe.b_rew
    if spe.default_variant and p is not None and w_rew is not None and b_rew is not None \
            and not is_fx_symbolic_tracing() and not torch.jit.is_tracing():
        check_spe_input(y, spe.channels)
        if cpu_kernels.spe_add_relu_(y, shortcut, p, spe.w_exc, spe.b_exc, w_rew, b_rew, spe.paper):
            return y
    return scale_add_relu_(y, shortcut, spe.gate(y))
