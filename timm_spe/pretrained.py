""" Pretrained configs of the models, where a shipped tag's weights are, and runtime registration of new tags

The layer above :mod:`timm_spe.registry` (the table): it turns a table entry into the ``pretrained_cfg`` timm keeps
for ``'<model>.<tag>'`` (input size, mean/std, label names, and the weights' ``file`` or ``hf_hub_id``), which
:mod:`timm_spe.resnet` hands to ``generate_default_cfgs``; :func:`register_pretrained` adds a tag to timm's registry
at runtime. Like timm's ``_pretrained.py`` + ``_registry.py``: data and lookups, no download, no model code.
"""
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional

from timm.models import PretrainedCfg
from timm.models import _registry as reg

from ._paths import HUB_CARDS
from .labels import CIFAR10_LABELS, CIFAR100_LABELS
from .registry import PAPER_TAGS, PRETRAINED_TAGS, SAFE_WEIGHTS_NAME, PathLike, pretrained_entry

__all__ = [
    'CIFAR_MEAN', 'CIFAR_STD', 'cifar_cfg', 'imagenet_cfg', 'tag_cfg', 'cifar_cfgs', 'weights_file',
    'packaged_weights_file', 'clone_weights_file', 'register_pretrained',
]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


def cifar_cfg(**kwargs) -> Dict[str, Any]:
    """CIFAR pretrained config: 32x32 input, CIFAR mean/std, no resize or crop."""
    return {
        'url': '', 'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (8, 8),
        'crop_pct': 1.0, 'interpolation': 'bilinear', 'fixed_input_size': False,
        'mean': CIFAR_MEAN, 'std': CIFAR_STD, 'first_conv': 'conv1', 'classifier': 'fc',
        'license': 'apache-2.0', 'paper_ids': 'arXiv:2208.10322',
        **kwargs,
    }


def imagenet_cfg(**kwargs) -> Dict[str, Any]:
    """ImageNet config for SPE variants of timm's ResNet (no weights)."""
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'mean': (0.485, 0.456, 0.406),
        'std': (0.229, 0.224, 0.225), 'first_conv': 'conv1', 'classifier': 'fc', 'license': 'apache-2.0',
        **kwargs,
    }


def packaged_weights_file(model_tag: str) -> Optional[Path]:
    """The package-data copy of a shipped tag's weights, if this install has it."""
    try:
        f = resources.files('timm_spe') / 'weights' / f'{model_tag}.safetensors'
    except (ModuleNotFoundError, TypeError):  # pragma: no cover
        return None
    return Path(str(f)) if f.is_file() else None


def clone_weights_file(model_tag: str) -> Optional[Path]:
    """``hub_cards/<model>.<tag>/model.safetensors`` of a git clone (editable install), if present."""
    f = HUB_CARDS / model_tag / SAFE_WEIGHTS_NAME
    return f if f.is_file() else None


def weights_file(model_tag: str) -> Optional[Path]:
    """Where a shipped tag's weights are on this machine: package data, else the clone's hub_cards/ folder."""
    entry = pretrained_entry(model_tag)
    if not entry or not entry.get('shipped'):
        return None
    return packaged_weights_file(model_tag) or clone_weights_file(model_tag)


def tag_cfg(model_name: str, tag: str) -> Dict[str, Any]:
    """The pretrained cfg of ``<model>.<tag>``: weights (package file or Hub repo) only if the registry records them."""
    model_tag = f'{model_name}.{tag}'
    entry = pretrained_entry(model_tag)
    num_classes = entry['num_classes'] if entry else PAPER_TAGS.get(tag, 10)
    where: Dict[str, Any] = {}
    if entry and entry.get('file'):
        where['file'] = entry['file']
    elif entry and entry.get('shipped'):  # package data; in a clone hub_cards/; else where the wheel would put it
        where['file'] = str(weights_file(model_tag) or resources.files('timm_spe') / 'weights' / f'{model_tag}.safetensors')
    if entry and entry.get('hf_hub_id'):
        where['hf_hub_id'] = entry['hf_hub_id']
    labels = {10: CIFAR10_LABELS, 100: CIFAR100_LABELS}.get(num_classes)
    return cifar_cfg(num_classes=num_classes, **({'label_names': list(labels)} if labels else {}), **where)


def cifar_cfgs(model_name: str) -> Dict[str, Dict[str, Any]]:
    """Tags with weights first (registry order: the first is the default tag), then the paper-schedule tags
    (registered for their config, not listed by ``timm.list_pretrained`` until they have weights)."""
    tags = [t.split('.', 1)[1] for t in PRETRAINED_TAGS if t.split('.', 1)[0] == model_name]
    tags += [t for t in PAPER_TAGS if t not in tags]
    return {f'{model_name}.{tag}': tag_cfg(model_name, tag) for tag in tags}


def register_pretrained(model_tag: str, sha256: str, num_classes: int, hf_hub_id: Optional[str] = None,
                        file: Optional[PathLike] = None, default: bool = False) -> None:
    """Record weights for ``'<model>.<tag>'`` at runtime (e.g. a tag you published to your own organisation).

    Afterwards ``timm.create_model('<model>.<tag>', pretrained=True)`` downloads ``hf_hub_id`` (or reads
    ``file``), checks the sha256 and loads it, and ``timm.list_pretrained`` lists it. ``default`` makes it the
    model's default tag.
    """
    if not hf_hub_id and not file:
        raise ValueError('register_pretrained needs hf_hub_id or file.')
    variant, _, tag = model_tag.partition('.')
    if not tag or variant not in reg._model_entrypoints:
        raise ValueError(f"'{model_tag}' is not '<registered model>.<tag>'.")
    entry = {'sha256': sha256, 'num_classes': int(num_classes)}
    if hf_hub_id:
        entry['hf_hub_id'] = hf_hub_id
    if file:
        entry['file'] = str(file)
    PRETRAINED_TAGS[model_tag] = entry
    cfg = replace(PretrainedCfg(**tag_cfg(variant, tag)), architecture=variant, tag=tag)
    reg._model_pretrained_cfgs[model_tag] = cfg
    reg._model_has_pretrained.add(model_tag)
    tags: List[str] = reg._model_with_tags[variant]
    if model_tag in tags:
        tags.remove(model_tag)
    if default:
        tags.insert(0, model_tag)
        reg._model_pretrained_cfgs[variant] = cfg
        reg._model_has_pretrained.add(variant)
    else:
        tags.append(model_tag)
