"""The CLI as its own process: the console script, exit statuses, `timm-spe run`, and timm's validate.py / inference.py running our pretrained model."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT
from PIL import Image

import timm_spe  # noqa: F401
from timm_spe.cli import main as cli
from timm_spe.labels import CIFAR10_LABELS

TIMM_VALIDATE = ROOT / '.cache' / 'pytorch-image-models' / 'validate.py'
TIMM_INFERENCE = ROOT / '.cache' / 'pytorch-image-models' / 'inference.py'


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


def test_console_script_is_installed():
    proc = subprocess.run([str(Path(sys.executable).with_name('timm-spe')), '--help'], capture_output=True, text=True)
    assert proc.returncode == 0 and 'publish' in proc.stdout and 'finish-run' in proc.stdout


def test_run_passes_argv_and_registers_the_models(tmp_path):
    script = tmp_path / 'script.py'
    script.write_text('import sys, json, timm\nprint(json.dumps([sys.argv, timm.is_model("resnet164_spe")]))\n')
    proc = subprocess.run([str(Path(sys.executable).with_name('timm-spe')), 'run', str(script), '--model', 'x', '-b', '3'],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == [[str(script), '--model', 'x', '-b', '3'], True]


@pytest.mark.skipif(not TIMM_VALIDATE.is_file(), reason=f"needs timm's {TIMM_VALIDATE} (a pytorch-image-models clone)")
def test_timm_validate_py_runs_our_pretrained_model(tmp_path):
    """timm's own validate.py, unmodified, scores the shipped resnet164_spe weights on 10 class-named images."""
    data = tmp_path / 'val'
    for c, name in enumerate(CIFAR10_LABELS):  # ImageFolder's sorted order is CIFAR-10's label order
        (data / name).mkdir(parents=True)
        Image.new('RGB', (32, 32), (25 * c, 90, 200 - 20 * c)).save(data / name / '0.png')
    results = tmp_path / 'results.json'
    proc = subprocess.run(
        [str(Path(sys.executable).with_name('timm-spe')), 'run', str(TIMM_VALIDATE), '--data-dir', str(data),
         '--model', 'resnet164_spe', '--pretrained', '--device', 'cpu', '-b', '10', '-j', '1',
         '--results-file', str(results), '--results-format', 'json'],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**__import__('os').environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads(results.read_text())
    r = r[0] if isinstance(r, list) else r
    assert r['model'] == 'resnet164_spe' and 0 <= r['top1'] <= 100 and r['img_size'] == 32


@pytest.mark.skipif(not TIMM_INFERENCE.is_file(), reason=f"needs timm's {TIMM_INFERENCE} (a pytorch-image-models clone)")
def test_timm_inference_py_names_the_classes_of_our_pretrained_model(tmp_path):
    """timm's own inference.py labels predictions with the config's label_names (CIFAR-10 class names), instead
    of "Cannot deduce ImageNet subset from model"."""
    pytest.importorskip('pandas')  # inference.py writes its results through pandas
    data = tmp_path / 'images'
    data.mkdir()
    for i in range(3):
        Image.new('RGB', (32, 32), (80 * i, 90, 200)).save(data / f'{i}.png')
    proc = subprocess.run(
        [str(Path(sys.executable).with_name('timm-spe')), 'run', str(TIMM_INFERENCE), '--data-dir', str(data),
         '--model', 'resnet164_spe', '--pretrained', '--device', 'cpu', '-b', '3', '-j', '1', '--label-type', 'name',
         '--results-file', str(tmp_path / 'out.json'), '--results-format', 'json', '--no-console-results'],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**__import__('os').environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert 'Cannot deduce' not in proc.stdout + proc.stderr
    rows = json.loads((tmp_path / 'out.json').read_text())
    labels = [r['label'] for r in rows.values()]  # {filename: {label, prob}}
    assert len(labels) == 3 and set(labels) <= set(CIFAR10_LABELS)
