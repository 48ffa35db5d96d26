""" Evaluate a model on a CIFAR test split: top-1 / top-5 / loss, as quoted by the model cards

The split is an image folder (``<dir>/<class>/*``, classes sorted alphabetically as torchvision's
CIFAR order) or torchvision's CIFAR files (``cifar-10-batches-py`` / ``cifar-100-python`` in
``<dir>``). Preprocessing comes from the model's own pretrained_cfg via timm's
``resolve_data_config`` / ``create_transform``.
"""
import datetime
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from tqdm import tqdm

from timm.data import create_dataset, create_transform, resolve_data_config

__all__ = ['open_test_split', 'balanced_subset', 'evaluate']

PathLike = Union[str, Path]


def open_test_split(data_dir: PathLike, transform=None) -> torch.utils.data.Dataset:
    """The test split in ``data_dir`` as a dataset with ``targets`` (image folder or torchvision CIFAR files)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--data-dir '{root}' is not a folder (give the test split: <dir>/<class>/*.jpg, "
                                f"or a folder holding torchvision's cifar-10-batches-py / cifar-100-python).")
    for name, folder in (('torch/cifar10', 'cifar-10-batches-py'), ('torch/cifar100', 'cifar-100-python')):
        if (root / folder).is_dir():
            ds = create_dataset(name, root=str(root), split='test', download=False)
            ds.transform = transform
            return ds
    ds = create_dataset('', root=str(root))
    if len(ds) == 0:
        raise ValueError(f"'{root}' has no images in <class>/ sub-folders.")
    ds.transform = transform
    return ds


def _targets(ds) -> List[int]:
    if hasattr(ds, 'targets'):  # torchvision CIFAR
        return list(ds.targets)
    samples = getattr(getattr(ds, 'reader', None), 'samples', None)  # timm ImageDataset (folder reader)
    if samples is None:
        raise TypeError(f'cannot read the labels of {type(ds).__name__} to take a balanced --limit subset.')
    return [t for _, t in samples]


def balanced_subset(targets: List[int], limit: int) -> List[int]:
    """The first ``ceil(limit / classes)`` indices of every class, in dataset order, capped at ``limit``."""
    classes = sorted(set(targets))
    per_class = math.ceil(limit / len(classes))
    chosen: List[int] = []
    seen = {c: 0 for c in classes}
    for i, t in enumerate(targets):
        if seen[t] < per_class:
            seen[t] += 1
            chosen.append(i)
    return chosen[:limit]


@torch.no_grad()
def evaluate(
        model: torch.nn.Module,
        data_dir: PathLike,
        batch_size: int = 100,
        limit: Optional[int] = None,
        workers: int = 0,
        device: Union[str, torch.device] = 'cpu',
        progress: bool = True,
) -> Dict[str, Any]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of ``model`` on the test split in ``data_dir``."""
    model = model.eval().to(device)
    config = resolve_data_config(model=model)
    ds = open_test_split(data_dir, create_transform(**config, is_training=False))
    n_total = len(ds)
    if limit is not None:
        if limit <= 0:
            raise ValueError(f'--limit must be positive, got {limit}.')
        ds = torch.utils.data.Subset(ds, balanced_subset(_targets(ds), limit))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
    correct1 = correct5 = 0
    loss_sum = 0.
    n = 0
    for x, y in tqdm(loader, desc='eval', unit='batch', disable=not progress):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        if logits.shape[-1] <= int(y.max()):
            raise ValueError(f'model has {logits.shape[-1]} classes but the data has label {int(y.max())}: '
                             f'wrong model/tag for this dataset?')
        loss_sum += F.cross_entropy(logits, y, reduction='sum').item()
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        correct1 += (top5[:, 0] == y).sum().item()
        correct5 += (top5 == y[:, None]).any(dim=-1).sum().item()
        n += y.numel()
    return {
        'top1': round(100. * correct1 / n, 3),
        'top5': round(100. * correct5 / n, 3),
        'loss': round(loss_sum / n, 5),
        'num_images': n,
        'num_images_in_split': n_total,
        'data': str(Path(data_dir).resolve()),
        'data_config': {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()},
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'command': ' '.join(sys.argv),
        'torch': torch.__version__,
    }
