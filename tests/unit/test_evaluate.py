"""timm_spe.evaluate: metrics against a hand count, image folders and torchvision's CIFAR files, and the
refusals that keep a wrong number out of eval.json (folders mapped by class name, bad layouts, bad images)."""
from pathlib import Path

import pytest
import timm
import torch
from timm.data import create_dataset, create_transform, resolve_data_config

import timm_spe  # noqa: F401
from timm_spe.evaluate import EvalDataError, balanced_subset, evaluate, open_test_split
from timm_spe.labels import CIFAR10_LABELS, CIFAR100_LABELS, label_names_for

CLASSES = ['airplane', 'automobile', 'bird']


@pytest.fixture()
def folder(make_image_folder):
    """3 of CIFAR-10's 10 classes, 4 images each (scored with --allow-class-subset)."""
    return make_image_folder(CLASSES, per_class=4)


class Oracle(torch.nn.Module):
    """Answers by a fixed rule, so the expected metrics can be counted by hand."""

    def __init__(self, logits, **cfg):
        super().__init__()
        self.logits = logits
        self.pretrained_cfg = {**timm.create_model('resnet83_spe').pretrained_cfg, **cfg}
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
    r = evaluate(Oracle(logits), folder, batch_size=5, progress=False, allow_class_subset=True)
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
    r = evaluate(timm.create_model('resnet83_spe'), folder, limit=6, progress=False, allow_class_subset=True)
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


def _ranked(labels, n_classes=10):
    """Logits that rank the true label first for every image."""
    logits = torch.zeros(len(labels), n_classes)
    logits[torch.arange(len(labels)), torch.tensor(labels)] = 10.
    return logits


def test_canonical_class_names():
    assert len(CIFAR10_LABELS) == 10 and CIFAR10_LABELS[0] == 'airplane' and CIFAR10_LABELS[-1] == 'truck'
    assert len(set(CIFAR100_LABELS)) == 100 and list(CIFAR100_LABELS) == sorted(CIFAR100_LABELS)
    assert CIFAR100_LABELS[:3] == ('apple', 'aquarium_fish', 'baby') and CIFAR100_LABELS[-1] == 'worm'
    assert label_names_for(timm.create_model('resnet83_spe')) == CIFAR10_LABELS
    # the classifier's size wins over a pretrained_cfg that still says 10 classes
    assert label_names_for(timm.create_model('resnet83_spe', num_classes=100)) == CIFAR100_LABELS
    assert label_names_for(timm.create_model('resnet83_spe', num_classes=7)) is None


def test_eval_scores_a_class_subset_with_the_true_class_indices(make_image_folder):
    """cat/dog/truck are classes 3/5/9, not 0/1/2 (the old sorted-folder order)."""
    root = make_image_folder(['cat', 'dog', 'truck'])
    r = evaluate(Oracle(_ranked([3, 3, 5, 5, 9, 9])), root, progress=False, allow_class_subset=True)
    assert r['top1'] == 100. and r['num_images'] == 6
    assert r['class_subset'] is True and r['classes_evaluated'] == ['cat', 'dog', 'truck']
    assert r['label_names'] == list(CIFAR10_LABELS) and r['skipped_images'] == 0


def test_eval_uses_the_pretrained_cfg_label_names(make_image_folder):
    """A model's own label_names (here not alphabetical) decide which folder is which output."""
    root = make_image_folder(['ant', 'cow', 'zebra'])  # read in this order: ant ant cow cow zebra zebra
    oracle = Oracle(_ranked([1, 1, 2, 2, 0, 0], 3), num_classes=3, label_names=('zebra', 'ant', 'cow'))
    r = evaluate(oracle, root, progress=False)
    assert r['top1'] == 100. and r['label_names'] == ['zebra', 'ant', 'cow'] and r['class_subset'] is False


