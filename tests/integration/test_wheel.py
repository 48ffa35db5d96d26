"""The built wheel, installed without the source tree, is complete: CLI, card template and offline weights.

The wheel is built from this checkout (``pip wheel --no-deps --no-build-isolation``) and installed with
``--no-deps`` into a fresh venv that sees this venv's site-packages (torch, timm...) through a ``.pth`` path
line only, so the editable install of the checkout is not active there. Every command runs from an empty
folder with ``HF_HUB_OFFLINE=1`` and a fresh ``HF_HOME``.
"""
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from helpers import ROOT

import timm_spe
from timm_spe.registry import PRETRAINED_TAGS

# 50-80 s on 2 busy cores: build, venv, install, six runs
SHIPPED = [t for t, e in PRETRAINED_TAGS.items() if e.get('shipped')]
DEFAULT = next(t for t in PRETRAINED_TAGS if t.split('.')[0] == 'resnet164_spe')  # the first entry: default tag
TAG = DEFAULT.split('.')[1]


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    work = tmp_path_factory.mktemp('wheel')
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q',
                    '-w', str(work / 'dist'), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next((work / 'dist').glob('timm_spe-*.whl'))
    venv = work / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True, timeout=120)
    py = venv / 'bin' / 'python'
    purelib = subprocess.run([str(py), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                             check=True, capture_output=True, text=True).stdout.strip()
    # this venv's packages as a plain path entry: its .pth files (the editable finder of the checkout) do not run
    Path(purelib, 'main_venv.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
    subprocess.run([sys.executable, '-m', 'pip', '--python', str(py), 'install', '--no-deps', '--no-index', '-q',
                    str(wheel)], check=True, capture_output=True, timeout=300)
    cwd = work / 'elsewhere'
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'PYTHON'))}
    env.update(HF_HOME=str(work / 'hf'), HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1')

    def run(*cmd):
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout

    return {'wheel': wheel, 'venv': venv, 'py': py, 'run': run, 'cwd': cwd, 'purelib': Path(purelib)}


def test_wheel_ships_the_weights_the_card_template_and_the_kernel_sources(installed):
    names = zipfile.ZipFile(installed['wheel']).namelist()
    assert 'timm_spe/templates/hub_card.md' in names
    csrc = ROOT / 'timm_spe' / 'csrc'
    assert {f'timm_spe/csrc/{p.name}' for p in csrc.iterdir()} <= set(names)  # built on first use: header too
    assert {f'timm_spe/weights/{t}.safetensors' for t in SHIPPED} <= set(names)
    assert not any(n.startswith('hub_cards/') for n in names)
    assert 'hubconf.py' not in names  # torch.hub's entry points are the repository's, not the package's


def test_version_publish_and_offline_pretrained_from_the_wheel(installed):
    run, bin_dir = installed['run'], installed['venv'] / 'bin'
    assert run(bin_dir / 'timm-spe', '--version').strip() == f'timm-spe {timm_spe.__version__}'
    out = run(installed['py'], '-c', '''
import json, timm, timm_spe
from timm_spe.registry import sha256_file
m = timm.create_model('resnet164_spe', pretrained=True)
import timm_spe.resnet
ours = set(timm_spe.resnet.default_cfgs)  # the architectures this package registers
listed = [t for t in timm.list_pretrained() if t.split('.')[0] in ours]
print(json.dumps({'module': timm_spe.__file__, 'file': m.pretrained_cfg['file'], 'tag': m.pretrained_cfg['tag'],
                  'sha': sha256_file(m.pretrained_cfg['file']), 'listed': listed,
                  'shas': {t: sha256_file(timm.create_model(t, pretrained=True).pretrained_cfg['file'])
                           for t in listed}}))
''')
    res = json.loads(out.strip().splitlines()[-1])
    assert res['module'].startswith(str(installed['purelib'])) and res['file'].startswith(str(installed['purelib']))
    assert res['tag'] == TAG and res['sha'] == PRETRAINED_TAGS[DEFAULT]['sha256']
    assert set(res['listed']) == set(SHIPPED)  # every shipped tag, the plain control's too, loads offline
    assert res['shas'] == {t: PRETRAINED_TAGS[t]['sha256'] for t in SHIPPED}
    staged = installed['cwd'] / 'staged'
    run(bin_dir / 'timm-spe', 'publish', res['file'], '--model', 'resnet164_spe', '--tag', TAG,
        '--dry-run', '--out', staged)
    card = (staged / 'README.md').read_text()
    assert 'pipeline_tag: image-classification' in card and res['sha'] in card and 'pip install timm-spe' in card
    assert json.loads((staged / 'config.json').read_text())['label_names'][0] == 'airplane'


def test_eval_inspect_and_run_from_the_wheel(installed):
    from PIL import Image

    from timm_spe.labels import CIFAR10_LABELS
    run, bin_dir, cwd = installed['run'], installed['venv'] / 'bin', installed['cwd']
    for c, name in enumerate(CIFAR10_LABELS):
        (cwd / 'test' / name).mkdir(parents=True, exist_ok=True)
        Image.new('RGB', (32, 32), (25 * c, 100, 0)).save(cwd / 'test' / name / '0.png')
    result = json.loads(run(bin_dir / 'timm-spe', 'eval', 'resnet164_spe', '--data-dir', 'test', '--json'))
    assert result['num_images'] == 10 and result['tag'] == TAG
    assert result['checkpoint_sha256'] == PRETRAINED_TAGS[DEFAULT]['sha256']
    out = run(bin_dir / 'timm-spe', 'inspect', 'resnet164_spe', '--plot', 'lambda.png')
    assert '54 SPE blocks' in out and (cwd / 'lambda.png').stat().st_size > 1000
    (cwd / 'script.py').write_text('import sys, timm\nprint(sys.argv[1:], timm.is_model("resnet164_spe"))\n')
    assert run(bin_dir / 'timm-spe', 'run', 'script.py', '-b', '2').strip() == "['-b', '2'] True"
