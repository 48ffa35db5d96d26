"""The CPU speed goals: the goal tables of benchmarks/README.md (full runs side by side) and ``--pool``'s verdicts from
the per-round ratios of several runs pooled."""
import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from benchmarks.workloads import CHANNELS_LAST, KERNELS

# the CPU speed goals: (row, model, baseline, measurement, goal)
ISSUE_17_GOALS = (
    ('default path, NCHW: eval forward', 'resnet164_spe', 'resnet164', 'eval_forward', 1.05),
    ('default path, NCHW: train step', 'resnet164_spe', 'resnet164', 'train_step', 1.10),
    ('default path, channels_last: train step', 'resnet164_spe' + CHANNELS_LAST, 'resnet164' + CHANNELS_LAST,
     'train_step', 1.15),
    ('+cpu_kernels, NCHW: eval forward (no regression)', 'resnet164_spe' + KERNELS, 'resnet164', 'eval_forward', 1.03),
    ('+cpu_kernels, NCHW: train step (no regression)', 'resnet164_spe' + KERNELS, 'resnet164', 'train_step', 1.06),
    ('+cpu_kernels, channels_last: eval forward', 'resnet164_spe' + KERNELS + CHANNELS_LAST,
     'resnet164' + CHANNELS_LAST, 'eval_forward', 1.05),
    ('+cpu_kernels, channels_last: train step', 'resnet164_spe' + KERNELS + CHANNELS_LAST,
     'resnet164' + CHANNELS_LAST, 'train_step', 1.05),
)


def goals_tables(runs: List[Dict]) -> str:
    """The README's goal tables (NCHW, then channels_last) for full runs' JSON side by side, newest first: ratios of
    the medians with the per-round median in brackets, module medians in ms; a met goal in bold."""
    def ratio(q: Dict, key: str, goal: Optional[float]) -> str:
        v = q[key]
        text = f'**{v:.3f}**' if goal is not None and v <= goal else f'{v:.3f}'
        per_round = q.get(key + '_per_round')
        return text + (f" ({per_round['median']:.3f})" if per_round else '')

    def modules(results: Dict, kernels: bool, shape: str, key: str) -> str:
        times = {row['module']: row[key]['median_ms'] for row in results['modules'] if row['shape'] == shape}
        spe, se = times['SpeModule' + (KERNELS if kernels else '')], times['SEModule']
        text = f'{spe:.2f} vs {se:.2f}'
        return f'**{text}**' if spe <= se else text

    def speedup(v: float) -> str:
        return f'**{v:.2f}x**' if v >= 1.2 else f'{v:.2f}x'

    day = [r['meta']['date'][5:16].replace('T', ' ') for r in runs]
    spe, spe_k = 'resnet164_spe', 'resnet164_spe' + KERNELS
    goal = {(model, kind): g for _, model, _, kind, g in ISSUE_17_GOALS}  # the train and channels_last goals
    rows = [
        ('eval forward <= 1.05', lambda r, k: ratio(r['ratios'][spe_k if k else spe], 'eval_forward', 1.05)),
        (f"train step <= {goal[spe, 'train_step']:.2f} (eager), <= {goal[spe_k, 'train_step']:.2f} (+cpu_kernels)",
         lambda r, k: ratio(r['ratios'][spe_k if k else spe], 'train_step', goal[spe_k if k else spe, 'train_step'])),
        ('peak train memory <= 1.10: saved for backward',
         lambda r, k: ratio({'v': r['ratios'][spe_k if k else spe]['saved_for_backward']}, 'v', 1.10)),
        ('peak train memory <= 1.10: peak RSS growth',
         lambda r, k: ratio({'v': r['ratios'][spe_k if k else spe]['peak_rss_growth']}, 'v', 1.10)),
        ('>= 1.2x faster than the unfused reference, eval',
         lambda r, k: speedup(r['speedup_vs_unfused_cpu_kernels' if k else 'speedup_vs_unfused']['eval_forward'])),
    ]
    for key, what in (('forward', 'forward'), ('forward_backward', 'fwd+bwd')):
        for shape in ('128x256x8x8', '128x64x32x32'):
            rows.append((f'SpeModule <= SEModule, {what}, {shape} (ms)',
                         lambda r, k, shape=shape, key=key: modules(r, k, shape, key)))
    lines = ['| goal | ' + ' | '.join(f'eager {d} | +cpu_kernels {d}' for d in day) + ' |',
             '|---|' + '---|---|' * len(runs)]
    for label, cell in rows:
        lines.append(f'| {label} | ' + ' | '.join(f'{cell(r, False)} | {cell(r, True)}' for r in runs) + ' |')
    cl_k, cl = spe_k + CHANNELS_LAST, spe + CHANNELS_LAST
    cl_rows = [
        (f"+cpu_kernels: train step <= {goal[cl_k, 'train_step']:.2f}",
         lambda r: ratio(r['ratios'][cl_k], 'train_step', goal[cl_k, 'train_step'])),
        (f"+cpu_kernels: eval forward <= {goal[cl_k, 'eval_forward']:.2f}",
         lambda r: ratio(r['ratios'][cl_k], 'eval_forward', goal[cl_k, 'eval_forward'])),
        (f"eager: train step <= {goal[cl, 'train_step']:.2f}",
         lambda r: ratio(r['ratios'][cl], 'train_step', goal[cl, 'train_step'])),
        ('eager: eval forward (no goal)', lambda r: ratio(r['ratios'][cl], 'eval_forward', None)),
    ]
    lines += ['', 'channels_last (the layout every CPU recipe trains in; the CPU speed goals):', '',
              '| goal | ' + ' | '.join(day) + ' |', '|---|' + '---|' * len(runs)]
    for label, cell in cl_rows:
        lines.append(f'| {label} | ' + ' | '.join(cell(r) for r in runs) + ' |')
    return '\n'.join(lines)


