""" SGE: Spatial Group-wise Enhance

A spatial attention module that splits the channels into groups and, in each group, scores every
position by its similarity (dot product over the group's channels) to the group's global average
feature, normalises the scores over the positions (zero mean, unit std), applies a per-group scale
and shift and gates the group's features with a sigmoid of the result.

Paper: `Spatial Group-wise Enhance: Improving Semantic Feature Learning in Convolutional Networks`
    - Li, Hu, Yang, 2019 - https://arxiv.org/abs/1905.09646
Official code: https://github.com/implus/PytorchInsight
    (``classification/models/imagenet/resnet_sge.py``, ``SpatialGroupEnhance``)

Follows the authors' ``SpatialGroupEnhance``: same parameters and state-dict keys (``weight``
initialised to 0 and ``bias`` to 1, both 1 x G x 1 x 1), unbiased std over the positions plus 1e-5,
64 groups by default as in their ResNets. 2 parameters per group: with 64 groups, ResNet164 + SGE has
1.71M / 1.73M parameters on CIFAR-10 / CIFAR-100, Table 1 of the SPE paper. (Those two rounded
numbers allow any G from 8 to 71; 64 is the authors' setting. See docs/design_space.md.)

As in the authors' code, the std needs at least 2 spatial positions and channels must be divisible
by ``groups``.
"""
import torch
from torch import nn

from ._helpers import check_timm_attn_kwargs

__all__ = ['SgeModule']


class SgeModule(nn.Module):
    """ SGE spatial attention per channel group.

    Args:
        channels: Number of input (and output) channels C, divisible by ``groups``.
        groups: Number of channel groups G (64 as the authors' ResNets).
        eps: Added to the std of the scores (1e-5 as the authors' code).
        **timm_attn_kwargs: Arguments timm's models pass to any attention layer (``act_layer``,
            ``rd_ratio``...); SGE has no MLP, so they are accepted and ignored. Others raise.
    """
    def __init__(
            self,
            channels: int,
            groups: int = 64,
            eps: float = 1e-5,
            device=None,
            dtype=None,
            **timm_attn_kwargs,
    ):
        dd = {'device': device, 'dtype': dtype}
        check_timm_attn_kwargs('SgeModule', 'groups, eps', timm_attn_kwargs)
        super().__init__()
        if channels <= 0 or groups <= 0 or channels % groups:
            raise ValueError(f'SgeModule channels ({channels!r}) must be a positive multiple of groups ({groups!r}).')
        if eps < 0:
            raise ValueError(f'SgeModule eps must be >= 0, got {eps!r}.')
        self.channels = channels
        self.groups = groups
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.zeros(1, groups, 1, 1, **dd))
        self.bias = nn.Parameter(torch.ones(1, groups, 1, 1, **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        xg = x.reshape(B, self.groups, C // self.groups, H, W)
        # similarity of each position to its group's mean feature, normalised over the positions
        t = (xg * xg.mean(dim=(3, 4), keepdim=True)).sum(dim=2)  # B x G x H x W
        t = t.reshape(B, self.groups, H * W)
        t = t - t.mean(dim=2, keepdim=True)
        t = t / (t.std(dim=2, keepdim=True) + self.eps)
        t = t.reshape(B, self.groups, H, W) * self.weight + self.bias
        gate = torch.sigmoid(t).to(x.dtype)
        return (xg * gate.unsqueeze(2)).reshape(B, C, H, W)

    def extra_repr(self) -> str:
        return f'{self.channels}, groups={self.groups}, eps={self.eps}'
