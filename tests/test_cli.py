"""timm-spe command line: eval, inspect, finish-run (the train.py -> card pipeline), errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import timm
import timm_spe  # noqa: F401
from timm_spe.cli import main as cli
from timm_spe.labels import CIFAR10_LABELS

ROOT = Path(__file__).resolve().parents[1]


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
    assert f"{result['top1']:.2f}" in card and '3 of 3 epochs of batch 128' in card
    staged = load_file(out / 'model.safetensors')
    final = torch.load(run_dir['run'] / 'last.pth.tar', weights_only=True)['state_dict']
    assert all(torch.equal(staged[k], final[k]) for k in staged)  # the final epoch, not model_best
    assert '![training curve' in card and '(spe_lambda.png)' in card and '94.03%' in card
    with pytest.raises(SystemExit, match='not empty'):  # never silently replaced
        cli(['finish-run', '--recipe', str(run_dir['recipe']), '--out', str(out)])


def test_finish_run_refuses_a_run_that_has_not_reached_its_epochs(run_dir, tmp_path):
    summary = run_dir['run'] / 'summary.csv'
    summary.write_text('\n'.join(summary.read_text().splitlines()[:3]) + '\n')  # epochs 0-1 of 3
    with pytest.raises(SystemExit, match=r'stopped after epoch 2 of 3: `./run.sh train .*` resumes it'):
        cli(['finish-run', '--recipe', str(run_dir['recipe']), '--out', str(tmp_path / 'staged')])
    assert not (tmp_path / 'staged').exists()
    cli(['finish-run', '--recipe', str(run_dir['recipe']), '--out', str(tmp_path / 'staged'), '--unfinished'])
    assert (tmp_path / 'staged' / 'model.safetensors').is_file()


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


def test_eval_refusals_exit_1_with_one_line_messages(run_dir, make_image_folder, tmp_path):
    """Wrong data never becomes a number: the CLI exits 1 with one line naming the problem and the fix."""
    ckpt = str(run_dir['run'] / 'model_best.pth.tar')
    proc = subprocess.run([sys.executable, '-m', 'timm_spe.cli', 'eval', 'resnet83_spe', '--checkpoint', ckpt,
                           '--data-dir', str(run_dir['data']), '--out', str(tmp_path / 'r.json')],
                          capture_output=True, text=True, cwd=ROOT)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and not (tmp_path / 'r.json').exists()
    assert last.startswith('timm-spe eval: ') and 'holds split folders (test/)' in last
    assert f"--data-dir {run_dir['data'] / 'test'}" in last
    cases = {
        make_image_folder(['.'], root=tmp_path / 'flat'): 'a flat folder has no labels',
        make_image_folder([f'class{c}' for c in range(10)], 1, root=tmp_path / 'numbered'):
            'has classes the model does not have: class0, class1',
        make_image_folder(['cat', 'dog'], 1, root=tmp_path / 'two'): "has 2 of the model's 10 classes",
    }
    for data, message in cases.items():
        with pytest.raises(SystemExit, match=message) as e:
            cli(['eval', 'resnet83_spe', '--checkpoint', ckpt, '--data-dir', str(data)])
        assert '\n' not in str(e.value.code)


def test_eval_records_a_class_subset_and_skipped_images(run_dir, make_image_folder, tmp_path, capsys):
    ckpt = str(run_dir['run'] / 'model_best.pth.tar')
    data = make_image_folder(['cat', 'dog', 'truck'], per_class=2)
    (data / 'dog' / '0001.jpg').write_bytes(b'')
    with pytest.raises(SystemExit, match=r"1 of 6 images in .* cannot be read: dog/0001\.jpg"):
        cli(['eval', 'resnet83_spe', '--checkpoint', ckpt, '--data-dir', str(data), '--allow-class-subset'])
    out = tmp_path / 'r.json'
    cli(['eval', 'resnet83_spe', '--checkpoint', ckpt, '--data-dir', str(data), '--allow-class-subset',
         '--skip-bad-images', '--out', str(out)])
    r = json.loads(out.read_text())
    assert r['num_images'] == 5 and r['skipped_images'] == 1 and r['skipped_image_files'] == ['dog/0001.jpg']
    assert r['class_subset'] is True and r['classes_evaluated'] == ['cat', 'dog', 'truck']
    assert r['label_names'] == list(CIFAR10_LABELS) and r['ema'] is False
    assert 'only 3 of 10 classes; 1 unreadable images skipped' in capsys.readouterr().out


def test_eval_ema_without_ema_weights_is_an_error(run_dir, tmp_path):
    from safetensors.torch import save_file
    from timm_spe.hub import weights_sha256
    data = str(run_dir['data'] / 'test')
    model = timm.create_model('resnet83_spe')
    save_file(model.state_dict(), tmp_path / 'w.safetensors')
    torch.save(model.state_dict(), tmp_path / 'bare.pth')
    for ckpt, message in ((tmp_path / 'w.safetensors', 'is a safetensors file: one set of weights, no state_dict_ema'),
                          (tmp_path / 'bare.pth', 'is a bare state dict: one set of weights, no state_dict_ema'),
                          (run_dir['run'] / 'model_best.pth.tar', 'has no state_dict_ema')):
        with pytest.raises(SystemExit, match=message):
            cli(['eval', 'resnet83_spe', '--checkpoint', str(ckpt), '--ema', '--data-dir', data])
    with pytest.raises(SystemExit, match=r"--ema needs --checkpoint FILE .* 'resnet83_spe\.cifar10' have no EMA copy"):
        cli(['eval', 'resnet83_spe.cifar10', '--ema', '--data-dir', data])  # refused before any download
    ema = timm.create_model('resnet83_spe')
    torch.save({'arch': 'resnet83_spe', 'state_dict': model.state_dict(), 'state_dict_ema': ema.state_dict()},
               tmp_path / 'ema.pth.tar')
    cli(['eval', 'resnet83_spe', '--checkpoint', str(tmp_path / 'ema.pth.tar'), '--ema', '--data-dir', data,
         '--out', str(tmp_path / 'r.json')])
    r = json.loads((tmp_path / 'r.json').read_text())
    assert r['ema'] is True and r['weights_sha256'] == weights_sha256(ema) != weights_sha256(model)


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
