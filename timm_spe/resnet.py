""" CIFAR ResNets (the SPE paper's backbones) and ImageNet ResNets with SPE attention

CIFAR models follow the authors' code (github.com/Qrange-group/SPEM, itself a CIFAR adaptation of
the original post-activation ResNet, "v1"): 3x3 stem with 16 channels and no max-pool, three stages
of bottleneck blocks (widths 16/32/64, expansion 4, strides 1/2/2), ``depth = 9n + 2``, projection
shortcut on each stage's first block, attention on the last BN's output before the residual add.
The block is timm's own ``Bottleneck``, so any timm attention layer (``se``, ``eca``, ``cbam``...)
drops in for the paper's baselines.

Paper: `SPEM: Self-adaptive Pooling Enhanced Attention Module for Image Recognition`
    - https://arxiv.org/abs/2208.10322
ResNet: `Deep Residual Learning for Image Recognition` - https://arxiv.org/abs/1512.03385
"""
from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerType, create_classifier, get_act_layer, get_norm_layer
from timm.models import (
    checkpoint_seq,
    generate_default_cfgs,
    list_models,
    model_entrypoint,
    register_model,
)
from timm.models._features import feature_take_indices
from timm.models.resnet import BasicBlock, Bottleneck, ResNet, downsample_conv

from ._helpers import has_module_hooks, is_fx_symbolic_tracing
from .builder import build_spe_model
from .create_attn import get_attn
from .pretrained import CIFAR_MEAN, CIFAR_STD, cifar_cfgs, imagenet_cfg
from .registry import HF_HUB_ORG
from .spe import SpeModule, batch_norm_spe_add_relu, spe_add_relu_

__all__ = [
    'CifarResNet', 'HF_HUB_ORG', 'CIFAR_MEAN', 'CIFAR_STD', 'CIFAR_DEPTHS', 'CIFAR_ATTN_LAYERS', 'IMAGENET_MODELS',
    'model_names',
]


# The variant table: depths of the paper (Table 2) x attention kinds (Table 1 baselines) as
# (attn_layer, attn_kwargs). SE uses the exact C/16 reduction and CBAM a biased MLP with C/16
# rounded up to 8; SRM (timm_spe/srm.py) and SGE (timm_spe/sge.py, 64 groups) are their authors'
# modules: with these, parameter counts equal the paper's Table 1. The package's model list is these two tables and
# IMAGENET_MODELS below, nothing else: a depth added here (9n + 2) is registered in every attention kind, and what
# follows from that (torch.hub entry points, recipes, tests; what to regenerate) is in docs/design_space.md.
CIFAR_DEPTHS = (83, 164, 245, 326)
CIFAR_ATTN_LAYERS: Dict[str, Tuple[Optional[str], Dict[str, Any]]] = {
    '': (None, {}),
    'spe': ('spe', {}),
    'se': ('se', dict(rd_divisor=1)),
    'eca': ('eca', {}),
    'cbam': ('cbam', dict(rd_divisor=8, mlp_bias=True)),
    'srm': ('srm', {}),
    'sge': ('sge', dict(groups=64)),
}


def _stage_blocks(depth: int) -> int:
    if not isinstance(depth, int) or depth < 11 or (depth - 2) % 9:
        raise ValueError(
            f'CIFAR bottleneck ResNet depth must be 9n + 2 with n >= 1 (e.g. 83, 164, 245, 326), got {depth!r}.')
    return (depth - 2) // 9


