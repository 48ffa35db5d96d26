"""torch.hub: ``hubconf.py`` at the repository root has one entry point per registered model and loads what
``timm.create_model`` loads, the shipped weights hash-checked, also from a fresh copy of the repository.

``torch.hub.list`` / ``help`` (and ``load`` without ``source='local'``) take a GitHub ``owner/name:ref``: here they
find it in a hub cache folder made in tmp_path, ``<owner>_<name>_<ref>``, as torch.hub leaves a download, so nothing
is fetched; only the download itself is not exercised.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from helpers import ROOT

import timm_spe
from timm_spe.registry import PRETRAINED_TAGS, sha256_file

DEFAULT = next(t for t in PRETRAINED_TAGS if t.split('.')[0] == 'resnet164_spe')  # the first entry: default tag
REPO = 'timm-spe-owner/timm-spe:main'  # any owner: torch.hub finds it in the cache below


def _input(n=2):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """torch.hub's cache in tmp_path, with this checkout as the download of ``REPO``."""
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path / 'hub'))
    (tmp_path / 'hub').mkdir()
    (tmp_path / 'hub' / 'timm-spe-owner_timm-spe_main').symlink_to(ROOT, target_is_directory=True)
    return tmp_path / 'hub'


def test_torch_hub_load_gives_the_logits_of_timm_create_model():
    hub_model = torch.hub.load(str(ROOT), 'resnet164_spe', source='local', pretrained=True).eval()
    model = timm.create_model('resnet164_spe', pretrained=True).eval()
    assert hub_model.pretrained_cfg['tag'] == DEFAULT.split('.')[1]
    assert sha256_file(hub_model.pretrained_cfg['file']) == PRETRAINED_TAGS[DEFAULT]['sha256']
    with torch.no_grad():
        torch.testing.assert_close(hub_model(_input()), model(_input()), rtol=0, atol=0)


def test_torch_hub_list_is_every_registered_model_and_nothing_else(hub_cache):
    listed = torch.hub.list(REPO, trust_repo=True, skip_validation=True, verbose=False)
    ours = set(timm_spe.resnet.default_cfgs)  # the architectures this package registers
    # the variant tables of timm_spe/resnet.py: every depth x attention kind (CIFAR), plus the ImageNet SPE ResNets
    depths, attns, imagenet = timm_spe.CIFAR_DEPTHS, timm_spe.resnet.CIFAR_ATTN_LAYERS, timm_spe.resnet.IMAGENET_MODELS
    assert ours == {f'resnet{d}' + (f'_{a}' if a else '') for d in depths for a in attns} | set(imagenet)
    assert len(ours) == len(depths) * len(attns) + len(imagenet)  # no name made twice
    assert sorted(listed) == sorted(timm_spe.model_names()) == sorted(ours)


def test_torch_hub_help_names_the_model_its_tags_and_their_top1(hub_cache):
    doc = torch.hub.help(REPO, 'resnet164_spe', trust_repo=True, skip_validation=True)
    result = json.loads((ROOT / 'hub_cards' / DEFAULT / 'eval.json').read_text())
    assert doc.startswith('resnet164_spe: ResNet-164 (CIFAR, bottleneck) with SPE attention.')
    assert f"  {DEFAULT.split('.')[1]}: 10 classes, {result['top1']:.2f} % top-1 on the {result['data_label']}" in doc
    assert 'No pretrained weights yet' in torch.hub.help(REPO, 'resnet50_spe', trust_repo=True, skip_validation=True)
    assert doc in (ROOT / 'docs' / 'export.md').read_text(), f'docs/export.md shows a stale help text; paste:\n{doc}'


def _load(name, **kwargs):
    return torch.hub.load(str(ROOT), name, source='local', **kwargs)


def test_keyword_arguments_pass_through_to_timm_create_model():
    model = _load('resnet164_spe', pretrained=True, num_classes=100).eval()  # weights, new head
    with torch.no_grad():
        assert model(_input()).shape == (2, 100)
    reference = timm.create_model('resnet164_spe', pretrained=True)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert _load('resnet83_spe', pretrained_cfg='cifar100').num_classes == 100  # another tag's config
    features = _load('resnet83', features_only=True, out_indices=(1, 2))
    assert [f.shape[1] for f in features(_input())] == [64, 128]


def test_an_unknown_entry_point_is_torch_hubs_own_error():
    with pytest.raises(RuntimeError, match='Cannot find callable resnet164_spex in hubconf'):
        torch.hub.load(str(ROOT), 'resnet164_spex', source='local')


def test_a_fresh_copy_of_the_repository_loads_without_timm_spe_installed(tmp_path):
    """What a torch.hub user gets: the repository's files (tracked and new, not ignored: what GitHub's archive of
    this tree holds) in torch.hub's cache, loaded through the GitHub path by a Python that has torch and timm but
    no timm-spe, offline with an empty HF cache. The model comes from the copy, its weights from the copy's
    hub_cards/, hash-checked; the logits are this process's."""
    if not (ROOT / '.git').exists() or shutil.which('git') is None:
        pytest.skip('needs a git checkout (the files of a fresh clone are those git lists)')
    files = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split('\0')
    copy = tmp_path / 'hub' / 'timm-spe-owner_timm-spe_main'
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    # the site-packages of this Python as plain path entries: torch, timm... but not the editable install's finder
    # (a .pth hook, run only by `site`, which -S skips) nor the checkout itself
    paths = [p for p in sys.path if 'site-packages' in p and Path(p).resolve() != ROOT]
    code = f'''
import importlib.util, json, sys, torch
assert importlib.util.find_spec('timm_spe') is None, 'timm_spe is importable before torch.hub.load'
torch.hub.set_dir({str(tmp_path / 'hub')!r})
m = torch.hub.load({REPO!r}, 'resnet164_spe', pretrained=True, trust_repo=True, skip_validation=True).eval()
with torch.no_grad():
    logits = m(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
print(json.dumps({{'module': sys.modules['timm_spe'].__file__, 'file': m.pretrained_cfg['file'],
                  'logits': logits.tolist()}}))
'''
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'PYTHON'))}
    env.update(PYTHONPATH=os.pathsep.join(paths), HF_HOME=str(tmp_path / 'hf'), HF_HUB_OFFLINE='1',
               OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-S', '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(result['module']).resolve().is_relative_to(copy.resolve())
    assert Path(result['file']).resolve() == (copy / 'hub_cards' / DEFAULT / 'model.safetensors').resolve()
    model = timm.create_model('resnet164_spe', pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(result['logits']), model(_input()), rtol=1e-5, atol=1e-5)
