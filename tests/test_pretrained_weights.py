"""The committed CPU-trained weights (hub_cards/resnet164_spe.cifar10_cpu2h): card, README and accuracy agree.

The accuracy check evaluates the full CIFAR-10 test split of the shared JPEG copy (10,000 images,
~2-3 min on 2 CPU cores) and requires at least the card's number minus 0.5 points.
"""
import json
import tarfile
from pathlib import Path

import pytest

import timm
import timm_spe
from timm_spe.evaluate import evaluate
from timm_spe.hub import sha256_file
from timm_spe.plots import spe_lambdas

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / 'hub_cards' / 'resnet164_spe.cifar10_cpu2h'
CIFAR_TAR = ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'


@pytest.fixture(scope='module')
def card_eval():
    return json.loads((FOLDER / 'eval.json').read_text())


def test_folder_is_complete(card_eval):
    names = {p.name for p in FOLDER.iterdir()}
    assert {'model.safetensors', 'config.json', 'README.md', 'eval.json', 'training_curve.png',
            'spe_lambda.png'} <= names
    assert not any(n.endswith(('.bin', '.pth', '.pth.tar', '.pt')) for n in names)
    card = (FOLDER / 'README.md').read_text()
    assert sha256_file(FOLDER / 'model.safetensors') in card
    assert f"{card_eval['top1']:.2f}" in card and f"{card_eval['top5']:.2f}" in card
    assert 'JPEG q75 copy' in card and card_eval['num_images'] == 10000
    assert json.loads((FOLDER / 'config.json').read_text())['architecture'] == 'resnet164_spe'


def test_readme_quotes_the_card(card_eval):
    readme = (ROOT / 'README.md').read_text()
    row = next(line for line in readme.splitlines() if line.startswith('| `resnet164_spe.cifar10_cpu2h`'))
    assert f"{card_eval['top1']:.2f}" in row and f"{card_eval['top5']:.2f}" in row


def test_is_default_tag_and_loads_from_file():
    m = timm.create_model('resnet164_spe', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(FOLDER / 'model.safetensors')))
    assert m.pretrained_cfg['tag'] == 'cifar10_cpu2h'
    assert len(spe_lambdas(m)) == 54


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_TAR.exists(), reason=f'needs {CIFAR_TAR} (the CIFAR-10 JPEG copy)')
def test_accuracy_on_shared_test_split(card_eval, tmp_path):
    with tarfile.open(CIFAR_TAR) as tar:
        tar.extractall(tmp_path, members=[m for m in tar if '/test/' in m.name or m.name.endswith('/test')],
                       filter='data')
    model = timm.create_model('resnet164_spe', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(FOLDER / 'model.safetensors')))
    result = evaluate(model, tmp_path / 'cifar10-jpeg' / 'test', batch_size=200, progress=False)
    assert result['num_images'] == 10000
    assert result['top1'] >= card_eval['top1'] - 0.5, (result, card_eval)