class SpeBottleneck(Bottleneck):
    """timm's ``Bottleneck`` with an SPE layer and a fused tail. Training: last BN, SPE, residual add and
    ReLU as one autograd function (:func:`~timm_spe.spe.batch_norm_spe_add_relu`) that keeps no extra
    full-size activation for backward. Inference: one in-place ``addcmul`` into the block's own BN output
    and an in-place ReLU, as the plain block's ``x += shortcut``. Same parameters and keys."""

    def _tail_unobserved(self) -> bool:
        """True where the fused tail cannot be told apart from bn3 -> se -> add -> act3 module calls: not
        tracing (it records the module calls), not FX-tracing a training graph (the fused training function would
        hide ``bn3``, ``se`` and ``act3`` from feature extraction), and no module hooks on the three or global
        ones. (An FX eval graph keeps the inference tail, so that it equals eager bit for bit, as timm's model
        tests demand: ``bn3`` and ``act3`` are nodes there, ``se``'s multiply is fused into the residual add.)"""
        return (not torch.jit.is_tracing() and not (self.training and is_fx_symbolic_tracing())
                and not has_module_hooks(self.bn3, self.se, self.act3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.conv2(x)
        x = self.bn2(x)
        x = self.drop_block(x)
        x = self.act2(x)
        x = self.aa(x)
        x = self.conv3(x)
        if not torch.jit.is_scripting():
            if self.drop_path is None and self._tail_unobserved():
                if self.downsample is not None:
                    shortcut = self.downsample(shortcut)
                if self.training:
                    return batch_norm_spe_add_relu(x, shortcut, self.bn3, self.se)
                x = self.bn3(x)
                if not torch.is_grad_enabled():  # inference: x is this block's own temporary, scale it in place
                    return spe_add_relu_(x, shortcut, self.se)
                gate = self.se.gate(x)  # in x's dtype: under autocast an N x C cast, not a full-size one
                if is_fx_symbolic_tracing():  # the same in-place ReLU, as an act3 node for feature extraction
                    return self.act3(torch.addcmul(shortcut, x, gate))
                return torch.relu_(torch.addcmul(shortcut, x, gate))
        # timm's Bottleneck tail, module by module and in its order: every hook fires and sees its own tensors. The
        # add is out of place (timm adds into se's output), so a tensor a hook keeps is never overwritten.
        x = self.se(self.bn3(x))
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act3(x + shortcut)


# FX leaves where SpeBottleneck calls them
torch.fx.wrap('batch_norm_spe_add_relu')


def _is_spe(attn_layer: Any) -> bool:
    cls = getattr(attn_layer, 'func', attn_layer)  # functools.partial
    return isinstance(cls, type) and issubclass(cls, SpeModule)


class CifarResNet(nn.Module):
    """CIFAR bottleneck ResNet (v1, post-activation) with optional channel attention per block.

    Args:
        depth: Network depth, ``9n + 2`` (n bottleneck blocks per stage).
        num_classes: Number of classifier outputs (0 removes the classifier).
        in_chans: Number of input image channels.
        channels: Bottleneck widths of the three stages (outputs are 4x).
        stem_width: Channels of the 3x3 stem convolution.
        global_pool: Global pooling type (timm's ``SelectAdaptivePool2d`` names).
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth rate (linearly increasing over blocks).
        attn_layer: Attention layer name or class (``'spe'``, ``'se'``, ``'eca'``, ``'cbam'``...).
        attn_kwargs: Extra arguments for the attention layer (e.g. ``formulation='paper'``).
        block_args: Extra arguments for timm's ``Bottleneck`` (``attn_layer`` may be given here too).
        act_layer: Activation layer, a class or a timm name (``'relu'``, ``'gelu'``...), as timm's ResNet takes.
        norm_layer: Normalization layer, a class or a timm name.
    """

    def __init__(
            self,
            depth: int = 164,
            num_classes: int = 10,
            in_chans: int = 3,
            channels: Tuple[int, ...] = (16, 32, 64),
            stem_width: int = 16,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            attn_layer: LayerType = None,
            attn_kwargs: Optional[Dict[str, Any]] = None,
            block_args: Optional[Dict[str, Any]] = None,
            act_layer: LayerType = nn.ReLU,
            norm_layer: LayerType = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_blocks = _stage_blocks(depth)
        act_layer = get_act_layer(act_layer)
        norm_layer = get_norm_layer(norm_layer)
        block_args = dict(block_args or {})
        attn_layer = block_args.pop('attn_layer', attn_layer)
        attn_layer = get_attn(attn_layer)
        if attn_kwargs:
            if attn_layer is None:
                raise ValueError(f'attn_kwargs={attn_kwargs} given but the model has no attn_layer.')
            attn_layer = partial(attn_layer, **attn_kwargs)
        block_cls = SpeBottleneck if _is_spe(attn_layer) and act_layer is nn.ReLU else Bottleneck
        self.depth = depth
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(in_chans, stem_width, kernel_size=3, padding=1, bias=False, **dd)
        self.bn1 = norm_layer(stem_width, **dd)
        self.act1 = act_layer(inplace=True)
        self.feature_info = [dict(num_chs=stem_width, reduction=1, module='act1')]

        inplanes = stem_width
        net_stride = 1
        total_blocks = num_blocks * len(channels)
        block_idx = 0
        for stage_idx, planes in enumerate(channels):
            stride = 1 if stage_idx == 0 else 2
            net_stride *= stride
            outplanes = planes * Bottleneck.expansion
            blocks = []
            for i in range(num_blocks):
                dpr = drop_path_rate * block_idx / max(total_blocks - 1, 1)
                downsample = None
                if i == 0 and (stride != 1 or inplanes != outplanes):
                    downsample = downsample_conv(inplanes, outplanes, 1, stride=stride, norm_layer=norm_layer, **dd)
                blocks.append(block_cls(
                    inplanes,
                    planes,
                    stride=stride if i == 0 else 1,
                    downsample=downsample,
                    act_layer=act_layer,
                    norm_layer=norm_layer,
                    attn_layer=attn_layer,
                    drop_path=DropPath(dpr) if dpr > 0. else None,
                    **block_args,
                    **dd,
                ))
                inplanes = outplanes
                block_idx += 1
            stage_name = f'layer{stage_idx + 1}'
            self.add_module(stage_name, nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=outplanes, reduction=net_stride, module=stage_name))

        self.num_features = inplanes
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()  # 2x for 'catavgmax'
        self.init_weights()

    @torch.jit.ignore
    def init_weights(self) -> None:
        """Authors' init: conv ~ N(0, sqrt(2 / (k * k * out))); BN weight 1, bias 0; SPE per its own reset."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, str]:
        return dict(stem=r'^conv1|bn1', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New classifier (0: none) and pooling (None keeps the current one) on the model's device and dtype, in
        its train/eval mode: the contract timm 1.0.31's ResNet follows and its model tests check."""
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        first = next(self.parameters(), None)
        dd = {} if first is None else {'device': first.device, 'dtype': first.dtype}
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that returns intermediates (index 0: stem, 1-3: stages).

        Args:
            x: Input image tensor.
            indices: Take last n features if int, all if None, select matching indices if sequence.
            norm: Unused (no final norm), kept for timm API compatibility.
            stop_early: Stop iterating over stages when last desired intermediate hit.
            output_fmt: Shape of intermediate feature outputs (only 'NCHW').
            intermediates_only: Only return intermediate features.
        """
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(4, indices)

        x = self.act1(self.bn1(self.conv1(x)))
        if 0 in take_indices:
            intermediates.append(x)

        stages = [self.layer1, self.layer2, self.layer3]
        if stop_early:
            stages = stages[:max_index]
        for feat_idx, stage in enumerate(stages, start=1):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(x)

        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Prune stages (and the head) not required for the given intermediates."""
        take_indices, max_index = feature_take_indices(4, indices)
        for name in ('layer1', 'layer2', 'layer3')[max_index:]:
            setattr(self, name, nn.Sequential())  # empty, not Identity: checkpoint_seq(flatten=True) iterates it
        if max_index < 3:  # features end at the last kept tap; the head, sized for the last stage, goes too
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or max_index < 3:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq([self.layer1, self.layer2, self.layer3], x, flatten=True)
        else:
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def _create_cifar_resnet(variant: str, pretrained: bool = False, **kwargs) -> CifarResNet:
    return build_spe_model(CifarResNet, variant, pretrained, feature_cfg=dict(out_indices=(0, 1, 2, 3)), **kwargs)


def _create_resnet(variant: str, pretrained: bool = False, **kwargs) -> ResNet:
    return build_spe_model(ResNet, variant, pretrained, **kwargs)


def cifar_model_name(depth: int, attn: str = '') -> str:
    return f'resnet{depth}' + (f'_{attn}' if attn else '')


_CIFAR_VARIANTS: Dict[str, Dict[str, Any]] = {
    cifar_model_name(depth, attn): dict(depth=depth, attn_layer=attn_layer, attn_kwargs=attn_kwargs)
    for depth in CIFAR_DEPTHS for attn, (attn_layer, attn_kwargs) in CIFAR_ATTN_LAYERS.items()
}

# ImageNet-style SPE variants of timm's own ResNet (architecture only, no weights).
_IMAGENET_VARIANTS: Dict[str, Dict[str, Any]] = {
    'resnet18_spe': dict(block=BasicBlock, layers=(2, 2, 2, 2)),
    'resnet50_spe': dict(block=Bottleneck, layers=(3, 4, 6, 3)),
    'resnet101_spe': dict(block=Bottleneck, layers=(3, 4, 23, 3)),
}
IMAGENET_MODELS: Tuple[str, ...] = tuple(_IMAGENET_VARIANTS)  # model_names(): these and CIFAR_DEPTHS x CIFAR_ATTN_LAYERS

default_cfgs = generate_default_cfgs({
    **{k: v for name in _CIFAR_VARIANTS for k, v in cifar_cfgs(name).items()},
    **{f'{name}.untrained': imagenet_cfg() for name in _IMAGENET_VARIANTS},
})


def _register_cifar(name: str, model_args: Dict[str, Any]) -> None:
    def _entrypoint(pretrained: bool = False, **kwargs) -> CifarResNet:
        return _create_cifar_resnet(name, pretrained, **dict(model_args, **kwargs))

    attn = model_args['attn_layer']
    _entrypoint.__name__ = _entrypoint.__qualname__ = name
    _entrypoint.__doc__ = (
        f"ResNet-{model_args['depth']} (CIFAR, bottleneck)" + (f' with {attn.upper()} attention.' if attn else '.'))
    register_model(_entrypoint)
    globals()[name] = _entrypoint


def _register_imagenet(name: str, model_args: Dict[str, Any]) -> None:
    def _entrypoint(pretrained: bool = False, **kwargs) -> ResNet:
        return _create_resnet(name, pretrained, **dict(model_args, block_args=dict(attn_layer=SpeModule), **kwargs))

    _entrypoint.__name__ = _entrypoint.__qualname__ = name
    _entrypoint.__doc__ = f'timm ResNet ({name[:-4]}) with SPE attention in every block.'
    register_model(_entrypoint)
    globals()[name] = _entrypoint


for _name, _args in _CIFAR_VARIANTS.items():
    _register_cifar(_name, _args)
for _name, _args in _IMAGENET_VARIANTS.items():
    _register_imagenet(_name, _args)


def model_names() -> List[str]:
    """Every model this package registers with timm, in ``timm.list_models`` order, read from timm's registry (the
    models whose entry point is defined in ``timm_spe``): ``hubconf.py`` makes one torch.hub entry point of each.

    ``timm.list_models(module=...)`` cannot tell them apart: timm files them under the last part of their module's
    name, ``'resnet'``, with its own ResNets."""
    return [name for name in list_models() if model_entrypoint(name).__module__.split('.')[0] == __name__.split('.')[0]]
