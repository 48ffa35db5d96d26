""" Evaluate a model on a CIFAR test split: top-1 / top-5 / loss, as quoted by the model cards

The split is an image folder (``<dir>/<class>/*``) or torchvision's CIFAR files (``cifar-10-batches-py`` /
``cifar-100-python`` in ``<dir>``). Preprocessing comes from the model's own pretrained_cfg via timm's
``resolve_data_config`` / ``create_transform``.

A wrong number is worse than none, so the split is checked before anything is scored:

* class folders are mapped to the model's outputs by *name* (``timm_spe.labels.label_names_for``: the
  pretrained_cfg's ``label_names``, else the CIFAR-10 / CIFAR-100 names), never by their sorted order;
  unknown folder names are refused, and so are missing classes unless ``allow_class_subset``;
* a flat folder (images directly in ``<dir>``) and split folders (``<dir>/train/<class>/*``, ``<dir>/test/...``)
  are refused;
* every image is decoded first: unreadable ones are refused by name (timm's dataset would silently
  substitute the next image, of another class), or skipped and counted with ``skip_bad_images``.
"""
import datetime
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_dataset, create_transform, resolve_data_config
from timm.data.readers.img_extensions import get_img_extensions
from tqdm import tqdm

from .labels import label_names_for, num_outputs

__all__ = ['EvalDataError', 'scan_image_folder', 'find_bad_images', 'open_test_split', 'balanced_subset', 'evaluate']

PathLike = Union[str, Path]
_SPLIT_NAMES = {'train', 'test', 'val', 'valid', 'validation', 'eval'}
_SHOW = 5  # names quoted in a message


# timm dataset names of torchvision's CIFAR test sets and the folder torchvision extracts each into
TORCHVISION_TEST_SETS = {'torch/cifar10': 'cifar-10-batches-py', 'torch/cifar100': 'cifar-100-python'}


class EvalDataError(ValueError):
    """The data given to ``evaluate`` cannot be scored correctly as it is (the message says why and the fix)."""


def _quote(names: Sequence[str], show: int = _SHOW) -> str:
    shown = ', '.join(str(n) for n in names[:show])
    return shown + (f' ... ({len(names)} in all)' if len(names) > show else '')


def scan_image_folder(root: PathLike) -> Dict[str, List[Path]]:
    """``{class folder name: its images}`` of an image folder that is exactly ``<root>/<class>/<image>``.

    Image files are those timm's folder reader reads (by extension); hidden folders are ignored, as timm's
    reader skips them. Raises ``EvalDataError`` for images directly in ``root`` (a flat folder), and for
    images below a class folder's sub-folders (split folders such as ``<root>/train/<class>/``).
    """
    root = Path(root)
    exts = get_img_extensions(as_set=True)

    def images_in(folder: Path) -> List[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in exts)

    loose = images_in(root)
    if loose:
        raise EvalDataError(
            f"'{root}' has {len(loose)} images directly in it ({_quote([p.name for p in loose])}): a flat folder has "
            f"no labels. Put each class's images in a folder named as the class: <dir>/<class>/*.jpg.")
    classes: Dict[str, List[Path]] = {}
    nested: Dict[str, List[str]] = {}  # class folder -> its sub-folders that hold images
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith('.')):
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
            here = Path(dirpath)
            if here != folder and any(os.path.splitext(f)[1].lower() in exts for f in filenames):
                nested.setdefault(folder.name, []).append(here.relative_to(folder).as_posix())
        classes[folder.name] = images_in(folder)
    if nested:
        tops = sorted(nested)
        inner = sorted({d.split('/')[0] for ds in nested.values() for d in ds})
        if set(tops) & _SPLIT_NAMES or not any(classes[t] for t in tops):
            raise EvalDataError(
                f"'{root}' holds split folders ({', '.join(t + '/' for t in tops)}) with class folders inside "
                f"({_quote(inner)}): scoring it would mix the splits. Give one split, e.g. --data-dir "
                f"{root / (('test' if 'test' in tops else tops[0]))}.")
        where = [f'{t}/{d}/' for t in tops for d in nested[t]]
        raise EvalDataError(
            f"'{root}' has images in sub-folders of class folders ({_quote(where)}): eval needs exactly "
            f"<dir>/<class>/*.jpg; move those images into their class folder or give the right --data-dir.")
    classes = {name: images for name, images in classes.items() if images}
    if not classes:
        raise EvalDataError(f"'{root}' has no images in <class>/ sub-folders.")
    return classes


