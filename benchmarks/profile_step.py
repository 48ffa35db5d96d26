"""Where SPE's share of a train step goes: per-op CPU time of resnet164 vs resnet164_spe under ``torch.profiler``.

    python benchmarks/profile_step.py [--channels-last] [--cpu-kernels] [--steps 3] [--batch 128] [--top 25]

Both models' train steps are the benchmark's own (``benchmark.model_workloads``: forward, backward, SGD step on a
fixed random batch); after warm-up they are profiled alternately, one step of each per round, ``--steps`` rounds. Prints, per aten / timm_spe op, the self CPU time per step of each model and the
difference, sorted by the difference: the rows at the top are where resnet164_spe spends the time resnet164 does
not. Wall times are the median of the same profiled steps. Run it with nothing else on the cores.
"""
import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

import timm_spe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import CHANNELS_LAST, KERNELS, model_workloads  # noqa: E402  the benchmark's own train steps


def profile_interleaved(steps: Dict[str, Callable[[], None]], repeats: int
                        ) -> Dict[str, Tuple[Dict[str, Tuple[float, int]], float]]:
    """Per model: (per op name: (self CPU ms per step, calls per step)), and the median wall ms of a step. The
    models' steps alternate, one profiled step each per round, so drift of the machine hits all alike."""
    ops: Dict[str, Dict[str, list]] = {n: defaultdict(lambda: [0., 0.]) for n in steps}
    walls: Dict[str, list] = {n: [] for n in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                step()
                walls[name].append((time.perf_counter() - t0) * 1e3)
            for e in prof.key_averages():
                ops[name][e.key][0] += e.self_cpu_time_total / 1e3 / repeats
                ops[name][e.key][1] += e.count / repeats
    return {n: ({k: (v[0], v[1]) for k, v in ops[n].items()}, statistics.median(walls[n])) for n in steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--channels-last', action='store_true')
    ap.add_argument('--cpu-kernels', action='store_true')
    ap.add_argument('--steps', type=int, default=3)
    ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--batch', type=int, default=128)
    ap.add_argument('--top', type=int, default=25)
    args = ap.parse_args()
    timm_spe.set_cpu_kernels(args.cpu_kernels)  # builds them once, before anything is profiled
    suffix = CHANNELS_LAST if args.channels_last else ''
    names = ['resnet164', 'resnet164_spe']
    workloads = {'resnet164': 'resnet164' + suffix,
                 'resnet164_spe': 'resnet164_spe' + (KERNELS if args.cpu_kernels else '') + suffix}
    steps = {n: model_workloads(w, args.batch)['train_step'] for n, w in workloads.items()}
    for _ in range(args.warmup):
        for fn in steps.values():
            fn()
    results = profile_interleaved(steps, args.steps)
    base, other = names[0], names[-1]
    (b_ops, b_wall), (o_ops, o_wall) = results[base], results[other]
    keys = set(b_ops) | set(o_ops)
    rows = sorted(keys, key=lambda k: o_ops.get(k, (0, 0))[0] - b_ops.get(k, (0, 0))[0], reverse=True)
    layout = 'channels_last' if args.channels_last else 'NCHW'
    print(f'{layout}, cpu kernels {"on" if args.cpu_kernels else "off"}, batch {args.batch}, '
          f'{torch.get_num_threads()} threads; ms per train step (self CPU time; profiler overhead included)')
    print(f'wall: {base} {b_wall:.0f} ms, {other} {o_wall:.0f} ms, ratio {o_wall / b_wall:.3f}')
    print(f'{"op":44s} {base:>12s} {other:>14s} {"diff":>9s} {"calls":>11s}')
    for k in rows[:args.top]:
        b, o = b_ops.get(k, (0., 0)), o_ops.get(k, (0., 0))
        print(f'{k[:44]:44s} {b[0]:12.1f} {o[0]:14.1f} {o[0] - b[0]:9.1f} {b[1]:5.0f}/{o[1]:<5.0f}')
    print(f'(ops where {other} spends less)')
    for k in rows[-5:]:
        b, o = b_ops.get(k, (0., 0)), o_ops.get(k, (0., 0))
        print(f'{k[:44]:44s} {b[0]:12.1f} {o[0]:14.1f} {o[0] - b[0]:9.1f} {b[1]:5.0f}/{o[1]:<5.0f}')


if __name__ == '__main__':
    main()
