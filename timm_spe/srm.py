""" SRM: Style-based Recalibration Module

A channel attention module that summarises each channel by its style, the mean and the standard
deviation over the spatial positions, combines the two with a per-channel (channel-wise fully
connected) weight pair, normalises with batch norm and gates the channel with a sigmoid:
``out = x * sigmoid(BN(w0 * mean + w1 * std))``.

Paper: `SRM: A Style-based Recalibration Module for Convolutional Neural Networks`
    - Lee, Kim, Nam, ICCV 2019 - https://arxiv.org/abs/1903.10829
Official code: https://github.com/hyunjaelee410/style-based-recalibration-module
    (``models/recalibration_modules.py``, ``SRMLayer``)

Follows the authors' ``SRMLayer``: same parameters and state-dict keys (``cfc``: C x 2, initialised to
zero; ``bn``: a ``BatchNorm2d`` over the C x 1 x 1 style vector), unbiased standard deviation. The
authors' style pooling exists in two versions: ``x.std`` and ``sqrt(x.var + 1e-5)`` (finite gradients
for a constant channel; the one nearly every copy of ``SRMLayer`` carries). ``eps=1e-5`` (default) is
the latter and ``eps=0`` the former. 4 parameters per channel, as Table 1 of the SPE paper counts
(ResNet164 + SRM: 1.74M / 1.76M on CIFAR-10 / CIFAR-100). See docs/design_space.md.

As in the authors' code the batch norm sees one value per channel and sample: in training mode it
needs a batch of at least 2, and the standard deviation needs at least 2 spatial positions.
"""
import torch
from torch import nn

from ._helpers import check_timm_attn_kwargs

__all__ = ['SrmModule']


class SrmModule(nn.Module):
    """ SRM channel attention: ``out = x * sigmoid(BN(cfc[:, 0] * mean + cfc[:, 1] * std))``.

    Args:
        channels: Number of input (and output) channels C.
        eps: Added to the (unbiased) variance before the square root; 1e-5 as the authors' later
            code, 0 for their first version (``torch.std``).
        **timm_attn_kwargs: Arguments timm's models pass to any attention layer (``act_layer``,
            ``rd_ratio``...); SRM has no MLP, so they are accepted and ignored. Others raise.
    """
    def __init__(
            self,
            channels: int,
            eps: float = 1e-5,
            device=None,
            dtype=None,
            **timm_attn_kwargs,
    ):
        dd = {'device': device, 'dtype': dtype}
        check_timm_attn_kwargs('SrmModule', 'eps', timm_attn_kwargs)
        super().__init__()
        if channels <= 0:
            raise ValueError(f'SrmModule channels must be a positive int, got {channels!r}.')
        if eps < 0:
            raise ValueError(f'SrmModule eps must be >= 0, got {eps!r}.')
        self.channels = channels
        self.eps = float(eps)
        self.cfc = nn.Parameter(torch.zeros(channels, 2, **dd))  # channel-wise fully connected: (mean, std) -> 1
        self.bn = nn.BatchNorm2d(channels, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # style pooling: per-channel mean and standard deviation over H x W
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = (x.var(dim=(2, 3), keepdim=True) + self.eps).sqrt()
        # style integration: channel-wise fully connected, batch norm, sigmoid gate
        z = mean * self.cfc[:, 0].view(1, -1, 1, 1) + std * self.cfc[:, 1].view(1, -1, 1, 1)
        return x * torch.sigmoid(self.bn(z)).to(x.dtype)

    def extra_repr(self) -> str:
        return f'{self.channels}, eps={self.eps}'
