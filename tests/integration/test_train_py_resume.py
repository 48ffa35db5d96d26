"""timm's train.py resumed by ./run.sh train: a resume trains as an uninterrupted run, and the recipe's seed would replay the first epochs' batches."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from helpers import ROOT, timm_train_py

from timm_spe.train_run import read_summary

RECIPE = 'train_recipes/resnet164_spe-cifar10_e30.yaml'

CLASSES = [f'{split}/{c}' for split in ('train', 'test') for c in ('airplane', 'automobile')]  # 2 classes, 2 splits


def test_resume_matches_an_uninterrupted_run(tmp_path, make_image_folder):
    """2 epochs in one go vs 1 epoch + resume for 1: same epoch count, same lr schedule, and the resumed
    run starts from the saved SPE p and optimizer momentum. Not bit-identical: the data order (train.py
    seeds at every start: here, with the same seed, the resumed epoch sees the first epoch's order; ./run.sh
    train passes a seed of its own, see the next test) and hence the weights."""
    train_py = timm_train_py()
    data = tmp_path / 'data'
    make_image_folder(CLASSES, per_class=32, root=data)  # 16 steps per epoch: time to interrupt epoch 1
    recipe = yaml.safe_load((ROOT / 'train_recipes' / 'resnet164_spe-cifar10_e30.yaml').read_text())
    recipe.update(model='resnet83_spe', data_dir=str(data), epochs=2, warmup_epochs=1, batch_size=4,
                  validation_batch_size=4, workers=1, log_interval=1, channels_last=False)
    cfg = tmp_path / 'tiny.yaml'
    cfg.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'}

    # Ctrl-C semantics whatever this test inherited: a shell's background job starts with SIGINT ignored
    ctrl_c = ('import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); '
              'sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name="__main__")')

    def command(name, *extra):
        return [sys.executable, '-c', ctrl_c, train_py, '--config', str(cfg), '--output', str(tmp_path / 'runs'),
                '--experiment', name, *extra]

    whole = tmp_path / 'runs' / 'whole'
    subprocess.run(command('whole'), check=True, env=env, capture_output=True, cwd=tmp_path)
    # the interrupted run: Ctrl-C (SIGINT) as soon as epoch 0's checkpoint exists, i.e. during epoch 1
    part = tmp_path / 'runs' / 'part'
    proc = subprocess.Popen(command('part'), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (part / 'last.pth.tar').is_file():  # written (tmp file + rename) after the summary row
        assert proc.poll() is None and time.monotonic() < deadline, 'train.py ended before its first epoch'
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    after_one = torch.load(part / 'last.pth.tar', map_location='cpu', weights_only=False)
    assert len(read_summary(part / 'summary.csv')) == 1, 'the interruption came too late: epoch 1 finished'
    subprocess.run(command('part', '--resume', str(part / 'last.pth.tar')), check=True, env=env,
                   capture_output=True, cwd=tmp_path)
    one_go = read_summary(whole / 'summary.csv')
    relay = read_summary(part / 'summary.csv')
    assert [r['epoch'] for r in relay] == [r['epoch'] for r in one_go] == [0, 1]
    assert [r['lr'] for r in relay] == pytest.approx([r['lr'] for r in one_go])
    end = torch.load(part / 'last.pth.tar', map_location='cpu', weights_only=False)
    assert end['epoch'] == 1 and after_one['epoch'] == 0
    p_keys = [k for k in after_one['state_dict'] if k.endswith('.se.p')]
    assert p_keys and all(not torch.equal(end['state_dict'][k], after_one['state_dict'][k]) for k in p_keys)
    # the momentum buffers were restored, then advanced: the resumed optimizer state is not a fresh one
    assert after_one['optimizer']['state'] and len(end['optimizer']['state']) == len(after_one['optimizer']['state'])


def test_a_resume_with_the_recipes_seed_replays_the_first_epochs_batches(tmp_path, make_image_folder):
    """Measured with lr 0, so the weights never change and an epoch's mean train loss depends on its batches
    alone: the second epoch of one train.py process draws new batches, a resume with the recipe's seed trains on
    exactly the first epoch's batches again (order and augmentation), and a resume with the seed ./run.sh train
    gives it (the recipe's seed + the epoch it resumes at) draws its own."""
    train_py = timm_train_py()
    data = tmp_path / 'data'
    make_image_folder(CLASSES, per_class=16, root=data)  # 8 steps of batch 4
    recipe = yaml.safe_load((ROOT / RECIPE).read_text())
    recipe.update(model='resnet83_spe', data_dir=str(data), epochs=2, warmup_epochs=0, lr=0., lr_base=0., warmup_lr=0.,
                  min_lr=0., batch_size=4, validation_batch_size=8, workers=1, log_interval=50, channels_last=False)
    cfg = tmp_path / 'lr0.yaml'
    cfg.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'}
    runs = tmp_path / 'runs'

    def train(name, *extra):
        subprocess.run([sys.executable, train_py, '--config', str(cfg), '--output', str(runs), '--experiment', name,
                        *extra], check=True, env=env, capture_output=True, cwd=tmp_path)
        return [r['train_loss'] for r in read_summary(runs / name / 'summary.csv')]

    first, second = train('fresh')
    resume = ('--resume', str(runs / 'fresh' / 'last.pth.tar'), '--epochs', '3')
    assert second != first  # one process: epoch 2 draws new batches
    assert train('resumed', *resume)[-1] == first  # the recipe's seed again: epoch 1's batches, bit for bit
    seed = recipe['seed'] + 2  # what run.sh passes when it resumes at epoch 2 (0-based)
    assert train('reseeded', *resume, '--seed', str(seed))[-1] not in (first, second)
