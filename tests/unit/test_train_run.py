"""Resumable runs: ``./run.sh train`` keeps a run in runs/<recipe>/ (git-ignored) and resumes it from last.pth.tar;
train_runs/<recipe>/ are the committed records of the shipped weights' runs, and their train.log gives the expected
time per epoch.

The resume itself is timm's train.py (``--resume``): test_resume_matches_an_uninterrupted_run runs the real
train.py on a tiny image folder where train.py is available (TIMM_TRAIN_PY, or .cache/ after a first
``./run.sh train``) and skips elsewhere, e.g. in CI, which cannot clone pytorch-image-models.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

from timm_spe.train_run import read_summary, run_status

RECIPE = 'train_recipes/resnet164_spe-cifar10_e30.yaml'
DEFAULT_RECIPE = 'train_recipes/resnet164_spe-cifar10_e164.yaml'  # the paper's 164 epochs: ./run.sh train's default


def _dry_run(*args, cwd=ROOT):
    out = subprocess.run(['bash', str(ROOT / 'run.sh'), 'train', '--dry-run', *args], cwd=cwd,
                         capture_output=True, text=True, env={**os.environ, 'TIMM_TRAIN_PY': '/x/train.py'})
    return out


def test_dry_run_names_the_run_folder_and_resumes_only_from_a_checkpoint(tmp_path):
    """Without a checkpoint the command starts a run in runs/<recipe>/; with its last.pth.tar it resumes."""
    repo = _repo_with_recipe(tmp_path)
    out = subprocess.run(['bash', 'run.sh', 'train', '--dry-run', RECIPE, '--epochs', '2'], cwd=repo,
                         capture_output=True, text=True, env={**os.environ, 'TIMM_TRAIN_PY': '/x/train.py'})
    assert out.returncode == 0, out.stderr
    assert 'run dir:  runs/resnet164_spe-cifar10_e30 (new run)' in out.stdout and '--resume' not in out.stdout
    assert ('/x/train.py --config train_recipes/resnet164_spe-cifar10_e30.yaml --output runs '
            '--experiment resnet164_spe-cifar10_e30') in out.stdout and out.stdout.rstrip().endswith('--epochs 2')
    run_dir = repo / 'runs' / 'resnet164_spe-cifar10_e30'
    run_dir.mkdir(parents=True)
    (run_dir / 'last.pth.tar').write_bytes(b'')
    out = subprocess.run(['bash', 'run.sh', 'train', '--dry-run', RECIPE], cwd=repo, capture_output=True, text=True,
                         env={**os.environ, 'TIMM_TRAIN_PY': '/x/train.py'})
    assert out.returncode == 0, out.stderr
    assert 'run dir:  runs/resnet164_spe-cifar10_e30 (resumes from last.pth.tar)' in out.stdout
    assert '--resume runs/resnet164_spe-cifar10_e30/last.pth.tar' in out.stdout


def test_the_default_run_trains_the_164_epoch_recipe_into_runs_and_resumes_there(tmp_path):
    """A fresh clone's `./run.sh train` trains the paper's 164-epoch recipe into the git-ignored runs/, not into the
    committed records of train_runs/, and a second call resumes the same folder from its checkpoint."""
    repo = _repo_with_recipe(tmp_path)
    record = repo / 'train_runs' / 'resnet164_spe-cifar10_e164'  # a committed record, part-way, with its checkpoint
    record.mkdir(parents=True)
    (record / 'last.pth.tar').write_bytes(b'')
    out = _dry(repo)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f'recipe:   {DEFAULT_RECIPE}\n')
    assert 'run dir:  runs/resnet164_spe-cifar10_e164 (new run)' in out.stdout and '--resume' not in out.stdout
    assert f'--config {DEFAULT_RECIPE} --output runs --experiment resnet164_spe-cifar10_e164' in out.stdout
    run_dir = repo / 'runs' / 'resnet164_spe-cifar10_e164'
    run_dir.mkdir(parents=True)
    (run_dir / 'last.pth.tar').write_bytes(b'')
    (run_dir / 'summary.csv').write_text('epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n0,2.0,1.9,30,80,0.1\n')
    out = _dry(repo)
    assert out.returncode == 0, out.stderr
    assert 'run dir:  runs/resnet164_spe-cifar10_e164 (resumes from last.pth.tar)' in out.stdout
    assert '--resume runs/resnet164_spe-cifar10_e164/last.pth.tar --seed 43' in out.stdout  # after epoch 1
    assert yaml.safe_load((ROOT / DEFAULT_RECIPE).read_text())['epochs'] == 164
    ignored = subprocess.run(['git', 'check-ignore', '-q', 'runs/resnet164_spe-cifar10_e164/last.pth.tar'], cwd=ROOT)
    assert ignored.returncode == 0  # a user's run never shows up as a change to commit


def test_a_resume_draws_new_data_order_instead_of_replaying_the_first_epochs(tmp_path):
    """train.py seeds at every start: with the recipe's seed 42 each resume would replay epoch 0's order and
    augmentation (the e30 run's resumed epochs did, see docs/training.md). A resume seeds with 42 + the epoch it
    resumes at; a fresh run keeps the recipe's seed; a --seed given by the user comes last and wins."""
    repo = tmp_path / 'repo'
    (repo / 'train_recipes').mkdir(parents=True)
    (repo / 'run.sh').write_bytes((ROOT / 'run.sh').read_bytes())
    (repo / RECIPE).write_text((ROOT / RECIPE).read_text())
    assert yaml.safe_load((repo / RECIPE).read_text())['seed'] == 42

    def command(*args):
        out = subprocess.run(['bash', 'run.sh', 'train', '--dry-run', RECIPE, *args], cwd=repo, capture_output=True,
                             text=True, env={**os.environ, 'TIMM_TRAIN_PY': '/x/train.py'})
        assert out.returncode == 0, out.stderr
        return out.stdout.rstrip()

    assert '--seed' not in command()  # a new run: the recipe's seed
    run_dir = repo / 'runs' / 'resnet164_spe-cifar10_e30'
    run_dir.mkdir(parents=True)
    (run_dir / 'last.pth.tar').write_bytes(b'')
    assert command().endswith('last.pth.tar --seed 43')  # no summary yet: epoch 1
    header = 'epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n'
    (run_dir / 'summary.csv').write_text(header + '0,2.3,2.2,10,50,0.1\n1,2.1,2.0,20,60,0.1\n'
                                         + header + '2,1.9,1.8,30,70,0.1\n')  # train.py repeats it per start
    assert command().endswith('last.pth.tar --seed 45')  # resumes at epoch 3
    assert command('--seed', '7').endswith('--seed 45 --seed 7')


def test_a_finished_run_is_reported_never_trained_over(tmp_path):
    """A finished record keeps summary.csv and train.log in train_runs/ without its checkpoint: ./run.sh train trains
    the recipe anew in runs/ and never appends a second run to them (with TRAIN_RUNS=train_runs it says the run is
    finished). A run of runs/ that has all its epochs and its staged Hub folder is reported the same way; records
    without a checkpoint of an unfinished run are a one-line error."""
    repo = _repo_with_recipe(tmp_path)
    assert yaml.safe_load((repo / RECIPE).read_text())['epochs'] == 30
    record = repo / 'train_runs' / 'resnet164_spe-cifar10_e30'
    record.mkdir(parents=True)
    header = 'epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n'
    finished = header + ''.join(f'{e},1.0,1.0,50,90,0.1\n' for e in range(30))
    (record / 'summary.csv').write_text(finished)

    def train(*args, env=None):
        return subprocess.run(['bash', 'run.sh', 'train', '--dry-run', RECIPE, *args], cwd=repo, capture_output=True,
                              text=True, env={**os.environ, 'TIMM_TRAIN_PY': '/x/train.py', **(env or {})})
    out = train()  # the user's own run: a new one in runs/, the record untouched
    assert out.returncode == 0 and 'run dir:  runs/resnet164_spe-cifar10_e30 (new run)' in out.stdout
    assert '--output runs --experiment resnet164_spe-cifar10_e30' in out.stdout
    out = train(env={'TRAIN_RUNS': 'train_runs'})
    assert out.returncode == 0 and out.stdout.strip() == (
        "run.sh: train_runs/resnet164_spe-cifar10_e30 finished all 30 epochs (a record of the shipped weights, its "
        "checkpoint removed; the weights are in hub_cards/, see README 'Results'): to train "
        "train_recipes/resnet164_spe-cifar10_e30.yaml anew, ./run.sh train train_recipes/resnet164_spe-cifar10_e30.yaml "
        "(in runs/resnet164_spe-cifar10_e30/) or TRAIN_RUNS=DIR ./run.sh train train_recipes/resnet164_spe-cifar10_e30.yaml")
    run_dir = repo / 'runs' / 'resnet164_spe-cifar10_e30'
    run_dir.mkdir(parents=True)
    (run_dir / 'summary.csv').write_text(finished)
    (run_dir / 'last.pth.tar').write_bytes(b'')
    out = train()  # all epochs, not staged yet (stopped before finish-run): resumed, so that it gets staged
    assert out.returncode == 0 and '(resumes from last.pth.tar)' in out.stdout
    (run_dir / 'hub_folder').mkdir()
    out = train()
    assert out.returncode == 0 and out.stdout.strip() == (
        "run.sh: runs/resnet164_spe-cifar10_e30 finished all 30 epochs (staged in runs/resnet164_spe-cifar10_e30/"
        "hub_folder): to train train_recipes/resnet164_spe-cifar10_e30.yaml anew, move runs/resnet164_spe-cifar10_e30 "
        "away or TRAIN_RUNS=DIR ./run.sh train train_recipes/resnet164_spe-cifar10_e30.yaml")
    (record / 'summary.csv').write_text(header + '0,1.0,1.0,50,90,0.1\n')  # unfinished, checkpoint gone
    out = train(env={'TRAIN_RUNS': 'train_runs'})
    assert out.returncode == 2 and out.stdout == '' and len(out.stderr.strip().splitlines()) == 1
    assert 'has a summary.csv but no last.pth.tar to resume from: move train_runs/resnet164_spe-cifar10_e30 away' \
           in out.stderr
    assert finished.startswith((record / 'summary.csv').read_text())  # nothing written by run.sh


def test_run_sh_refuses_a_missing_recipe_in_one_line():
    out = _dry_run('train_recipes/nope.yaml')
    assert out.returncode == 2 and out.stderr.strip().count('\n') == 0 and 'no recipe' in out.stderr


def test_run_status_reports_the_last_completed_epoch(tmp_path):
    assert 'no completed epoch yet' in run_status(tmp_path)
    (tmp_path / 'summary.csv').write_text(
        'epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n0,2.0,1.9,30.0,80.0,0.1\n'
        'epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n1,1.5,1.4,45.5,90.0,0.1\n')
    assert run_status(tmp_path, 30) == (f'{tmp_path}: epoch 2/30 done, train loss 1.5000, '
                                        'top-1 45.50 % at this epoch (eval_loss 1.4000)')


def test_run_status_plots_the_curve_so_far(tmp_path, capsys):
    """``timm-spe run-status --plot`` draws the run's curve from summary.csv and train.log and says where."""
    pytest.importorskip('matplotlib')
    from timm_spe.cli import main as cli
    (tmp_path / 'summary.csv').write_text(
        'epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n0,2.0,1.9,30.0,80.0,0.1\n'
        'epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n1,1.5,1.4,45.5,90.0,0.1\n')
    (tmp_path / 'train.log').write_text('Train: 0 [   0/390 (  0%)]  Loss: 2.310 (2.310)\n'
                                        'Train: 1 [ 200/390 ( 51%)]  Loss: 1.400 (1.500)\n')
    png = tmp_path / 'curve.png'
    cli(['run-status', str(tmp_path), '--plot', str(png)])
    assert capsys.readouterr().out.strip() == (f'{tmp_path}: epoch 2 done, train loss 1.5000, top-1 45.50 % at this '
                                               f'epoch (eval_loss 1.4000); curve: {png}')
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_the_published_summary_reads_as_one_run(tmp_path):
    """finish-run stages summary.csv with the weights: one header, a redone epoch once (its last row), and only the
    epochs of the staged weights, the values as train.py wrote them."""
    from timm_spe.train_run import summary_csv_text
    head = 'epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n'
    summary = tmp_path / 'summary.csv'
    summary.write_text(head + '0,2.0,1.9,20.0,60.0,0.1\n1,1.9,1.8,22.0,61.0,0.05\n'
                       + head + '1,1.85,1.75,23.5,61.0,0.05\n2,1.8,1.7,25.0,62.0,0.0\n')
    assert summary_csv_text(summary) == head + '0,2.0,1.9,20.0,60.0,0.1\n1,1.85,1.75,23.5,61.0,0.05\n' \
                                              '2,1.8,1.7,25.0,62.0,0.0\n'
    assert summary_csv_text(summary, until_epoch=2) == head + '0,2.0,1.9,20.0,60.0,0.1\n' \
                                                              '1,1.85,1.75,23.5,61.0,0.05\n'
    summary.write_text('0,2.0,1.9,20.0,60.0,0.1\n')
    with pytest.raises(ValueError, match='before the header'):
        summary_csv_text(summary)


def test_the_best_epoch_is_the_highest_eval_top1_counted_from_one_and_the_earliest_of_a_tie(tmp_path):
    """The paper's protocol (best test top-1 over all epochs) for the card; a redone epoch counts by its last row."""
    from timm_spe.train_run import best_epoch
    head = 'epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n'
    summary = tmp_path / 'summary.csv'
    summary.write_text(head + '0,2.0,1.9,20.0,60.0,0.1\n1,1.9,1.8,31.0,61.0,0.05\n'
                       + head + '1,1.85,1.75,23.5,61.0,0.05\n2,1.8,1.7,25.0,62.0,0.0\n3,1.7,1.6,25.0,63.0,0.0\n')
    assert best_epoch(read_summary(summary)) == (3, 25.0)  # epoch 1's 31.0 was redone as 23.5; 2 and 3 tie
    assert best_epoch([{'epoch': 0, 'train_loss': 2.0}]) is None  # no per-epoch eval: no such figure


def test_epochs_by_device_follows_a_run_resumed_on_other_machines(tmp_path):
    """Each epoch counts on the device where its evaluation finished; an epoch lost mid-way is counted once."""
    from timm_spe.train_run import describe_devices, epochs_by_device
    log = tmp_path / 'train.log'
    log.write_text('Training with a single process on 1 device (cuda).\n'
                   'Train: 0 [ 0/9]\nTest: [  0/99]\nTest: [  99/99]\nTrain: 1 [ 0/9]\nTest: [  99/99]\n'
                   'Train: 2 [ 0/9]\n'  # the machine went away during epoch 3
                   'Training with a single process on 1 device (cpu).\n'
                   'Train: 2 [ 0/9]\nTest: [  99/99]\nTrain: 3 [ 0/9]\nTest: [  99/99]\n')
    assert epochs_by_device(log) == [('cuda', 1, 2), ('cpu', 3, 4)]
    assert describe_devices(epochs_by_device(log)).startswith("epochs 1-2 on cuda, 3-4 on cpu (train.py's log); ")
    assert describe_devices([('cpu', 1, 30)]) == "epochs 1-30 on cpu (train.py's log)"  # no precision note on CPU
    assert describe_devices([]) == ''


def test_resumed_epochs_tells_replayed_from_reseeded_starts(tmp_path):
    """A resume counts at the epoch its process finished first; run.sh's seed line marks it as a new draw."""
    from timm_spe.train_run import describe_resumes, resumed_epochs
    start = 'Training with a single process on 1 device (cpu).\n'
    log = tmp_path / 'train.log'
    log.write_text(start + 'Train: 0 [ 0/9]\nTest: [  99/99]\nTrain: 1 [ 0/9]\n'  # stopped during epoch 2
                   + start + "Loaded checkpoint 'r/last.pth.tar' (epoch 0)\nTrain: 1 [ 0/9]\n"  # stopped again
                   + start + "Loaded checkpoint 'r/last.pth.tar' (epoch 0)\nTrain: 1 [ 0/9]\nTest: [  99/99]\n"
                   'Train: 2 [ 0/9]\nTest: [  99/99]\n'
                   + 'run.sh: resuming with --seed 45 (the recipe\'s seed + the epoch it resumes at)\n'
                   + start + "Loaded checkpoint 'r/last.pth.tar' (epoch 2)\nTrain: 3 [ 0/9]\nTest: [  99/99]\n")
    assert resumed_epochs(log) == [(2, False), (4, True)]
    assert describe_resumes(resumed_epochs(log)) == (
        "resumed 2 times (train.py --resume; train.py's log); epoch 2 began a new train.py process seeded with the "
        "recipe's seed, so it repeated the sample order of epoch 1 (./run.sh train reseeds resumes since this was "
        "found)")
    assert describe_resumes([(4, True)]) == "resumed 1 time (train.py --resume; train.py's log)"
    assert describe_resumes([]) == ''
    # the card's budget line says it, for the staged epochs only
    from timm_spe.cli.runs import _budget_from_run
    recipe = {'epochs': 4, 'batch_size': 128}
    budget = _budget_from_run([{}] * 3, recipe, str(log), epochs=3)
    assert budget == ("3 of 4 epochs of batch 128 (train.py summary.csv); epochs 1-3 on cpu (train.py's log); "
                      + describe_resumes([(2, False)]))
    assert _budget_from_run([{}] * 4, recipe, str(log), epochs=4).endswith(describe_resumes(resumed_epochs(log)))


def test_the_committed_spe_run_replayed_its_first_epochs_order_at_every_resume():
    """Its card will say so: every resume before run.sh reseeded them started with the recipe's seed."""
    from timm_spe.train_run import resumed_epochs
    log = ROOT / 'train_runs' / 'resnet164_spe-cifar10_e30' / 'train.log'
    replayed = [e for e, reseeded in resumed_epochs(log) if not reseeded]
    assert replayed[:10] == [6, 8, 9, 12, 14, 16, 17, 19, 20, 24]


def test_the_committed_spe_run_began_on_the_gpu():
    """The 30-epoch SPE run's log says where its epochs ran (its card will say so): the first seven on CUDA."""
    from timm_spe.train_run import epochs_by_device
    log = ROOT / 'train_runs' / 'resnet164_spe-cifar10_e30' / 'train.log'
    if not log.is_file():
        pytest.skip('the run is not in this checkout')
    ranges = epochs_by_device(log)
    assert ranges[0] == ('cuda', 1, 7) and all(d == 'cpu' for d, _, _ in ranges[1:]) and ranges[1][1] == 8


def test_committed_runs_keep_only_their_resume_state():
    """Only last.pth.tar, summary.csv, args.yaml and train.log are committed per run (no checkpoint history)."""
    tracked = subprocess.run(['git', 'ls-files', 'train_runs'], cwd=ROOT, capture_output=True, text=True).stdout
    if not tracked.strip():
        pytest.skip('no run committed')
    allowed = {'last.pth.tar', 'summary.csv', 'args.yaml', 'train.log', 'data_source'}
    for line in tracked.split():
        path = Path(line)
        assert path.name in allowed or path.name == '.gitignore', line
    for run in {Path(p).parent for p in tracked.split() if Path(p).name == 'last.pth.tar'}:
        assert read_summary(ROOT / run / 'summary.csv')  # its progress is visible


def _repo_with_recipe(tmp_path):
    repo = tmp_path / 'repo'
    (repo / 'train_recipes').mkdir(parents=True)
    (repo / 'run.sh').write_bytes((ROOT / 'run.sh').read_bytes())
    for recipe in (RECIPE, DEFAULT_RECIPE):
        (repo / recipe).write_text((ROOT / recipe).read_text())
    return repo


def _dry(repo, *args, **env):
    base = {k: v for k, v in os.environ.items() if k not in ('CIFAR10_SOURCE', 'CIFAR10_JPEG_TAR', 'TRAIN_RUNS')}
    return subprocess.run(['bash', 'run.sh', 'train', '--dry-run', *args], cwd=repo, capture_output=True, text=True,
                          env={**base, 'TIMM_TRAIN_PY': '/x/train.py', **env})


TORCHVISION_ARGS = '--dataset torch/cifar10 --data-dir data/cifar10 --train-split train --val-split test'


def test_the_budget_recipe_uses_the_jpeg_copy_where_it_exists(tmp_path):
    repo = _repo_with_recipe(tmp_path)
    tar = tmp_path / 'cifar10-jpeg.tar.gz'
    tar.write_bytes(b'')
    out = _dry(repo, CIFAR10_JPEG_TAR=str(tar))
    assert out.returncode == 0, out.stderr
    assert f'data:     CIFAR-10 (JPEG q75 copy) in data/cifar10-jpeg, unpacked from {tar}' in out.stdout
    assert '--dataset' not in out.stdout
    out = _dry(repo, CIFAR10_JPEG_TAR=str(tar), CIFAR10_SOURCE='torchvision')  # forced
    assert 'CIFAR-10 (original, torchvision)' in out.stdout and TORCHVISION_ARGS in out.stdout


def test_without_the_jpeg_copy_it_trains_on_torchvision_cifar10(tmp_path):
    """A user's machine: no ../shared. The command train.py gets reads torchvision's CIFAR-10 instead."""
    repo = _repo_with_recipe(tmp_path)
    out = _dry(repo, CIFAR10_JPEG_TAR=str(tmp_path / 'absent.tar.gz'))
    assert out.returncode == 0, out.stderr
    assert 'data:     CIFAR-10 (original, torchvision) in data/cifar10, downloaded first' in out.stdout
    assert TORCHVISION_ARGS in out.stdout
    (repo / 'data' / 'cifar10' / 'cifar-10-batches-py').mkdir(parents=True)  # already there: no download
    assert 'in data/cifar10, already there' in _dry(repo, CIFAR10_JPEG_TAR=str(tmp_path / 'absent')).stdout


def test_forcing_the_jpeg_copy_without_it_is_a_one_line_error(tmp_path):
    repo = _repo_with_recipe(tmp_path)
    out = _dry(repo, CIFAR10_JPEG_TAR=str(tmp_path / 'absent.tar.gz'), CIFAR10_SOURCE='jpeg')
    assert out.returncode == 1 and out.stderr.count('\n') == 1
    assert 'set CIFAR10_JPEG_TAR=' in out.stderr and 'CIFAR10_SOURCE=torchvision' in out.stderr
    out = _dry(repo, CIFAR10_SOURCE='bogus')
    assert out.returncode == 2 and 'must be jpeg, torchvision or auto' in out.stderr


def test_a_run_keeps_the_data_it_started_with(tmp_path):
    """The JPEG copy and the original binaries are different test sets: a run never switches."""
    repo = _repo_with_recipe(tmp_path)
    run_dir = repo / 'runs' / 'resnet164_spe-cifar10_e164'  # the default recipe's run
    run_dir.mkdir(parents=True)
    (run_dir / 'data_source').write_text('jpeg\n')
    out = _dry(repo, CIFAR10_JPEG_TAR=str(tmp_path / 'absent.tar.gz'))
    assert out.returncode == 2 and "trained on 'jpeg' data" in out.stderr and 'CIFAR10_SOURCE=jpeg' in out.stderr


def _step(epoch, step, mean, steps=390):
    """One of train.py's step lines: ``Time: <this step>s, <rate>/s  (<running mean>s, <rate>/s)``."""
    return (f'Train: {epoch} [{step:>4d}/{steps} ({100 * step // steps:>3d}%)]  Loss: 0.300 (0.310)  Time: 9.000s,   '
            f'14.22/s  ({mean:.3f}s,   {128 / mean:.2f}/s)  LR: 1.000e-01  Data: 0.004 (0.010)\n')


def _eval(step, mean, last=99):
    return (f'Test: [{step:>4d}/{last}]  Time: 0.500 ({mean:.3f})  Loss:   0.500 ( 0.500)  Acc@1:  85.000 ( 85.000)  '
            f'Acc@5: 100.000 (100.000)\n')


CPU, GPU = ('Training with a single process on 1 device (cpu).\n', 'Training with a single process on 1 device (cuda).\n')
# epochs 1 and 2 on the CPU (2.0 and 3.0 s per step), epoch 3 stopped part-way and redone on the GPU (0.15 s), epoch 4
# stopped during its eval on the GPU and redone on the CPU (2.5 s); every eval 100 batches of 0.6 s (0.015 s on the GPU)
TIMED_LOG = (CPU + _step(0, 0, 9.0) + _step(0, 389, 2.0) + _eval(0, 0.6) + _eval(99, 0.6)
             + _step(1, 389, 3.0) + _eval(99, 0.6) + _step(2, 200, 2.2)
             + GPU + "Loaded checkpoint 'runs/r/last.pth.tar' (epoch 1)\n" + _step(2, 389, 0.15) + _eval(99, 0.015)
             + _step(3, 389, 0.2) + _eval(50, 0.015)
             + CPU + _step(3, 389, 2.5) + _eval(99, 0.6))


def test_minutes_per_epoch_are_train_py_logged_step_times_times_steps_plus_the_eval(tmp_path):
    """An epoch takes its last step's running mean times its 390 steps plus its eval batches' mean times 100, on the
    device of the process that finished it; a part of an epoch (stopped before its last step or during its eval)
    counts for nothing."""
    from timm_spe.train_run import minutes_per_epoch
    log = tmp_path / 'train.log'
    log.write_text(TIMED_LOG)
    minutes = minutes_per_epoch(log)
    assert sorted(minutes) == [1, 2, 3, 4]
    assert minutes[1] == ('cpu', pytest.approx((2.0 * 390 + 0.6 * 100) / 60))  # 14 min
    assert minutes[2] == ('cpu', pytest.approx((3.0 * 390 + 0.6 * 100) / 60))  # 20.5 min
    assert minutes[3] == ('cuda', pytest.approx((0.15 * 390 + 0.015 * 100) / 60))  # 1 min
    assert minutes[4] == ('cpu', pytest.approx((2.5 * 390 + 0.6 * 100) / 60))  # 17.25 min, not the GPU's try


def test_the_expected_time_is_the_median_epoch_per_device_times_the_epochs_to_go(tmp_path):
    from timm_spe.train_run import expected_time
    log = tmp_path / 'train.log'
    log.write_text(TIMED_LOG)
    how = f"(train.py's logged step and eval times in {log}; process start-up and checkpoint saving not counted)"
    assert expected_time(log, 10) == (
        'expected: ~17 min per epoch on 2 CPU cores (median of 3 epochs), ~1.0 min on one GPU (median of 1) '
        f'-> 10 epochs: ~2.9 h on 2 CPU cores, ~10 min on one GPU {how}')  # 17.25 min x 10; 1 min x 10
    assert expected_time(log, 10, done=4).endswith(f'-> 6 of 10 epochs to go: ~1.7 h on 2 CPU cores, ~6.0 min on '
                                                   f'one GPU {how}')
    assert expected_time(log, 10, done=10).endswith(f'-> all 10 epochs done {how}')
    log.write_text(CPU + _step(0, 200, 2.0))  # no epoch finished: no figure
    assert expected_time(log, 10) == ''


def test_the_dry_run_gives_the_expected_time_from_the_recipes_record_and_none_without_one(tmp_path):
    """./run.sh train reads the time per epoch from train_runs/<recipe>/train.log, the record of the run that made
    the recipe's shipped weights, and counts only the epochs its own run still has to train; a recipe without such a
    record gets no time at all."""
    repo = _repo_with_recipe(tmp_path)
    record = repo / 'train_runs' / 'resnet164_spe-cifar10_e164'
    record.mkdir(parents=True)
    (record / 'train.log').write_text(TIMED_LOG)
    venv = {'VENV': sys.prefix}  # this environment's python, which imports timm_spe
    out = _dry(repo, **venv)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[2] == 'run dir:  runs/resnet164_spe-cifar10_e164 (new run)'
    assert lines[3] == (
        'expected: ~17 min per epoch on 2 CPU cores (median of 3 epochs), ~1.0 min on one GPU (median of 1) -> 164 '
        "epochs: ~47 h on 2 CPU cores, ~2.7 h on one GPU (train.py's logged step and eval times in "
        'train_runs/resnet164_spe-cifar10_e164/train.log; process start-up and checkpoint saving not counted)')
    run_dir = repo / 'runs' / 'resnet164_spe-cifar10_e164'
    run_dir.mkdir(parents=True)
    (run_dir / 'last.pth.tar').write_bytes(b'')
    (run_dir / 'summary.csv').write_text('epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n'
                                         + ''.join(f'{e},1.0,1.0,50,90,0.1\n' for e in range(64)))
    assert '-> 100 of 164 epochs to go: ~29 h on 2 CPU cores, ~1.7 h on one GPU' in _dry(repo, **venv).stdout
    out = _dry(repo, RECIPE, **venv)  # no train_runs/resnet164_spe-cifar10_e30/ here
    assert out.returncode == 0 and 'expected' not in out.stdout and ' min' not in out.stdout and ' h ' not in out.stdout
    out = _dry(repo, VENV=str(tmp_path / 'no-venv'))  # before ./run.sh setup: where the time will come from
    assert out.returncode == 0 and 'expected: (./run.sh setup first: timm-spe reads the time per epoch from ' \
        'train_runs/resnet164_spe-cifar10_e164/train.log)' in out.stdout


def test_run_status_expected_from_needs_the_recipe_and_an_existing_log(tmp_path, capsys):
    from timm_spe.cli import main as cli
    log = tmp_path / 'train.log'
    log.write_text(TIMED_LOG)
    cli(['run-status', str(tmp_path / 'run'), '--recipe', str(ROOT / RECIPE), '--expected-from', str(log)])
    assert capsys.readouterr().out.startswith('expected: ~17 min per epoch on 2 CPU cores (median of 3 epochs), ~1.0 '
                                              'min on one GPU (median of 1) -> 30 epochs: ~8.6 h on 2 CPU cores, ')
    for args, message in ((['--expected-from', str(log)], '--expected-from needs --recipe'),
                          (['--recipe', str(ROOT / RECIPE), '--expected-from', str(tmp_path / 'nope.log')],
                           "--expected-from: no '")):
        with pytest.raises(SystemExit, match=f'^timm-spe run-status: error: {message}'):  # one line, exit status 1
            cli(['run-status', str(tmp_path), *args])


def test_torchvision_cifar10_download_where_the_network_allows(tmp_path):
    """The network part of the torchvision route; skipped where the download host cannot be reached."""
    import socket
    try:
        socket.create_connection(('www.cs.toronto.edu', 443), timeout=3).close()
    except OSError:
        pytest.skip('no network to the CIFAR-10 download host')
    import torchvision
    ds = torchvision.datasets.CIFAR10(str(tmp_path), train=False, download=True)
    assert len(ds) == 10000 and ds.classes[0] == 'airplane'


def test_run_sh_setup_0_uses_the_given_environment_as_it_is_or_says_what_is_missing(tmp_path):
    """A GPU machine's own PyTorch (no package index): RUN_SH_SETUP=0 installs nothing and checks the imports."""
    env = {**os.environ, 'RUN_SH_SETUP': '0', 'PYTHONPATH': str(ROOT)}
    ok = subprocess.run(['bash', 'run.sh', 'setup'], cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env={**env, 'VENV': sys.prefix})
    assert ok.returncode == 0 and ok.stderr == '', ok.stderr
    missing = subprocess.run(['bash', 'run.sh', 'setup'], cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env={**env, 'VENV': str(tmp_path / 'nothing')})
    assert missing.returncode == 1
    assert missing.stderr.count('\n') == 1 and 'RUN_SH_SETUP=0, but' in missing.stderr and 'set VENV' in missing.stderr
