""" CIFAR "pad 4 + random crop" for timm's training transforms

The SPE paper (and nearly every CIFAR paper) augments with ``RandomCrop(32, padding=4)`` and a
horizontal flip. timm's ``transforms_imagenet_train`` offers only resizing crops (rrc/rkrc/rkrr).
After ``import timm_spe`` (``device_modules: [timm_spe]`` in a train.py recipe),
``train_crop_mode='pad4'`` builds timm's usual pipeline and swaps only its crop for a zero-padded
random crop; every other mode is delegated to timm untouched.
"""
import functools
import importlib
from typing import Any, Callable

from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms

__all__ = ['PAD_CROP_MODE', 'PAD_CROP_PADDING', 'register_train_crop_modes']

PAD_CROP_MODE = 'pad4'
PAD_CROP_PADDING = 4

# ``timm.data.transforms_factory`` the attribute can be shadowed by a same-named export; look it up
timm_transforms_factory = importlib.import_module('timm.data.transforms_factory')


def _swap_crop(pipeline: transforms.Compose, img_size: Any) -> None:
    first = pipeline.transforms[0] if pipeline.transforms else None
    if not isinstance(first, RandomResizedCropAndInterpolation):
        raise RuntimeError(
            f"train_crop_mode='{PAD_CROP_MODE}' expected timm's training pipeline to start with "
            f"RandomResizedCropAndInterpolation, found {type(first).__name__}: this timm version changed "
            f"transforms_imagenet_train; update timm_spe/transforms.py or use train_crop_mode='rrc'.")
    pipeline.transforms[0] = transforms.RandomCrop(img_size, padding=PAD_CROP_PADDING, fill=0)


def _wrap(transforms_imagenet_train: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(transforms_imagenet_train)
    def wrapper(img_size=224, *args, train_crop_mode=None, **kwargs):
        if train_crop_mode != PAD_CROP_MODE:
            return transforms_imagenet_train(img_size, *args, train_crop_mode=train_crop_mode, **kwargs)
        if kwargs.get('naflex'):
            raise ValueError(f"train_crop_mode='{PAD_CROP_MODE}' does not support NaFlex sequence loading.")
        out = transforms_imagenet_train(img_size, *args, train_crop_mode='rrc', **kwargs)
        _swap_crop(out[0] if isinstance(out, tuple) else out, img_size)
        return out

    wrapper._timm_spe_original = transforms_imagenet_train
    return wrapper


def register_train_crop_modes() -> None:
    """Install the ``'pad4'`` crop mode into timm's transform factory (idempotent)."""
    current = timm_transforms_factory.transforms_imagenet_train
    if not hasattr(current, '_timm_spe_original'):
        timm_transforms_factory.transforms_imagenet_train = _wrap(current)
