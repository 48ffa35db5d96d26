"""The resume state of a ``./run.sh train`` run: ``runs/<recipe>/`` (``last.pth.tar``, ``summary.csv``,
``args.yaml``, ``train.log``; the committed records of the shipped weights' runs are ``train_runs/<recipe>/``), a
one-line status of where the run stands, and how long an epoch took in a run's log.

train.py appends one ``summary.csv`` row per finished epoch and writes the header again on every resume,
so the rows are read here with repeated headers dropped and a re-run epoch kept once (its latest row).
"""
import csv
import io
import re
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

__all__ = ['read_summary', 'best_epoch', 'completed_epochs', 'run_status', 'run_dir_of', 'epochs_by_device',
           'describe_devices', 'device_ranges_text', 'resumed_epochs', 'describe_resumes', 'recipe_header', 'summary_csv_text',
           'minutes_per_epoch', 'expected_time']

# train.py's first line of every (re)start: its device count and type
_DEVICE = re.compile(r'Training with .* on (\d+) devices? \((\w+)')
_TRAIN = re.compile(r'^Train: (\d+) \[')
_LAST_EVAL_STEP = re.compile(r'^Test: \[\s*(\d+)/(\d+)\]')
_RESUMED = re.compile(r"^Loaded checkpoint '.*' \(epoch (\d+)\)")  # train.py --resume; epoch counts from 0
_RESEEDED = re.compile(r'^run\.sh: resuming with --seed \d+')  # run.sh's line before such a start
# train.py's step lines: 'Train: E [ i/n (..%)] ... Time: <this step>s, <rate>/s  (<running mean>s, <rate>/s) ...',
# the running mean over the steps of this epoch in this process; its eval lines: 'Test: [ i/last] Time: <this> (<mean>)'
_STEP_TIME = re.compile(r'^Train: (\d+) \[\s*(\d+)/(\d+) .*?Time: [\d.]+s,\s*[\d.]+/s\s*\(\s*([\d.]+)s,')
_EVAL_TIME = re.compile(r'^Test: \[\s*(\d+)/(\d+)\]\s+Time: [\d.]+ \(\s*([\d.]+)\)')
# The CPU of the committed records (train_runs/<recipe>/train.log): this project's 2-core machine. train.py's log
# names only the device type ("cpu"), so this is said here, once.
RECORD_CPU = '2 CPU cores'


def run_dir_of(recipe: Union[str, Path], output: str = 'runs') -> Path:
    """``runs/<recipe file name without .yaml>``: where ``./run.sh train RECIPE`` keeps the run (``output``:
    its ``TRAIN_RUNS``)."""
    return Path(output) / Path(recipe).stem


def read_summary(path: Union[str, Path]) -> List[Dict[str, float]]:
    """train.py's ``summary.csv`` as one dict per epoch (floats; ``epoch`` an int), in epoch order."""
    rows: Dict[int, Dict[str, float]] = {}
    header: Optional[List[str]] = None
    with open(path, newline='') as f:
        for line in csv.reader(f):
            if not line:
                continue
            if line[0] == 'epoch':
                header = line
                continue
            if header is None:
                raise ValueError(f'{path}: a row before the header line; is this train.py\'s summary.csv?')
            row = {k: float(v) for k, v in zip(header, line) if v != ''}
            row['epoch'] = int(row['epoch'])
            rows[row['epoch']] = row
    if not rows:
        raise ValueError(f'{path} has no rows: is it the summary.csv of a train.py run that finished an epoch?')
    return [rows[e] for e in sorted(rows)]


def best_epoch(rows: List[Dict[str, float]]) -> Optional[Tuple[int, float]]:
    """``(epoch, top-1)`` of the row with the highest ``eval_top1`` (the epoch counted from 1, the earliest of a tie),
    or ``None`` without one: what a protocol that reports the best epoch on its eval split would report."""
    scored = [r for r in rows if 'eval_top1' in r]
    if not scored:
        return None
    best = max(scored, key=lambda r: (r['eval_top1'], -r['epoch']))
    return best['epoch'] + 1, best['eval_top1']


def summary_csv_text(path: Union[str, Path], until_epoch: Optional[int] = None) -> str:
    """train.py's ``summary.csv`` as one table: one header, one row per epoch (the last one written, as
    :func:`read_summary`), in epoch order, only the first ``until_epoch`` epochs; values as train.py wrote them.

    A resumed train.py appends a second header line, and an epoch redone after a stop appends its row again:
    the copy published with the weights should read as the single run it is.
    """
    read_summary(path)  # the same checks (a header first, some rows)
    header: Optional[List[str]] = None
    rows: Dict[int, List[str]] = {}
    with open(path, newline='') as f:
        for line in csv.reader(f):
            if not line:
                continue
            if line[0] == 'epoch':
                header = header or line
                continue
            epoch = int(float(line[0]))
            if until_epoch is None or epoch < until_epoch:  # train.py counts epochs from 0
                rows[epoch] = line
    out = io.StringIO()
    writer = csv.writer(out, lineterminator='\n')
    writer.writerow(header)
    writer.writerows(rows[e] for e in sorted(rows))
    return out.getvalue()


