""" Plots for training runs: the curve from timm train.py's summary.csv (and, optionally, its log) """
import csv
import re
from pathlib import Path
from typing import Dict, List, Optional, Union

__all__ = ['read_summary', 'read_train_log', 'plot_training_curve']

PathLike = Union[str, Path]
_LOG_LINE = re.compile(r'Train: (\d+) \[\s*(\d+)/(\d+)[^\]]*\]\s+Loss:\s+([\d.]+)')


def read_summary(path: PathLike) -> List[Dict[str, float]]:
    """Rows of train.py's ``summary.csv`` (epoch, train_loss, eval_loss, eval_top1, eval_top5, lr) as floats."""
    with open(path, newline='') as f:
        rows = [{k: float(v) for k, v in row.items() if v not in ('', None)} for row in csv.DictReader(f)]
    if not rows:
        raise ValueError(f'{path} has no rows: is it the summary.csv of a train.py run that finished an epoch?')
    return rows


def read_train_log(path: PathLike) -> List[Dict[str, float]]:
    """Per-step training loss from train.py's console log: ``[{'epoch': fractional epoch, 'loss': ...}]``."""
    points = []
    for line in Path(path).read_text(errors='replace').splitlines():
        m = _LOG_LINE.search(line)
        if m:
            epoch, step, steps, loss = int(m[1]), int(m[2]), int(m[3]), float(m[4])
            points.append({'epoch': epoch + step / steps, 'loss': loss})
    return points


def plot_training_curve(summary_csv: PathLike, out_png: PathLike, log: Optional[PathLike] = None,
                        title: str = '') -> Path:
    """Loss (train per step if ``log`` is given, train/eval per epoch) and eval top-1 vs epoch."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    rows = read_summary(summary_csv)
    epochs = [r['epoch'] + 1 for r in rows]  # summary rows are written at the end of each epoch
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    if log is not None:
        steps = read_train_log(log)
        if steps:
            ax_loss.plot([p['epoch'] for p in steps], [p['loss'] for p in steps], lw=0.8, alpha=0.5,
                         label='train loss (logged steps)')
    ax_loss.plot(epochs, [r['train_loss'] for r in rows], 'o-', label='train loss (epoch mean)')
    ax_loss.plot(epochs, [r['eval_loss'] for r in rows], 's-', label='test loss')
    ax_loss.set_xlabel('epoch')
    ax_loss.set_ylabel('cross-entropy')
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_acc.plot(epochs, [r['eval_top1'] for r in rows], 'o-', label='top-1')
    if 'eval_top5' in rows[0]:
        ax_acc.plot(epochs, [r['eval_top5'] for r in rows], 's-', label='top-5')
    ax_acc.set_xlabel('epoch')
    ax_acc.set_ylabel('test accuracy (%)')
    ax_acc.legend()
    ax_acc.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
