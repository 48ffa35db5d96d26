"""The resume state of a ``./run.sh train`` run: ``train_runs/<recipe>/`` (``last.pth.tar``, ``summary.csv``,
``args.yaml``, ``train.log``), and a one-line status of where the run stands.

train.py appends one ``summary.csv`` row per finished epoch and writes the header again on every resume,
so the rows are read here with repeated headers dropped and a re-run epoch kept once (its latest row).
"""
import csv
from pathlib import Path
from typing import Dict, List, Optional, Union

__all__ = ['read_summary', 'run_status', 'run_dir_of']


def run_dir_of(recipe: Union[str, Path], output: str = 'train_runs') -> Path:
    """``train_runs/<recipe file name without .yaml>``: where ``./run.sh train RECIPE`` keeps the run."""
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


def run_status(run_dir: Union[str, Path], epochs: Optional[int] = None) -> str:
    """``epoch k/N, train loss x, top-1 so far y % (last epoch), best z %``: the last completed epoch of a run."""
    summary = Path(run_dir) / 'summary.csv'
    if not summary.is_file():
        return f'{run_dir}: no completed epoch yet'
    try:
        rows = read_summary(summary)
    except ValueError:
        return f'{run_dir}: no completed epoch yet'
    last = rows[-1]
    total = f'/{epochs}' if epochs else ''
    text = f"{run_dir}: epoch {last['epoch'] + 1}{total} done, train loss {last['train_loss']:.4f}"
    if 'eval_top1' in last:
        text += f", top-1 {last['eval_top1']:.2f} % at this epoch (eval_loss {last['eval_loss']:.4f})"
    return text