def median_interval(values: List[float]) -> Tuple[float, float, float]:
    """The median of ``values`` and a distribution-free 95 % confidence interval for it: the order statistics of
    ranks ``k + 1`` and ``n - k``, ``k`` the largest with ``P(Binomial(n, 1/2) <= k) <= 0.025`` (the whole range
    for up to 8 values)."""
    xs, n = sorted(values), len(values)
    k, tail = 0, 0.
    while k < n and tail + math.comb(n, k) / 2 ** n <= 0.025:
        tail += math.comb(n, k) / 2 ** n
        k += 1
    k = max(k - 1, 0)
    return statistics.median(xs), xs[k], xs[n - 1 - k]


def pooled_goals_table(runs: List[Dict]) -> str:
    """The CPU speed goals from the per-round ratios of several runs pooled (each round: a model's time over its
    resnet164's in the same round), from every run that timed both (full runs, and ``--models`` runs of a few
    pairs): their median, its 95 % interval (:func:`median_interval`) and the verdict it allows: met (the interval
    below the goal), not met (above), not resolved (the goal inside it)."""
    lines = ['| goal | ratio goal | rounds (runs) | median per-round ratio | 95 % interval | verdict |',
             '|---|---:|---:|---:|---|---|']
    for label, model, base, kind, goal in ISSUE_17_GOALS:
        pairs = [(r['models'][model][kind]['times_ms'], r['models'][base][kind]['times_ms'])
                 for r in runs if model in r['models'] and base in r['models']]
        if not pairs:
            continue
        ratios = [t / b for times, base_times in pairs for t, b in zip(times, base_times)]
        median, lo, hi = median_interval(ratios)
        verdict = '**met**' if hi <= goal else 'not met' if lo > goal else 'not resolved'
        lines.append(f'| {label} | <= {goal:.2f} | {len(ratios)} ({len(pairs)}) | {median:.3f} | {lo:.3f}-{hi:.3f} '
                     f'| {verdict} |')
    return '\n'.join(lines)


def run_pool(args: argparse.Namespace) -> None:
    """``--pool RESULTS.json...``: print :func:`pooled_goals_table` of the result files."""
    print(pooled_goals_table([json.loads(Path(f).read_text()) for f in args.pool]))
