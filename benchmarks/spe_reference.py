"""SPE written out plainly: the one reference the tests (and the benchmark's unfused model) compare against.

``authors_gate`` is the SPE part of the authors' ``models/spem.py`` Bottleneck, op by op and with their names
(``w1, b1`` excitation, ``w2, b2`` reweighting, 1 x C x 1 x 1); ``reference_gate`` adds the paper's Eq. 2-7 and every
Table 3 / Table 4 (Fig. 4) variant around it. Nothing here is fused, custom or shared with ``timm_spe``.
Imported by the tests and the benchmark alike as ``benchmarks.spe_reference``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def authors_mix(p: torch.Tensor) -> torch.Tensor:
    """``(lambda, 1 - lambda)`` as the authors compute it: ``p ** 2 / sum(p ** 2)``."""
    p_pow = torch.pow(p, 2)
    return p_pow / torch.sum(p_pow)


def authors_gate(x, mix, w1, b1, w2, b2):
    """The authors' forward up to the product with ``x``: ``sigmoid(mn + mx) * sigmoid(mix)``."""
    mx = F.adaptive_max_pool2d(x, (1, 1))
    mn = x.min(dim=-1, keepdim=True).values.min(dim=-2, keepdim=True).values
    mx = mx * w2 + b2
    mn = mn * w2 + b2
    m = mix[0] * mx + mix[1] * mn
    m = m * w1 + b1
    return torch.sigmoid(mn + mx) * torch.sigmoid(m)


class UnfusedSpeReference(nn.Module):
    """An SPE layer as the authors wrote it (their parameter names and init): no fusion, no custom autograd."""

    def __init__(self, channels: int, **_):
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.b1 = nn.Parameter(torch.full((1, channels, 1, 1), -1.))
        self.w2 = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.b2 = nn.Parameter(torch.full((1, channels, 1, 1), -1.))
        self.p = nn.Parameter(torch.full((2,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return authors_gate(x, authors_mix(self.p), self.w1, self.b1, self.w2, self.b2) * x


def reference_gate(x, lam, w_exc, b_exc, w_rew, b_rew, w_rew_min=None, b_rew_min=None, formulation='official',
                   reweight='sum'):
    """The N x C x 1 x 1 gate of every variant (``lam``: a number or 0-dim tensor; parameters: C vectors).

    'official' with 'sum' is :func:`authors_gate`; the rest is written out from Fig. 4 / Section 5, one branch per row.
    """
    view = lambda t: t.view(1, -1, 1, 1)
    sig = torch.sigmoid
    if formulation == 'official' and reweight == 'sum':
        return authors_gate(x, (lam, 1 - lam), view(w_exc), view(b_exc), view(w_rew), view(b_rew))
    f_max = F.adaptive_max_pool2d(x, 1)
    f_min = -F.adaptive_max_pool2d(-x, 1)
    if reweight == 'none':  # without RM: pooling and excitation only
        return sig(view(w_exc) * (lam * f_max + (1 - lam) * f_min) + view(b_exc))
    g_max = f_max * view(w_rew) + view(b_rew)  # g_rew(f_max)
    if reweight == 'unshared':  # (a)
        g_min = f_min * view(w_rew_min) + view(b_rew_min)
    else:
        g_min = f_min * view(w_rew) + view(b_rew)
    u = lam * g_max + (1 - lam) * g_min if formulation == 'official' else lam * f_max + (1 - lam) * f_min
    v_exc = sig(view(w_exc) * u + view(b_exc))
    v_rew = {
        'sum': sig(f_min * view(w_rew) + f_max * view(w_rew) + view(b_rew)),  # 'paper': Eq. 6
        'unshared': sig(g_max + g_min),
        'no_sigmoid': g_max + g_min,  # (b)
        'product': sig(g_max * g_min),  # (c)
        'sigmoid_sum': sig(g_max) + sig(g_min),  # (d)
        'sigmoid_product': sig(g_max) * sig(g_min),  # (e)
        'max': sig(g_max),  # (f)
        'min': sig(g_min),  # (g)
    }[reweight]
    return v_exc * v_rew


def reference_spe(x, p, w_exc, b_exc, w_rew, b_rew, formulation='official'):
    """The default SPE layer's output from its parameters (learned ``lambda`` from ``p``)."""
    return x * reference_gate(x, authors_mix(p)[0], w_exc, b_exc, w_rew, b_rew, formulation=formulation)


def spe_params(m):
    """An SpeModule's parameters in :func:`reference_spe`'s order."""
    return m.p, m.w_exc, m.b_exc, m.w_rew, m.b_rew