def completed_epochs(run_dir: Union[str, Path]) -> List[Dict[str, float]]:
    """The run's ``summary.csv`` rows (see :func:`read_summary`), or ``[]`` before its first epoch has finished."""
    summary = Path(run_dir) / 'summary.csv'
    if not summary.is_file():
        return []
    try:
        return read_summary(summary)
    except ValueError:
        return []


def run_status(run_dir: Union[str, Path], epochs: Optional[int] = None) -> str:
    """``epoch k/N, train loss x, top-1 so far y % (last epoch), best z %``: the last completed epoch of a run."""
    rows = completed_epochs(run_dir)
    if not rows:
        return f'{run_dir}: no completed epoch yet'
    last = rows[-1]
    total = f'/{epochs}' if epochs else ''
    text = f"{run_dir}: epoch {last['epoch'] + 1}{total} done, train loss {last['train_loss']:.4f}"
    if 'eval_top1' in last:
        text += f", top-1 {last['eval_top1']:.2f} % at this epoch (eval_loss {last['eval_loss']:.4f})"
    return text


def epochs_by_device(log: Union[str, Path]) -> List[Tuple[str, int, int]]:
    """Which device trained which epochs, from train.py's console log of a run that may have been resumed on other
    machines: ``[(device, first, last), ...]`` with 1-based epochs, one entry per contiguous range. An epoch counts
    where its evaluation finished (an epoch lost mid-way and run again counts once, where it completed)."""
    device, epoch, done = None, None, {}
    for line in Path(log).read_text(errors='replace').splitlines():
        m = _DEVICE.search(line)
        if m:
            device, epoch = m[2], None
            continue
        m = _TRAIN.match(line)
        if m:
            epoch = int(m[1])
            continue
        m = _LAST_EVAL_STEP.match(line)
        if m and m[1] == m[2] and device is not None and epoch is not None:
            done[epoch + 1] = device
    ranges: List[Tuple[str, int, int]] = []
    for e in sorted(done):
        if ranges and ranges[-1][0] == done[e] and ranges[-1][2] == e - 1:
            ranges[-1] = (done[e], ranges[-1][1], e)
        else:
            ranges.append((done[e], e, e))
    return ranges


def resumed_epochs(log: Union[str, Path]) -> List[Tuple[int, bool]]:
    """The epochs a resumed train.py process trained first, from the run's log: ``[(epoch, reseeded), ...]``,
    1-based, for the starts whose first epoch finished (a start stopped mid-epoch trained nothing that was kept).

    train.py seeds its RNGs at every start, so a resume with the recipe's seed draws the same sample order (and,
    with the same number of loader workers, the same augmentation) as the run's first epoch: ``reseeded`` is False
    for those. ``./run.sh train`` gives resumes a seed of their own and says so in the log (``run.sh: resuming with
    --seed N``); runs resumed before it did replayed their first epoch's draw at every resume.
    """
    pending, reseeded, start, epoch, done = False, False, None, None, {}
    for line in Path(log).read_text(errors='replace').splitlines():
        if _RESEEDED.match(line):  # run.sh prints it just before train.py starts
            pending = True
        elif _DEVICE.search(line):  # a train.py (re)start
            reseeded, pending, start, epoch = pending, False, None, None
        elif (m := _RESUMED.match(line)):
            start = (int(m[1]) + 1, reseeded)
        elif (m := _TRAIN.match(line)):
            epoch = int(m[1])
        elif (m := _LAST_EVAL_STEP.match(line)) and m[1] == m[2] and start is not None and epoch == start[0]:
            done[epoch + 1] = start[1]
            start = None
    return sorted(done.items())


def describe_resumes(resumes: List[Tuple[int, bool]]) -> str:
    """The card's words for :func:`resumed_epochs` (``''`` for a run never resumed)."""
    if not resumes:
        return ''
    replayed = [e for e, reseeded in resumes if not reseeded]
    text = f"resumed {len(resumes)} time{'s' if len(resumes) > 1 else ''} (train.py --resume; train.py's log)"
    if len(replayed) == 1:
        text += (f"; epoch {replayed[0]} began a new train.py process seeded with the recipe's seed, so it repeated "
                 f"the sample order of epoch 1")
    elif replayed:
        text += (f"; epochs {', '.join(map(str, replayed))} each began a new train.py process seeded with the "
                 f"recipe's seed, so they repeated the sample order of epoch 1 ({len(replayed) + 1} epochs in one "
                 f"order)")
    if replayed:
        text += ' (./run.sh train reseeds resumes since this was found)'
    return text


def device_ranges_text(ranges: List[Tuple[str, int, int]]) -> str:
    """:func:`epochs_by_device`'s ranges in words: ``'1-7 on cuda, 8-30 on cpu'``."""
    return ', '.join(f"{a}-{b} on {d}" if a != b else f"{a} on {d}" for d, a, b in ranges)