def _class_map(found: Sequence[str], label_names: Sequence[str], where: str,
               allow_class_subset: bool) -> Dict[str, int]:
    """``{class name in the data: model output index}``: every name must be one of the model's."""
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(found) - set(index))
    if unknown:
        raise EvalDataError(
            f"{where} has classes the model does not have: {_quote(unknown)}. The model's "
            f"{len(label_names)} classes are {_quote(list(label_names), 10)}: name the class folders so "
            f"(they are matched by name, never by sorted order), or evaluate a model of this dataset.")
    missing = [n for n in label_names if n not in set(found)]
    if missing and not allow_class_subset:
        raise EvalDataError(
            f"{where} has {len(label_names) - len(missing)} of the model's {len(label_names)} classes "
            f"(missing: {_quote(missing)}): give the complete test split, or pass --allow-class-subset "
            f"to score only these classes (the JSON records which).")
    return {name: index[name] for name in found}


def find_bad_images(paths: Sequence[PathLike]) -> List[Tuple[Path, str]]:
    """``(path, reason)`` of every image in ``paths`` that PIL cannot fully decode."""
    bad = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.load()
        except Exception as e:  # noqa: BLE001 - any failure to decode makes the image unusable
            bad.append((Path(path), f'{type(e).__name__}: {e}'.replace(f" '{path}'", '')))
    return bad


