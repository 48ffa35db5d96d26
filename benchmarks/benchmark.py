"""Benchmark SPE against no attention, SE, ECA and an unfused reference of the authors' formulation.

    python benchmarks/benchmark.py [--out benchmarks/results/results.json] [--plot benchmarks/results/results.png]
                                   [--quick]
    python benchmarks/benchmark.py --compile resnet164,resnet164_spe --out benchmarks/results/results_compile.json
    python benchmarks/benchmark.py --primitives --out benchmarks/results/results_primitives.json
    python benchmarks/benchmark.py --compare benchmarks/results/results_malloc_default.json benchmarks/results/results.json

In one run on one machine, with warm-up and repeated timed runs interleaved across models (median, min-max):
  * eval forward (no grad) and train step (forward + backward + SGD step), batch 128, 32x32, for
    resnet164, resnet164_spe, resnet164_se, resnet164_eca and resnet164 with `UnfusedSpeReference`;
  * the SPE module alone vs timm's SEModule on 128x256x8x8 and 128x64x32x32 (forward; forward+backward);
  * the primitives behind the differences (mean vs max/min, with and without indices; a fresh tensor vs
    in place) on each stage's block output;
  * the machine's float32 GEMM peak (2048^2 ``torch.mm``) in the same run, the FLOPs of a step
    (``torch.utils.flop_counter``) and each model's step as a fraction of that peak;
  * memory of a train step, per model in a fresh subprocess: the bytes autograd saves for backward
    (exact, from saved-tensor hooks) and the peak RSS of two train steps above the RSS with the model
    and batch loaded (what the OS sees; includes gradients, optimizer state and allocator slack).
Rows marked ``+cpu_kernels`` run resnet164_spe (and SpeModule) with timm_spe's optional one-pass CPU kernels
on (``timm_spe.set_cpu_kernels``; built on first use, ``--no-cpu-kernels`` leaves them out); every other row
runs with them off. The last rows repeat resnet164 and resnet164_spe in channels_last (model and batch), as
the train recipes run them; their ratios are to resnet164 in channels_last. Prints a table with ratios to
resnet164 and writes JSON (and a plot). Ratios are given twice: of the medians, and per round (each timed run of a model over
the same round's run of its resnet164, median and spread), which cancels drift between rounds.
"""
import argparse
import datetime
import os
import platform
import sys
from pathlib import Path
from typing import Dict, List, Optional

import timm
import torch

import timm_spe

if not __package__:  # run as a file (python benchmarks/benchmark.py): the package from the repository root, as -m does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import allocator, compiled, full_run, goals, pairs, primitives  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='benchmarks/results/results.json')
    parser.add_argument('--plot', default=None, help='write a PNG of the ratios to resnet164')
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--quick', action='store_true', help='tiny smoke run (batch 8, 1 warm-up, 2 repeats)')
    parser.add_argument('--compile', default=None, metavar='MODELS',
                        help="only this: train steps of these comma-separated models under torch.compile (inductor), "
                             "e.g. 'resnet164,resnet164_spe' (ratios to the first)")
    parser.add_argument('--no-cpu-kernels', action='store_true',
                        help="leave out the rows with timm_spe's one-pass CPU kernels (no C++ compiler here)")
    parser.add_argument('--primitives', action='store_true',
                        help='only this: the primitives table (seconds), written to --out')
    parser.add_argument('--models', default=None, metavar='MODELS',
                        help="only this: eval forward and train step of these comma-separated models and their "
                             "resnet164 baselines, interleaved, written to --out (e.g. 'resnet164_spe +cpu_kernels "
                             "(channels_last)' with many --repeats, to pool with --pool)")
    parser.add_argument('--autocast', default=None, choices=('bfloat16', 'float16'),
                        help='with --models: forward passes under CPU autocast to this dtype (as train.py --amp)')
    parser.add_argument('--pool', nargs='+', default=None, metavar='RESULTS.json',
                        help="only this: the CPU speed goals from the per-round ratios of these full runs pooled, with "
                             "a 95 %% interval of the median and a verdict")
    parser.add_argument('--compare', nargs=2, default=None, metavar=('BEFORE.json', 'AFTER.json'),
                        help='only this: print the medians of two result files side by side (e.g. allocator settings)')
    return parser


def run_meta(args: argparse.Namespace) -> Dict[str, object]:
    """What a timed run records about itself (machine, versions, settings, allocator)."""
    return {
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'machine': f'{platform.processor() or platform.machine()}, {platform.system()} {platform.release()}',
        'cpu_count': os.cpu_count(),
        'torch_threads': torch.get_num_threads(), 'torch': torch.__version__, 'timm': timm.__version__,
        'timm_spe': timm_spe.__version__, 'batch': args.batch, 'warmup': args.warmup, 'repeats': args.repeats,
        'allocator': allocator.allocator_settings(), 'cpu_kernels': not args.no_cpu_kernels,
    }


def main(argv: Optional[List[str]] = None) -> None:
    """One mode per run: the files-only modes (--pool, --compare), --compile, then with this run's meta and the CPU
    kernels built (before anything is timed) --models, --primitives or the full run."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.pool:
        return goals.run_pool(args)
    if args.compare:
        return allocator.run_compare(args)
    if args.quick:
        args.batch, args.warmup, args.repeats = 8, 1, 2
    if args.compile:
        return compiled.run_compile(args, parser)
    meta = run_meta(args)
    if not args.no_cpu_kernels:
        try:
            timm_spe.set_cpu_kernels(True)  # build (or load) once, before anything is timed
        except RuntimeError as e:
            parser.error(f'{e} Or run with --no-cpu-kernels.')
    if args.autocast and not args.models:
        parser.error('--autocast times only the --models pairs (the full run, memory and primitives are float32)')
    if args.models:
        return pairs.run_models(args, parser, meta)
    if args.primitives:
        return primitives.run_primitives(args, meta)
    full_run.run_full(args, meta)


if __name__ == '__main__':
    main()
