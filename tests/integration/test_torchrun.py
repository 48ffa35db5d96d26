"""Training under torchrun, 2 processes on the CPU (gloo): timm's train.py with an SPE recipe (skipped where no copy of
train.py is at hand, as the other train.py tests), and examples/train_ddp.py, a custom loop of timm's parts and DDP
(never skipped). Each trains an epoch, writes its resume state, resumes from it under torchrun for a second epoch, and
both ranks end with the same weights. What each rank held comes from tests/ddp_probe.py."""
import argparse
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import ROOT, timm_train_py
from safetensors.torch import load_file

from timm_spe.labels import CIFAR10_LABELS
from timm_spe.train_run import read_summary

PROBE = ROOT / 'tests' / 'ddp_probe.py'
DATA_COPY = ROOT / 'data' / 'cifar10-jpeg'  # unpacked by ./run.sh train


@pytest.fixture()
def tiny_cifar(tmp_path, make_image_folder):
    """4 images per class of each split: the first of the CIFAR-10 JPEG copy where ./run.sh train unpacked it, else
    random 32x32 JPEGs (q75) in the same class folders."""
    root = tmp_path / 'data'
    if DATA_COPY.is_dir():
        for split in ('train', 'test'):
            for c in CIFAR10_LABELS:
                (root / split / c).mkdir(parents=True)
                for f in sorted((DATA_COPY / split / c).iterdir())[:4]:
                    shutil.copy(f, root / split / c / f.name)
    else:
        make_image_folder([f'{s}/{c}' for s in ('train', 'test') for c in CIFAR10_LABELS], per_class=4, root=root)
    return root


def _torchrun(probe_dir, *command, cwd):
    """``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_probe.py COMMAND``: its output (it must end well)."""
    probe_dir.mkdir()
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1', 'DDP_PROBE_DIR': str(probe_dir)}
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           str(PROBE), *map(str, command)], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _ranks(probe_dir, when):
    return [load_file(str(probe_dir / f'rank{r}-{when}.safetensors')) for r in (0, 1)]


def _assert_same(a, b, what):
    assert a.keys() == b.keys(), what
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f'{what}: {differ[:5]}'


def _check_resumed(probe_dir, resumed_from):
    """Each rank loaded the resume state itself (before DDP's broadcast from rank 0), its penalty on with the recipe's
    eta, and both ended on the same weights and buffers, trained past the resume state."""
    for r, wrapped in enumerate(_ranks(probe_dir, 'wrapped')):
        _assert_same(wrapped, resumed_from, f'rank {r} when wrapped vs the resume state')
        penalty = json.loads((probe_dir / f'rank{r}.json').read_text())['penalty']
        assert penalty and all(v == {'auto_penalty': True, 'eta': 0.1} for v in penalty.values())
    end0, end1 = _ranks(probe_dir, 'end')
    _assert_same(end0, end1, 'rank 0 vs rank 1 at the end')
    p = [k for k in end0 if k.endswith('.se.p')]
    assert p and all(not torch.equal(end0[k], resumed_from[k]) for k in p)
    return end0


def _load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):  # train.py stores its args in the checkpoint
        return torch.load(path, map_location='cpu', weights_only=True)


def test_timm_train_py_trains_checkpoints_and_resumes_under_torchrun(tmp_path, tiny_cifar):
    train_py = timm_train_py()
    recipe = yaml.safe_load((ROOT / 'train_recipes' / 'resnet164_spe-cifar10_e164.yaml').read_text())
    recipe.update(model='resnet83_spe', data_dir=str(tiny_cifar), epochs=2, decay_milestones=[1], batch_size=4,
                  validation_batch_size=8, log_interval=1, channels_last=False, output=str(tmp_path / 'runs'))
    cfg = tmp_path / 'tiny.yaml'
    cfg.write_text(yaml.safe_dump(recipe))
    run = tmp_path / 'runs' / 'ddp'

    log = _torchrun(tmp_path / 'probe1', train_py, '--config', cfg, '--experiment', 'ddp', '--epochs', 1, cwd=tmp_path)
    assert 'Training in distributed mode with multiple processes' in log and 'total 2, device cpu' in log
    first = _load(run / 'last.pth.tar')
    assert first['epoch'] == 0 and [r['epoch'] for r in read_summary(run / 'summary.csv')] == [0]
    end0, end1 = _ranks(tmp_path / 'probe1', 'end')
    _assert_same(end0, end1, 'rank 0 vs rank 1 after epoch 0')  # DDP's gradients, dist_bn's reduced BN statistics
    _assert_same(first['state_dict'], end0, 'the checkpoint vs rank 0')

    log = _torchrun(tmp_path / 'probe2', train_py, '--config', cfg, '--experiment', 'ddp', '--resume',
                    run / 'last.pth.tar', cwd=tmp_path)
    assert f"Loaded checkpoint '{run / 'last.pth.tar'}' (epoch 0)" in log
    rows = read_summary(run / 'summary.csv')
    assert [r['epoch'] for r in rows] == [0, 1]
    assert [r['lr'] for r in rows] == pytest.approx([0.1, 0.01])  # the resumed epoch is past the milestone
    end = _check_resumed(tmp_path / 'probe2', first['state_dict'])
    second = _load(run / 'last.pth.tar')
    assert second['epoch'] == 1
    _assert_same(second['state_dict'], end, "the resumed run's checkpoint vs rank 0")


def test_a_custom_ddp_loop_trains_checkpoints_and_resumes_under_torchrun(tmp_path, tiny_cifar):
    script = ROOT / 'examples' / 'train_ddp.py'
    out = tmp_path / 'run'
    args = (script, '--data-dir', tiny_cifar, '--output', out, '--batch-size', 4, '--decay-milestones', 1)
    _torchrun(tmp_path / 'probe1', *args, '--epochs', 1, cwd=tmp_path)
    first = torch.load(out / 'last.pth', map_location='cpu', weights_only=True)
    assert first['epoch'] == 0
    end0, end1 = _ranks(tmp_path / 'probe1', 'end')
    _assert_same(end0, end1, 'rank 0 vs rank 1 after epoch 0')
    _assert_same(first['model'], end0, 'the resume state vs rank 0')

    _torchrun(tmp_path / 'probe2', *args, '--epochs', 2, '--resume', cwd=tmp_path)
    with open(out / 'summary.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert [int(r['epoch']) for r in rows] == [0, 1]
    assert [float(r['lr']) for r in rows] == pytest.approx([0.1, 0.01])
    end = _check_resumed(tmp_path / 'probe2', first['model'])
    second = torch.load(out / 'last.pth', map_location='cpu', weights_only=True)
    assert second['epoch'] == 1 and second['optimizer']['state']
    _assert_same(second['model'], end, "the resumed run's state vs rank 0")


def test_the_custom_loop_never_overwrites_a_run(tmp_path):
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'last.pth').write_bytes(b'a run')
    proc = subprocess.run([sys.executable, str(ROOT / 'examples' / 'train_ddp.py'), '--data-dir', str(tmp_path),
                           '--output', str(out)], capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': str(ROOT)})
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        f'train_ddp.py: {out} already holds a run (last.pth): add --resume to continue it, or give another --output')
    assert (out / 'last.pth').read_bytes() == b'a run'