def describe_devices(ranges: List[Tuple[str, int, int]]) -> str:
    """``'epochs 1-7 on cuda, 8-30 on cpu'`` (or ``''``), and on CUDA the precision that train.py actually used."""
    if not ranges:
        return ''
    text = 'epochs ' + device_ranges_text(ranges) + " (train.py's log)"
    if any(d == 'cuda' for d, _, _ in ranges):
        text += ('; on cuda train.py sets `torch.backends.cuda.matmul.allow_tf32 = True` and PyTorch\'s '
                 '`torch.backends.cudnn.allow_tf32` defaults to True, so those epochs ran their convolutions and '
                 'matmuls in TF32 (10-bit mantissa inputs, fp32 accumulation), not strict fp32')
    return text


def recipe_header(recipe: Union[str, Path]) -> List[str]:
    """The comment lines a recipe YAML starts with (without ``# ``): its own notes, e.g. why and how it differs
    from the paper's recipe."""
    lines = []
    for line in Path(recipe).read_text().splitlines():
        if not line.startswith('#'):
            break
        lines.append(line[1:].removeprefix(' '))
    return lines


def minutes_per_epoch(log: Union[str, Path]) -> Dict[int, Tuple[str, float]]:
    """``{epoch: (device, minutes)}`` (1-based epochs) from train.py's logged step times in a run's console log:
    the running mean step time at the epoch's last training step times its steps, plus the mean time of its eval
    batches times their number. Only what train.py times: a process's start-up, the loaders' start per epoch and
    checkpoint saving are not in it. An epoch counts where its eval finished (a redone one: its last try);
    ``device`` is ``'cpu'``, ``'cuda'``, or ``'4 cuda'`` for a start on 4 devices."""
    device, pending, out = None, None, {}
    for line in Path(log).read_text(errors='replace').splitlines():
        m = _DEVICE.search(line)
        if m:  # a train.py (re)start: a step mean of the process before it is no epoch's
            device, pending = (m[2] if m[1] == '1' else f'{m[1]} {m[2]}'), None
            continue
        m = _STEP_TIME.match(line)
        if m:
            epoch, step, steps, mean = int(m[1]), int(m[2]), int(m[3]), float(m[4])
            pending = (epoch, mean * steps) if step == steps - 1 else None
            continue
        m = _EVAL_TIME.match(line)
        if m and m[1] == m[2] and pending is not None and device is not None:
            out[pending[0] + 1] = (device, (pending[1] + float(m[3]) * (int(m[2]) + 1)) / 60)
            pending = None
    return out


def _device_words(device: str) -> str:
    count, _, kind = device.rpartition(' ')
    if kind == 'cpu':
        return RECORD_CPU
    if kind == 'cuda':
        return f'{count} GPUs' if count else 'one GPU'
    return f'{count} {kind}' if count else kind


def _minutes(minutes: float) -> str:
    return f'~{minutes:.1f} min' if minutes < 9.95 else f'~{minutes:.0f} min'


def _duration(minutes: float) -> str:
    if minutes < 90:
        return _minutes(minutes)
    hours = minutes / 60
    return f'~{hours:.1f} h' if hours < 9.95 else f'~{hours:.0f} h'


def expected_time(log: Union[str, Path], epochs: int, done: int = 0) -> str:
    """One line: the median minutes per epoch on each device of a run's ``train.log`` (:func:`minutes_per_epoch`)
    and what the ``epochs - done`` epochs still to train take at that pace; ``''`` where the log has no timed
    epoch. ``'expected: ~16 min per epoch on 2 CPU cores (median of 70 epochs), ~1.0 min on one GPU (median of
    12) -> 164 epochs: ~45 h on 2 CPU cores, ~2.7 h on one GPU (train.py's logged step and eval times in LOG; ...)'``
    """
    by_device: Dict[str, List[float]] = {}
    for device, minutes in minutes_per_epoch(log).values():
        by_device.setdefault(device, []).append(minutes)
    if not by_device:
        return ''
    order = sorted(by_device, key=lambda d: (not d.endswith('cpu'), d))  # the recipes' device first
    medians = {d: statistics.median(by_device[d]) for d in order}
    per_epoch = ', '.join(
        f'{_minutes(medians[d])}{" per epoch" if i == 0 else ""} on {_device_words(d)} '
        f'(median of {len(by_device[d])}{" epochs" if i == 0 else ""})' for i, d in enumerate(order))
    left = max(epochs - done, 0)
    if not left:
        what = f'all {epochs} epochs done'
    else:
        what = (f'{epochs} epochs' if not done else f'{left} of {epochs} epochs to go') + ': ' + ', '.join(
            f'{_duration(medians[d] * left)} on {_device_words(d)}' for d in order)
    return (f"expected: {per_epoch} -> {what} (train.py's logged step and eval times in {log}; "
            f"process start-up and checkpoint saving not counted)")