def open_test_split(
        data_dir: PathLike,
        transform=None,
        label_names: Optional[Sequence[str]] = None,
        allow_class_subset: bool = False,
        skip_bad_images: bool = False,
        dataset: Optional[str] = None,
        download: bool = False,
) -> torch.utils.data.Dataset:
    """The test split in ``data_dir`` as a dataset with targets in the model's label order.

    ``label_names`` are the model's class names in output order (required for an image folder). The
    returned dataset has ``split_info``: ``classes_evaluated`` (names, in label order), ``class_subset``,
    ``skipped_images`` and ``skipped_image_files``. ``dataset`` (``torch/cifar10`` or ``torch/cifar100``) reads
    only torchvision's files of that dataset in ``data_dir``, downloading them first with ``download``.
    """
    root = Path(data_dir)
    torchvision_sets = TORCHVISION_TEST_SETS
    if dataset is not None:
        if dataset not in TORCHVISION_TEST_SETS:
            raise EvalDataError(f"--dataset {dataset!r} is not supported: give {' or '.join(TORCHVISION_TEST_SETS)}, "
                                f"or no --dataset for an image folder.")
        torchvision_sets = {dataset: TORCHVISION_TEST_SETS[dataset]}
        if not (root / torchvision_sets[dataset]).is_dir():
            if not download:
                raise EvalDataError(f"no {torchvision_sets[dataset]} in '{root}': pass --download, or put torchvision's "
                                    f"extracted {torchvision_sets[dataset]} folder there.")
            root.mkdir(parents=True, exist_ok=True)
            try:
                create_dataset(dataset, root=str(root), split='test', download=True)
            except (OSError, RuntimeError) as e:  # URLError is an OSError
                raise EvalDataError(f"could not download {dataset} into '{root}' ({type(e).__name__}): without network, "
                                    f"put torchvision's extracted {torchvision_sets[dataset]} folder there.") from e
    if not root.is_dir():
        raise FileNotFoundError(f"--data-dir '{root}' is not a folder (give the test split: <dir>/<class>/*.jpg, "
                                f"or a folder holding torchvision's cifar-10-batches-py / cifar-100-python).")
    for name, folder in torchvision_sets.items():
        if (root / folder).is_dir():
            ds = create_dataset(name, root=str(root), split='test', download=False)
            ds.transform = transform
            found = list(getattr(ds, 'classes', None) or [])
            evaluated = found
            if found and label_names is not None:  # torchvision's names from the files' meta data
                mapping = _class_map(found, label_names, f"'{root / folder}'", allow_class_subset)
                ds.targets = [mapping[found[t]] for t in ds.targets]
                evaluated = sorted(found, key=mapping.get)
            ds.split_info = {'classes_evaluated': evaluated, 'class_subset': len(evaluated) < len(label_names or []),
                             'skipped_images': 0, 'skipped_image_files': []}
            return ds
    if label_names is None:
        raise EvalDataError(f"'{root}' is an image folder: give the model's class names (label_names) to map "
                            f"its class folders to the model's outputs.")
    classes = scan_image_folder(root)
    mapping = _class_map(list(classes), label_names, f"'{root}'", allow_class_subset)
    images = [p for ps in classes.values() for p in ps]
    bad = find_bad_images(images)
    if bad and not skip_bad_images:
        shown = '; '.join(f'{p.relative_to(root).as_posix()} ({why})' for p, why in bad[:_SHOW])
        raise EvalDataError(
            f"{len(bad)} of {len(images)} images in '{root}' cannot be read: {shown}"
            f"{' ...' if len(bad) > _SHOW else ''}. Fix or remove them, or pass --skip-bad-images to leave them "
            f"out (the JSON records how many).")
    ds = create_dataset('', root=str(root), class_map=mapping)
    bad_files = {str(p) for p, _ in bad}
    ds.reader.samples = [s for s in ds.reader.samples if str(s[0]) not in bad_files]
    if {str(s[0]) for s in ds.reader.samples} != {str(p) for p in images} - bad_files:
        raise RuntimeError(f"timm's folder reader found other images in '{root}' than the check did.")
    ds.transform = transform
    ds.split_info = {
        'classes_evaluated': sorted(mapping, key=mapping.get),
        'class_subset': len(mapping) < len(label_names),
        'skipped_images': len(bad),
        'skipped_image_files': [p.relative_to(root).as_posix() for p, _ in bad],
    }
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
        label_names: Optional[Sequence[str]] = None,
        allow_class_subset: bool = False,
        skip_bad_images: bool = False,
        dataset: Optional[str] = None,
        download: bool = False,
) -> Dict[str, Any]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of ``model`` on the test split in ``data_dir``.

    Class folders are matched to the model's outputs by name: ``label_names`` (default: the model's, see
    ``timm_spe.labels.label_names_for``). ``allow_class_subset`` scores a split holding only some of the
    classes (against all outputs, with their true indices); ``skip_bad_images`` leaves out unreadable images
    instead of refusing. Both are recorded in the result. ``dataset``/``download``: see :func:`open_test_split`.
    """
    if limit is not None and limit <= 0:
        raise ValueError(f'--limit must be positive, got {limit}.')
    n_out = num_outputs(model)
    label_names = tuple(label_names) if label_names is not None else label_names_for(model)
    if label_names is None:
        raise EvalDataError(
            f"the model has {n_out} classes and no class names (pretrained_cfg label_names; CIFAR-10/100 names are "
            f"known for 10/100 classes): cannot tell which folder is which class.")
    if n_out is not None and len(label_names) != n_out:
        raise EvalDataError(f'{len(label_names)} label names for a model of {n_out} classes.')
    model = model.eval().to(device)
    config = resolve_data_config(model=model)
    ds = open_test_split(data_dir, create_transform(**config, is_training=False), label_names=label_names,
                         allow_class_subset=allow_class_subset, skip_bad_images=skip_bad_images, dataset=dataset,
                         download=download)
    split_info = ds.split_info
    n_total = len(ds)
    if limit is not None:
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
        finite = torch.isfinite(logits).all(dim=-1)
        if not bool(finite.all()):
            raise ValueError(
                f'the model gave non-finite logits (NaN or inf) for {int((~finite).sum())} of the {y.numel()} images '
                f'of batch {n // batch_size + 1}: no accuracy is reported. Its weights may hold NaN/inf (a diverged '
                f'run), or the dtype overflowed (run in float32: drop --amp).')
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
        'label_names': list(label_names),
        'classes_evaluated': list(split_info['classes_evaluated']),
        'class_subset': bool(split_info['class_subset']),
        'skipped_images': split_info['skipped_images'],
        'skipped_image_files': split_info['skipped_image_files'],
        'data': str(Path(data_dir).resolve()),
        'data_config': {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()},
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'command': ' '.join(sys.argv),
        'torch': torch.__version__,
    }
