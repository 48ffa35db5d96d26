"""The shipped weights in a fresh process (offline) and on the real CIFAR-10 test split."""
import json
import os
import subprocess
import sys
import tarfile

import pytest
import timm
import torch
from helpers import ROOT

from timm_spe.evaluate import evaluate
from timm_spe.registry import PRETRAINED_TAGS

DEFAULT = next(t for t in PRETRAINED_TAGS if t.split('.')[0] == 'resnet164_spe')  # the first entry: default tag
CIFAR_TAR = ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'


@pytest.fixture(scope='module')
def cifar_test_split(tmp_path_factory):
    """The 10,000 test images of the CIFAR-10 JPEG copy, extracted once for every tag."""
    root = tmp_path_factory.mktemp('cifar')
    with tarfile.open(CIFAR_TAR) as tar:
        tar.extractall(root, members=[m for m in tar if '/test/' in m.name or m.name.endswith('/test')], filter='data')
    return root / 'cifar10-jpeg' / 'test'


@pytest.mark.skipif(not CIFAR_TAR.exists(), reason=f'needs {CIFAR_TAR} (the CIFAR-10 JPEG copy)')
def test_accuracy_on_shared_test_split(staged, cifar_test_split):
    """Each shipped file re-evaluated on all 10,000 test images reaches its card's top-1 (within 0.5 points).

    channels_last in batches of 50 (``timm-spe eval --channels-last --batch-size 50``): the same weights and
    arithmetic in another memory layout (float rounding may flip an image or two), about twice as fast on a 2-core
    CPU as contiguous batches of 200 (14 s against 35 s per 1,000 images, measured on one).
    """
    tag, folder, card_eval = staged
    model = timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=dict(file=str(folder / 'model.safetensors')))
    result = evaluate(model.to(memory_format=torch.channels_last), cifar_test_split, batch_size=50, progress=False)
    assert result['num_images'] == 10000
    assert result['top1'] >= card_eval['top1'] - 0.5, (result, card_eval)


def test_every_listed_tag_loads_offline_or_is_recorded_hub_only(tmp_path):
    """In a fresh process with HF_HUB_OFFLINE=1 and an empty HF cache, every shipped tag loads and verifies."""
    shipped = [t for t, e in PRETRAINED_TAGS.items() if e.get('shipped')]
    hub_only = [t for t, e in PRETRAINED_TAGS.items() if not e.get('shipped')]
    assert all(PRETRAINED_TAGS[t].get('hf_hub_id') for t in hub_only), hub_only
    assert all(len(e['sha256']) == 64 for e in PRETRAINED_TAGS.values())
    env = {k: v for k, v in os.environ.items() if not k.startswith('HF_')}
    env.update(HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'), OMP_NUM_THREADS='1')
    code = ('import timm, timm_spe, json, sys\n'
            'for t in json.loads(sys.argv[1]):\n'
            '    m = timm.create_model(t, pretrained=True)\n'
            '    assert m.pretrained_cfg["tag"] == t.split(".")[1]\n'
            'print("ok")\n')
    proc = subprocess.run([sys.executable, '-c', code, json.dumps(shipped)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == 'ok', proc.stderr[-3000:]
    assert not (tmp_path / 'hf').exists()  # nothing was asked of the Hub
