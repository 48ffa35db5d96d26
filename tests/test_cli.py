"""timm-spe command line: eval, inspect, finish-run (the train.py -> card pipeline), errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import timm
import timm_spe  # noqa: F401
from timm_spe.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def run_dir(tmp_path):
    """A fake finished train.py run of resnet83_spe, with a tiny test-image folder."""
    data = tmp_path / 'data'
    for c in range(10):
        (data / 'test' / f'class{c}').mkdir(parents=True)
        Image.new('RGB', (32, 32), (25 * c, 0, 0)).save(data / 'test' / f'class{c}' / '0.png')
    run = tmp_path / 'output' / 'resnet83_spe-cifar10_tiny'
    run.mkdir(parents=True)
    (run / 'args.yaml').write_text('model: resnet83_spe\n')
    (run / 'summary.csv').write_text('epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n0,2.0,1.9,20.0,60.0,0.1\n')
    torch.save({'epoch': 0, 'arch': 'resnet83_spe', 'state_dict': timm.create_model('resnet83_spe').state_dict()},
               run / 'model_best.pth.tar')
    recipe = tmp_path / 'recipe.yaml'
    recipe.write_text(yaml.safe_dump({
        'model': 'resnet83_spe', 'experiment': 'resnet83_spe-cifar10_tiny', 'output': str(tmp_path / 'output'),
        'data_dir': str(data), 'val_split': 'test', 'epochs': 3, 'batch_size': 128, 'device': 'cpu'}))
    return {'recipe': recipe, 'run': run, 'data': data}


def test_finish_run_stages_a_complete_card(run_dir, tmp_path):
    out = tmp_path / 'staged'
    cli(['finish-run', '--recipe', str(run_dir['recipe']), '--out', str(out)])
    names = sorted(p.name for p in out.iterdir())
    assert names == ['README.md', 'config.json', 'eval.json', 'model.safetensors', 'spe_lambda.png',
                     'training_curve.png']
    result = json.loads((out / 'eval.json').read_text())
    assert result['num_images'] == 10 and result['model'] == 'resnet83_spe' and result['tag'] == 'cifar10_tiny'
    card = (out / 'README.md').read_text()
    assert f"{result['top1']:.2f}" in card and '1 of 3 epochs of batch 128' in card
    assert '![training curve' in card and '(spe_lambda.png)' in card and '94.03%' in card
    with pytest.raises(SystemExit, match='not empty'):  # never silently replaced
        cli(['finish-run', '--recipe', str(run_dir['recipe']), '--out', str(out)])


def test_inspect_prints_every_block(run_dir, capsys, tmp_path):
    cli(['inspect', 'resnet83_spe', '--checkpoint', str(run_dir['run'] / 'model_best.pth.tar'),
         '--plot', str(tmp_path / 'l.png')])
    out = capsys.readouterr().out
    assert 'layer1.0' in out and 'layer3.8' in out and '27 SPE blocks' in out
    assert (tmp_path / 'l.png').exists()
    with pytest.raises(SystemExit, match='no SPE layers'):
        cli(['inspect', 'resnet83', '--checkpoint', str(_plain_checkpoint(tmp_path))])


def _plain_checkpoint(tmp_path):
    path = tmp_path / 'plain.pth.tar'
    torch.save({'state_dict': timm.create_model('resnet83').state_dict(), 'arch': 'resnet83'}, path)
    return path


def test_bad_inputs(run_dir, tmp_path):
    with pytest.raises(SystemExit, match='unknown model'):
        cli(['eval', 'resnet84_spe', '--checkpoint', 'x', '--data-dir', str(run_dir['data'] / 'test')])
    with pytest.raises(SystemExit, match='does not exist'):
        cli(['eval', 'resnet83_spe', '--checkpoint', str(tmp_path / 'missing.pth'), '--data-dir', '.'])
    with pytest.raises(SystemExit, match='not a folder'):
        cli(['eval', 'resnet83_spe', '--checkpoint', str(run_dir['run'] / 'model_best.pth.tar'),
             '--data-dir', str(tmp_path / 'nodata')])


def test_console_script_is_installed():
    proc = subprocess.run([str(Path(sys.executable).with_name('timm-spe')), '--help'], capture_output=True, text=True)
    assert proc.returncode == 0 and 'publish' in proc.stdout and 'finish-run' in proc.stdout


@pytest.mark.skipif(not (ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz').exists(),
                    reason='needs ../shared/data/cifar10-jpeg.tar.gz (the CIFAR-10 JPEG copy)')
def test_eval_on_real_cifar10_subset(tmp_path):
    import tarfile
    with tarfile.open(ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz') as tar:
        members = [m for m in tar if m.isfile() and '/test/' in m.name and m.name.endswith(('/0000.jpg', '/0001.jpg'))]
        tar.extractall(tmp_path, members=members, filter='data')
    test_dir = tmp_path / 'cifar10-jpeg' / 'test'
    assert len(list(test_dir.glob('*/*.jpg'))) == 20
    out = tmp_path / 'r.json'
    cli(['eval', 'resnet83_spe', '--checkpoint', str(_plain_spe(tmp_path)), '--data-dir', str(test_dir),
         '--limit', '10', '--out', str(out)])
    r = json.loads(out.read_text())
    assert r['num_images'] == 10 and 0 <= r['top1'] <= 100 and r['top1'] <= r['top5']


def _plain_spe(tmp_path):
    path = tmp_path / 'spe.pth.tar'
    torch.save({'state_dict': timm.create_model('resnet83_spe').state_dict(), 'arch': 'resnet83_spe'}, path)
    return path