def test_eval_on_a_valid_split_scores_as_timm_folder_dataset(make_image_folder):
    """On a complete, clean CIFAR-10 folder the numbers are those of timm's own folder dataset."""
    root = make_image_folder(CIFAR10_LABELS)
    model = timm.create_model('resnet83_spe').eval()
    r = evaluate(model, root, batch_size=7, progress=False)
    ds = create_dataset('', root=str(root), transform=create_transform(**resolve_data_config(model=model)))
    x, y = zip(*[ds[i] for i in range(len(ds))])
    with torch.no_grad():
        logits = model(torch.stack(x))
    y = torch.tensor(y)
    assert r['num_images'] == 20 and r['top1'] == round(100. * (logits.argmax(-1) == y).float().mean().item(), 3)
    assert r['loss'] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), abs=1e-4)
    assert r['classes_evaluated'] == list(CIFAR10_LABELS) and r['class_subset'] is False
    assert r['skipped_images'] == 0 and r['skipped_image_files'] == []


def test_eval_refuses_a_subset_of_the_classes_unless_allowed(folder):
    with pytest.raises(EvalDataError, match=r"has 3 of the model's 10 classes \(missing: cat, deer, dog, frog, "
                                            r"horse \.\.\. \(7 in all\)\).*--allow-class-subset"):
        evaluate(Oracle(_ranked([0] * 12)), folder, progress=False)


def test_eval_refuses_class_folders_not_named_as_the_model_classes(make_image_folder):
    """Folders 1..10 (or class0..class9) were sorted and scored as classes 0-9; they are not class names."""
    root = make_image_folder([str(i) for i in range(1, 11)], per_class=1)
    with pytest.raises(EvalDataError, match=r"has classes the model does not have: 1, 10, 2, 3, 4 \.\.\. \(10 in "
                                            r"all\)\. The model's 10 classes are airplane, automobile, .*truck: name"):
        evaluate(Oracle(_ranked([0] * 10)), root, progress=False)
    make_image_folder(['airplane', 'unicorn'], per_class=1, root=root.parent / 'mixed')
    with pytest.raises(EvalDataError, match="does not have: unicorn"):
        evaluate(Oracle(_ranked([0] * 2)), root.parent / 'mixed', progress=False, allow_class_subset=True)


def test_eval_refuses_a_flat_folder(make_image_folder, tmp_path):
    root = make_image_folder(['.'], per_class=3)  # images straight in root
    with pytest.raises(EvalDataError, match=r"has 3 images directly in it \(0000\.jpg, 0001\.jpg, 0002\.jpg\): "
                                            r"a flat folder has no labels.*<dir>/<class>/\*\.jpg"):
        evaluate(Oracle(_ranked([0] * 3)), root, progress=False)
    make_image_folder(CIFAR10_LABELS, per_class=1, root=root)  # stray images next to class folders: same refusal
    with pytest.raises(EvalDataError, match='3 images directly in it'):
        evaluate(Oracle(_ranked([0] * 13)), root, progress=False)


def test_eval_refuses_the_dataset_root_with_split_folders(make_image_folder):
    """The CIFAR copy's root (train/<class>, test/<class>) would mix both splits under the same labels."""
    root = make_image_folder([f'{s}/{c}' for s in ('train', 'test') for c in CIFAR10_LABELS], per_class=1)
    with pytest.raises(EvalDataError, match=r"holds split folders \(test/, train/\) with class folders inside "
                                            r"\(airplane, .*mix the splits\. Give one split, e\.g\. --data-dir "
                                            rf"{root}/test"):
        evaluate(Oracle(_ranked([0] * 20)), root, progress=False)
    root = make_image_folder(['cat', 'cat/more'], per_class=1, root=root.parent / 'nested')
    with pytest.raises(EvalDataError, match=r"images in sub-folders of class folders \(cat/more/\)"):
        evaluate(Oracle(_ranked([0] * 2)), root, progress=False, allow_class_subset=True)


