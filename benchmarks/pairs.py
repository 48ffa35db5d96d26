"""``--models MODELS``: eval forward and train step of the named models and their resnet164 baselines only,
interleaved (e.g. one pair with many ``--repeats``, to pool with other runs by ``--pool``)."""
import argparse
from typing import Dict

import torch

from benchmarks.timing import fmt, fmt_ratio, per_round_ratios, write_result
from benchmarks.workloads import MODELS, baseline, bench_models, uses_kernels


def run_models(args: argparse.Namespace, parser: argparse.ArgumentParser, meta: Dict[str, object]) -> None:
    """Time, print (with the per-round ratios to each baseline) and write (``--out``) the named models."""
    names = [n.strip() for n in args.models.split(',')]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f'--models: unknown model(s) {unknown}; choose from {list(MODELS)}')
    if args.no_cpu_kernels and any(uses_kernels(n) for n in names):
        parser.error('--models: a +cpu_kernels model cannot run with --no-cpu-kernels')
    names = list(dict.fromkeys(baseline(n) for n in names)) + [n for n in names if n != baseline(n)]
    autocast = getattr(torch, args.autocast) if args.autocast else None
    result = {'meta': {**meta, 'autocast': args.autocast},
              'models': bench_models(names, args.batch, args.warmup, args.repeats, autocast=autocast)}
    for name in names:
        r, base = result['models'][name], result['models'][baseline(name)]
        print(f"{name}: eval forward {fmt(r['eval_forward'])} ms, train step {fmt(r['train_step'])} ms; per-round "
              f"ratio to {baseline(name)}: {fmt_ratio(per_round_ratios(r['eval_forward'], base['eval_forward']))}"
              f" / {fmt_ratio(per_round_ratios(r['train_step'], base['train_step']))}")
    write_result(args.out, result)
