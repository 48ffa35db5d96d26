""" Plots and inspection: training curves from train.py's summary.csv / log, learned SPE lambdas """
import re
from pathlib import Path
from typing import Dict, List, Optional, Union

from .train_run import read_summary

__all__ = ['read_summary', 'read_train_log', 'plot_training_curve', 'plot_runs', 'spe_lambdas', 'plot_lambdas']

PathLike = Union[str, Path]
def _pyplot():
    import matplotlib
    matplotlib.use('Agg')  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out_png: PathLike) -> Path:
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    _pyplot().close(fig)
    return out_png


_LOG_LINE = re.compile(r'Train: (\d+) \[\s*(\d+)/(\d+)[^\]]*\]\s+Loss:\s+([\d.]+)')


def read_train_log(path: PathLike) -> List[Dict[str, float]]:
    """Per-step training loss from train.py's console log: ``[{'epoch': fractional epoch, 'loss': ...}]``. A log
    appended to by resumed runs keeps each epoch's last attempt."""
    points = []
    for line in Path(path).read_text(errors='replace').splitlines():
        m = _LOG_LINE.search(line)
        if m:
            epoch, step, steps, loss = int(m[1]), int(m[2]), int(m[3]), float(m[4])
            if points and epoch + step / steps <= points[-1]['epoch']:  # a resumed run repeats the epoch it lost
                points = [p for p in points if p['epoch'] < epoch]
            points.append({'epoch': epoch + step / steps, 'loss': loss})
    return points


def plot_training_curve(summary_csv: PathLike, out_png: PathLike, log: Optional[PathLike] = None,
                        title: str = '', until_epoch: Optional[int] = None) -> Path:
    """Loss (train per step if ``log`` is given, train/eval per epoch) and eval top-1 vs epoch; with
    ``until_epoch``, only epochs 1 to ``until_epoch`` (a run still training has rows and steps past the staged ones)."""
    plt = _pyplot()

    rows = [r for r in read_summary(summary_csv) if until_epoch is None or r['epoch'] < until_epoch]
    epochs = [r['epoch'] + 1 for r in rows]  # summary rows are written at the end of each epoch
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    if log is not None:
        steps = [p for p in read_train_log(log) if until_epoch is None or p['epoch'] < until_epoch]
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
    return _save(fig, out_png)


def plot_runs(summaries: Dict[str, PathLike], out_png: PathLike, title: str = '') -> Path:
    """Several runs' train.py ``summary.csv`` on shared axes, ``{label: path}``: train and test loss, and test top-1,
    per epoch (e.g. an SPE model and its plain control trained with the same recipe)."""
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (label, path) in enumerate(summaries.items()):
        rows = read_summary(path)
        epochs = [r['epoch'] + 1 for r in rows]  # summary rows are written at the end of each epoch
        color = f'C{i}'
        ax_loss.plot(epochs, [r['train_loss'] for r in rows], 'o-', ms=3, color=color, label=f'{label}: train')
        ax_loss.plot(epochs, [r['eval_loss'] for r in rows], 's--', ms=3, color=color, label=f'{label}: test')
        ax_acc.plot(epochs, [r['eval_top1'] for r in rows], 'o-', ms=3, color=color,
                    label=f"{label}: {rows[-1]['eval_top1']:.2f} at epoch {epochs[-1]}")
    ax_loss.set_xlabel('epoch')
    ax_loss.set_ylabel('cross-entropy (epoch mean)')
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    ax_acc.set_xlabel('epoch')
    ax_acc.set_ylabel('test top-1 (%)')
    ax_acc.legend(fontsize=8)
    ax_acc.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, out_png)


def spe_lambdas(model) -> List[Dict[str, object]]:
    """Learned mixing weight ``lambda = p0^2 / (p0^2 + p1^2)`` (weight of max pooling) of every SPE layer; layers
    with a constant ``lam`` (the Table 3 ablation) have nothing learned and are left out."""
    import torch

    from .spe import SpeModule
    from .spe_math import mix_weights
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, SpeModule) and getattr(m, 'p', None) is not None:
            with torch.no_grad():
                lam = mix_weights(m.p.detach().float())
            rows.append({'block': name.rsplit('.se', 1)[0] if name.endswith('.se') else name,
                         'lambda': float(lam[0]), 'p0': float(m.p[0].detach()), 'p1': float(m.p[1].detach())})
    return rows


def plot_lambdas(rows: List[Dict[str, object]], out_png: PathLike, title: str = '') -> Path:
    """Bar plot of lambda per SPE block, stage boundaries marked (block names ``layerS.I``)."""
    plt = _pyplot()

    if not rows:
        raise ValueError('the model has no SPE layers: nothing to plot')
    stages = [str(r['block']).split('.')[0] for r in rows]
    colors = {s: f'C{i}' for i, s in enumerate(dict.fromkeys(stages))}
    fig, ax = plt.subplots(figsize=(max(6., 0.12 * len(rows) + 2), 3.5))
    ax.bar(range(len(rows)), [r['lambda'] for r in rows], color=[colors[s] for s in stages])
    for i in range(1, len(rows)):
        if stages[i] != stages[i - 1]:
            ax.axvline(i - 0.5, color='k', lw=0.8, ls='--')
    from matplotlib.patches import Patch
    handles = [Patch(color=c, label=s) for s, c in colors.items()]
    handles.append(ax.axhline(0.5, color='grey', lw=0.8, ls=':', label='init (0.5)'))
    ax.set_xlabel('SPE block (network order)')
    ax.set_ylabel('lambda (weight of max pool)')
    ax.set_ylim(0, 1)
    ax.legend(handles=handles, ncol=4, fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, out_png)
