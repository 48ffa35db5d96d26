""" Class names of the models' outputs, in label (logit index) order: the one place they are defined

* CIFAR-10: torchvision's ``CIFAR10.classes`` order, which is the training-label order of the
  dataset and the folder names of the repo's JPEG copy (``<split>/<class>/*.jpg``);
* CIFAR-100: the 100 fine labels of torchvision's ``CIFAR100`` (``meta['fine_label_names']``),
  alphabetical.

``timm-spe eval`` maps image-folder names onto model outputs with these names, and config.json
writing can record them as ``label_names``.
"""
from typing import Optional, Sequence, Tuple

import torch

__all__ = ['CIFAR10_LABELS', 'CIFAR100_LABELS', 'label_names_for', 'num_outputs']

CIFAR10_LABELS: Tuple[str, ...] = (
    'airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')

CIFAR100_LABELS: Tuple[str, ...] = (
    'apple', 'aquarium_fish', 'baby', 'bear', 'beaver', 'bed', 'bee', 'beetle', 'bicycle', 'bottle',
    'bowl', 'boy', 'bridge', 'bus', 'butterfly', 'camel', 'can', 'castle', 'caterpillar', 'cattle',
    'chair', 'chimpanzee', 'clock', 'cloud', 'cockroach', 'couch', 'crab', 'crocodile', 'cup', 'dinosaur',
    'dolphin', 'elephant', 'flatfish', 'forest', 'fox', 'girl', 'hamster', 'house', 'kangaroo', 'keyboard',
    'lamp', 'lawn_mower', 'leopard', 'lion', 'lizard', 'lobster', 'man', 'maple_tree', 'motorcycle', 'mountain',
    'mouse', 'mushroom', 'oak_tree', 'orange', 'orchid', 'otter', 'palm_tree', 'pear', 'pickup_truck', 'pine_tree',
    'plain', 'plate', 'poppy', 'porcupine', 'possum', 'rabbit', 'raccoon', 'ray', 'road', 'rocket',
    'rose', 'sea', 'seal', 'shark', 'shrew', 'skunk', 'skyscraper', 'snail', 'snake', 'spider',
    'squirrel', 'streetcar', 'sunflower', 'sweet_pepper', 'table', 'tank', 'telephone', 'television', 'tiger', 'tractor',
    'train', 'trout', 'tulip', 'turtle', 'wardrobe', 'whale', 'willow_tree', 'wolf', 'woman', 'worm')

_BY_COUNT = {len(CIFAR10_LABELS): CIFAR10_LABELS, len(CIFAR100_LABELS): CIFAR100_LABELS}


def num_outputs(model: torch.nn.Module) -> Optional[int]:
    """The number of classes ``model`` predicts: its ``num_classes`` (what the classifier really has),
    else its pretrained_cfg's (a cfg may still say 10 when the model was built with num_classes=100)."""
    n = getattr(model, 'num_classes', None)
    if n is None:
        n = (getattr(model, 'pretrained_cfg', None) or {}).get('num_classes')
    return int(n) if n is not None else None


def label_names_for(model: torch.nn.Module) -> Optional[Tuple[str, ...]]:
    """The class name of each output of ``model``, in output order, or None if unknown.

    Prefers ``model.pretrained_cfg['label_names']`` (when it has one name per output), else the
    CIFAR-10 / CIFAR-100 names for a 10- / 100-class model.
    """
    n = num_outputs(model)
    names: Optional[Sequence[str]] = (getattr(model, 'pretrained_cfg', None) or {}).get('label_names')
    if names and (n is None or len(names) == n):
        return tuple(names)
    return _BY_COUNT.get(n) if n is not None else None
