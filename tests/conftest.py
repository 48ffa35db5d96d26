"""Shared fixtures, one per kind of setup: image folders, a tag registered for one test, an SPE layer with random
parameters, a finished train.py run, small weights (and a corrupt copy), the shipped Hub folders. Helpers that are no fixture are in helpers.py (the repo
root, a minimal staged folder, a random SPE layer), hub_server.py (a local Hub) and compile_check.py; the SPE
reference is benchmarks/spe_reference.py. Unit tests are in unit/, integration tests (all slow) in integration/."""
import json
import os
import sys
from pathlib import Path

# Triton's interpreter for the Triton kernels' tests (unit/test_spe_triton.py) on CPU tensors: Triton reads this when
# it is imported, which importing torch does. Set TRITON_INTERPRET=0 to test them compiled on a GPU.
os.environ.setdefault('TRITON_INTERPRET', '1')

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import timm  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from helpers import ROOT, random_spe_module  # noqa: E402 (tests/ on sys.path first)
from safetensors.torch import save_file  # noqa: E402

from timm_spe.labels import CIFAR10_LABELS  # noqa: E402
from timm_spe.registry import PRETRAINED_TAGS  # noqa: E402


@pytest.fixture()
def make_image_folder(tmp_path):
    """Builds tiny image folders in tmp_path: ``make_image_folder(classes, per_class=2, root=None)`` -> root.

    ``root`` (default ``tmp_path / 'images'``) gets ``<class>/0000.jpg ...``: random 32x32 RGB JPEGs (quality 75,
    as the repo's CIFAR copy), or PNGs with ``ext='.png'``; ``classes`` may hold nested paths ('test/cat').
    """
    def make(classes, per_class=2, root=None, ext='.jpg', size=32, seed=0):
        root = tmp_path / 'images' if root is None else root
        rng = np.random.default_rng(seed)
        for c in classes:
            (root / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
                img.save(root / c / f'{i:04d}{ext}', **({'quality': 75} if ext == '.jpg' else {}))
        return root
    return make


@pytest.fixture()
def register_tag():
    """``register_tag(model_tag, sha256, **kwargs)``: :func:`timm_spe.register_pretrained` for one test; timm's
    pretrained registry and timm_spe's ``PRETRAINED_TAGS`` are restored after it."""
    from timm.models import _registry as reg

    import timm_spe
    saved = (dict(reg._model_pretrained_cfgs), set(reg._model_has_pretrained),
             {k: list(v) for k, v in reg._model_with_tags.items()}, dict(PRETRAINED_TAGS))
    yield timm_spe.register_pretrained
    reg._model_pretrained_cfgs.clear()
    reg._model_pretrained_cfgs.update(saved[0])
    reg._model_has_pretrained.clear()
    reg._model_has_pretrained.update(saved[1])
    for model, tags in saved[2].items():
        reg._model_with_tags[model][:] = tags
    PRETRAINED_TAGS.clear()
    PRETRAINED_TAGS.update(saved[3])


@pytest.fixture()
def cpu_kernels_on():
    """timm_spe's CPU kernels switched on for one test (built on first use), the previous setting back after."""
    import timm_spe
    with timm_spe.set_cpu_kernels(True):
        yield


@pytest.fixture()
def random_spe():
    """``random_spe(channels=6, formulation='official', seed=0, **kwargs)``: :func:`helpers.random_spe_module`."""
    return random_spe_module


@pytest.fixture()
def run_dir(tmp_path):
    """A fake finished train.py run of resnet83_spe (3 of 3 epochs), with a tiny test-image folder. Its
    model_best.pth.tar holds other weights than last.pth.tar: only the final epoch may be staged."""
    data = tmp_path / 'data'
    for c, name in enumerate(CIFAR10_LABELS):  # eval maps class folders to the model's classes by name
        (data / 'test' / name).mkdir(parents=True)
        Image.new('RGB', (32, 32), (25 * c, 0, 0)).save(data / 'test' / name / '0.png')
    run = tmp_path / 'output' / 'resnet83_spe-cifar10_tiny'
    run.mkdir(parents=True)
    (run / 'args.yaml').write_text('model: resnet83_spe\n')
    (run / 'summary.csv').write_text(
        'epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n0,2.0,1.9,20.0,60.0,0.1\n1,1.9,1.8,22.0,61.0,0.05\n'
        'epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n2,1.8,1.85,21.0,62.0,0.0\n')  # resumed once
    torch.manual_seed(0)
    torch.save({'epoch': 2, 'arch': 'resnet83_spe', 'state_dict': timm.create_model('resnet83_spe').state_dict()},
               run / 'last.pth.tar')
    torch.save({'epoch': 1, 'arch': 'resnet83_spe', 'state_dict': timm.create_model('resnet83_spe').state_dict()},
               run / 'model_best.pth.tar')
    (run / 'train.log').write_text(  # epoch 1 on a GPU, epochs 2-3 resumed on a CPU
        'Training with a single process on 1 device (cuda).\nTrain: 0 [   0/2 (  0%)]  Loss: 2.3 (2.3)\n'
        'Test: [   0/1]  Loss: 1.9\nTest: [   1/1]  Loss: 1.9\n'
        'Training with a single process on 1 device (cpu).\nTrain: 1 [   0/2 (  0%)]  Loss: 2.0 (2.0)\n'
        'Test: [   1/1]  Loss: 1.8\nTrain: 2 [   0/2 (  0%)]  Loss: 1.9 (1.9)\nTest: [   1/1]  Loss: 1.85\n')
    recipe = tmp_path / 'recipe.yaml'
    recipe.write_text('# A tiny recipe for the tests.\n# Differences from the paper: 3 epochs.\n' + yaml.safe_dump({
        'model': 'resnet83_spe', 'experiment': 'resnet83_spe-cifar10_tiny', 'output': str(tmp_path / 'output'),
        'data_dir': str(data), 'val_split': 'test', 'epochs': 3, 'batch_size': 128, 'device': 'cpu'}))
    return {'recipe': recipe, 'run': run, 'data': data}


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    """Real weights of a small model, and a truncated copy of them."""
    work = tmp_path_factory.mktemp('weights')
    torch.manual_seed(0)
    good = work / 'good.safetensors'
    save_file(timm.create_model('resnet83_spe').state_dict(), str(good))
    corrupt = work / 'corrupt.safetensors'
    corrupt.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    return {'good': good, 'corrupt': corrupt}


@pytest.fixture(scope='module')
def card_eval():
    default = next(t for t in PRETRAINED_TAGS if t.split('.')[0] == 'resnet164_spe')  # the default tag
    return json.loads((ROOT / 'hub_cards' / default / 'eval.json').read_text())


@pytest.fixture(scope='module', params=list(PRETRAINED_TAGS))
def staged(request):
    """(tag, its hub_cards folder, its eval.json) for every tag of the registry."""
    folder = ROOT / 'hub_cards' / request.param
    return request.param, folder, json.loads((folder / 'eval.json').read_text())
