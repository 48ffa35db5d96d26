""" timm-spe: SPE attention (arXiv 2208.10322) for timm

``import timm_spe`` registers the CIFAR ResNet family (``resnet164_spe`` ...) and ImageNet-style
SPE ResNets with timm, and makes ``attn_layer='spe'`` resolvable by timm's attention factory.
"""
from .config import cpu_kernels_enabled, set_cpu_kernels, set_triton_kernels, triton_kernels_enabled
from .create_attn import SPE_ATTN_LAYERS, get_attn, register_attn_layers
from .pretrained import register_pretrained
from .sge import SgeModule
from .spe import FORMULATIONS, REWEIGHTS, SpeModule, set_auto_penalty, spe_penalty
from .srm import SrmModule
from .transforms import PAD_CROP_MODE, register_train_crop_modes
from .version import __version__

register_attn_layers()
register_train_crop_modes()

from .resnet import CIFAR_DEPTHS, CIFAR_MEAN, CIFAR_STD, HF_HUB_ORG, CifarResNet, model_names  # noqa: E402 (registers models)

__all__ = [
    '__version__', 'SpeModule', 'SrmModule', 'SgeModule', 'FORMULATIONS', 'REWEIGHTS', 'spe_penalty', 'set_auto_penalty', 'set_cpu_kernels', 'cpu_kernels_enabled',
    'set_triton_kernels', 'triton_kernels_enabled',
    'SPE_ATTN_LAYERS',
    'get_attn', 'register_attn_layers', 'PAD_CROP_MODE', 'register_train_crop_modes', 'CifarResNet', 'CIFAR_DEPTHS', 'CIFAR_MEAN', 'CIFAR_STD', 'HF_HUB_ORG',
    'model_names', 'register_pretrained',
]
