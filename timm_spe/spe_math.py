""" SPE's math in plain torch ops: Eq. 3, the gates of the official code and of the paper, the ablation variants,
and the Eq. 8 penalty

Everything the SPE layer computes, as functions of tensors, with no module and no custom autograd: the layer
(:mod:`timm_spe.spe`) calls these, and the memory-efficient training functions (:mod:`timm_spe.spe_me`) compute
the same values (their forward calls :func:`spe_gate`; their closed-form backward differentiates
:func:`gate_terms`). Like timm's ``activations.py`` beside ``activations_me.py``.

Paper: `SPEM: Self-adaptive Pooling Enhanced Attention Module for Image Recognition`
    (also `Mix-Pooling Strategy for Attention Mechanism`) - https://arxiv.org/abs/2208.10322
Official code: https://github.com/Qrange-group/SPEM
"""
from typing import Optional, Tuple

import torch
from timm.layers import register_notrace_function

__all__ = ['mix_weights', 'gate_terms', 'spe_gate', 'ablation_gate', 'penalty', 'penalty_grad']


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


def gate_terms(
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
    ``paper`` selects Eq. 2-7 over the authors' code (see :func:`gate_terms`)."""
    _, _, _, v_exc, v_rew = gate_terms(f_max, f_min, lam, w_exc, b_exc, w_rew, b_rew, paper)
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


def penalty(p: torch.Tensor, eta: float) -> torch.Tensor:
    """Eq. 8: ``eta * (p0^2 + p1^2)``, the term that keeps ``p`` small (the paper's ``eta`` is 0.1)."""
    return eta * (p * p).sum()


def penalty_grad(p: torch.Tensor, eta: float) -> torch.Tensor:
    """The gradient of :func:`penalty` with respect to ``p``: ``2 * eta * p``."""
    return (2. * eta) * p
