"""``--compile MODELS``: train steps of the named models under ``torch.compile`` (inductor), ratios to the first."""
import argparse
import datetime
from typing import Dict, List

import torch
from tqdm import tqdm

from benchmarks.allocator import allocator_settings
from benchmarks.timing import fmt, timed, timed_interleaved, write_result
from benchmarks.workloads import MODELS, model_workloads


def compiled_train_steps(names: List[str], batch: int, warmup: int, repeats: int) -> Dict[str, object]:
    """Train steps of ``torch.compile``d models (inductor), interleaved; compilation happens in the first
    warm-up call of each and is timed separately."""
    work, compile_s = {}, {}
    for name in tqdm(names, desc='compiling'):
        work[name] = model_workloads(name, batch, compiled=True)['train_step']
        compile_s[name] = timed(work[name])
    times = timed_interleaved(work, max(warmup - 1, 0), repeats)
    base = times[names[0]]['median_ms']
    return {'train_step': times, 'first_call_s': compile_s, 'ratios': {n: t['median_ms'] / base for n, t in times.items()}}


def run_compile(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Time, print and write (``--out``) the compiled train steps of ``--compile``'s models, with their own meta."""
    names = args.compile.split(',')
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f'--compile: unknown model(s) {unknown}; choose from {list(MODELS)}')
    result = compiled_train_steps(names, args.batch, args.warmup, args.repeats)
    result['meta'] = {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                      'torch_threads': torch.get_num_threads(), 'torch': torch.__version__, 'batch': args.batch,
                      'warmup': args.warmup, 'repeats': args.repeats, 'allocator': allocator_settings()}
    for n in names:
        print(f"{n}: first call (compile) {result['first_call_s'][n]:.0f} s, train step "
              f"{fmt(result['train_step'][n])} ms, ratio to {names[0]} {result['ratios'][n]:.3f}")
    write_result(args.out, result)
