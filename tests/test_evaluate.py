"""timm_spe.evaluate: metrics against a hand count, image folders and torchvision's CIFAR files."""
import numpy as np
import pytest
import torch
from PIL import Image

import timm
import timm_spe  # noqa: F401
from timm_spe.evaluate import balanced_subset, evaluate, open_test_split

CLASSES = ['airplane', 'automobile', 'bird']


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (tmp_path / c).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / c / f'{i}.png')
    return tmp_path


class Oracle(torch.nn.Module):
    """Answers by a fixed rule, so the expected metrics can be counted by hand."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.pretrained_cfg = timm.create_model('resnet83_spe').pretrained_cfg
        self.i = 0

    def forward(self, x):
        out = self.logits[self.i:self.i + x.shape[0]]
        self.i += x.shape[0]
        return out


def test_metrics_match_hand_count(folder):
    # 12 images in class order 0,0,0,0,1,1,1,1,2,2,2,2 ; 10 classes of logits
    logits = torch.zeros(12, 10)
    for i, label in enumerate([0] * 4 + [1] * 4 + [2] * 4):
        ranking = [label] if i % 2 == 0 else [9, 8, 7, 6, 5, label] if i % 3 else [9, label]
        for rank, cls in enumerate(ranking):
            logits[i, cls] = 10. - rank
    r = evaluate(Oracle(logits), folder, batch_size=5, progress=False)
    top1 = sum(i % 2 == 0 for i in range(12)) / 12 * 100
    top5 = sum(i % 2 == 0 or i % 3 == 0 for i in range(12)) / 12 * 100
    assert r['num_images'] == 12 and r['top1'] == pytest.approx(top1, abs=1e-3)
    assert r['top5'] == pytest.approx(top5, abs=1e-3)
    ref_loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0] * 4 + [1] * 4 + [2] * 4)).item()
    assert r['loss'] == pytest.approx(ref_loss, abs=1e-4)


def test_balanced_limit(folder):
    targets = [0] * 4 + [1] * 4 + [2] * 4
    assert balanced_subset(targets, 6) == [0, 1, 4, 5, 8, 9]
    assert balanced_subset(targets, 4) == [0, 1, 4, 5]
    r = evaluate(timm.create_model('resnet83_spe'), folder, limit=6, progress=False)
    assert r['num_images'] == 6 and r['num_images_in_split'] == 12


def test_torchvision_cifar_files_are_detected(tmp_path, monkeypatch):
    """A folder holding torchvision's CIFAR files is opened as torch/cifar10 (test split, no download)."""
    import timm_spe.evaluate as ev
    calls = []

    class Fake(torch.utils.data.Dataset):
        targets = [0, 1]

    monkeypatch.setattr(ev, 'create_dataset', lambda *a, **k: calls.append((a, k)) or Fake())
    for folder, name in (('cifar-10-batches-py', 'torch/cifar10'), ('cifar-100-python', 'torch/cifar100')):
        root = tmp_path / name.replace('/', '_')
        (root / folder).mkdir(parents=True)
        ev.open_test_split(root)
        assert calls[-1] == ((name,), dict(root=str(root), split='test', download=False))


def test_bad_inputs(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match='not a folder'):
        open_test_split(tmp_path / 'nope')
    with pytest.raises(ValueError, match='positive'):
        evaluate(timm.create_model('resnet83_spe'), folder, limit=0, progress=False)
    with pytest.raises(ValueError, match='classes'):
        evaluate(timm.create_model('resnet83_spe', num_classes=2), folder, progress=False)