def test_eval_refuses_unreadable_images_by_name(make_image_folder):
    """timm's dataset replaces an unreadable image by the next one (of another class at a class boundary)."""
    root = make_image_folder(CIFAR10_LABELS)
    data = (root / 'cat' / '0001.jpg').read_bytes()
    (root / 'cat' / '0001.jpg').write_bytes(data[:len(data) // 2])  # truncated JPEG
    (root / 'truck' / '0000.jpg').write_bytes(b'not a jpeg')
    with pytest.raises(EvalDataError, match=r"2 of 20 images in '.*' cannot be read: cat/0001\.jpg \(OSError: "
                                            r"[^)]+\); truck/0000\.jpg \(UnidentifiedImageError: cannot identify "
                                            r"image file\)\. Fix or remove them, or pass --skip-bad-images"):
        evaluate(Oracle(_ranked([0] * 20)), root, progress=False)
    labels = [i for i in range(10) for _ in range(2)]
    del labels[labels.index(9)], labels[labels.index(3) + 1]
    r = evaluate(Oracle(_ranked(labels)), root, progress=False, skip_bad_images=True)
    assert r['top1'] == 100. and r['num_images'] == 18 and r['num_images_in_split'] == 18
    assert r['skipped_images'] == 2 and r['skipped_image_files'] == ['cat/0001.jpg', 'truck/0000.jpg']


def test_torchvision_cifar_files_of_another_dataset_are_refused(tmp_path, monkeypatch):
    """cifar-100-python files scored by a CIFAR-10 model: the files' class names do not fit."""
    import timm_spe.evaluate as ev

    class Fake(torch.utils.data.Dataset):
        classes = list(CIFAR100_LABELS)
        targets = [0, 1]

    monkeypatch.setattr(ev, 'create_dataset', lambda *a, **k: Fake())
    (tmp_path / 'cifar-100-python').mkdir()
    with pytest.raises(EvalDataError, match=r"cifar-100-python' has classes the model does not have: apple"):
        open_test_split(tmp_path, label_names=CIFAR10_LABELS)
    Fake.classes = list(CIFAR10_LABELS)
    assert open_test_split(tmp_path, label_names=CIFAR10_LABELS).split_info['classes_evaluated'] == list(CIFAR10_LABELS)


def test_eval_reads_a_named_torchvision_dataset_and_downloads_it_only_when_asked(tmp_path, monkeypatch):
    """--dataset torch/cifar10: torchvision's files in --data-dir; missing files are an error naming --download,
    with --download they are fetched first (here: a fake download that creates the folder)."""
    import timm_spe.evaluate as ev
    calls = []

    class Fake(torch.utils.data.Dataset):
        classes = list(CIFAR10_LABELS)
        targets = [0, 1]

    def fake_create_dataset(name, root, split, download):
        calls.append((name, download))
        if download:
            (Path(root) / 'cifar-10-batches-py').mkdir()
        return Fake()

    monkeypatch.setattr(ev, 'create_dataset', fake_create_dataset)
    root = tmp_path / 'cifar10'
    with pytest.raises(EvalDataError, match=r"no cifar-10-batches-py in .*: pass --download, or put torchvision's"):
        open_test_split(root, label_names=CIFAR10_LABELS, dataset='torch/cifar10')
    assert calls == []  # nothing fetched without --download
    ds = open_test_split(root, label_names=CIFAR10_LABELS, dataset='torch/cifar10', download=True)
    assert calls == [('torch/cifar10', True), ('torch/cifar10', False)]
    assert ds.split_info['classes_evaluated'] == list(CIFAR10_LABELS)
    # files of the other CIFAR in the folder are not read as the one asked for
    with pytest.raises(EvalDataError, match='no cifar-100-python'):
        open_test_split(root, label_names=CIFAR100_LABELS, dataset='torch/cifar100')
    with pytest.raises(EvalDataError, match="'torch/mnist' is not supported"):
        open_test_split(root, label_names=CIFAR10_LABELS, dataset='torch/mnist')


def test_a_failed_download_is_a_one_line_error(tmp_path, monkeypatch):
    import urllib.error

    import timm_spe.evaluate as ev

    def offline(*args, **kwargs):
        raise urllib.error.URLError('no route to host')

    monkeypatch.setattr(ev, 'create_dataset', offline)
    with pytest.raises(EvalDataError, match=r"could not download torch/cifar10 .* \(URLError\): without network, put"):
        open_test_split(tmp_path / 'c', label_names=CIFAR10_LABELS, dataset='torch/cifar10', download=True)
