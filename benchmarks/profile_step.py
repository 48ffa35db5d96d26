"""Where SPE's share of a train step goes: per-op CPU time of resnet164 vs resnet164_spe under ``torch.profiler``.

    python benchmarks/profile_step.py [--channels-last] [--cpu-kernels] [--autocast bfloat16] [--steps 3] [--top 25]
    python benchmarks/profile_step.py --blocks [--channels-last] [--cpu-kernels] [--autocast bfloat16] [--steps 30]

Both models' train steps are the benchmark's own (``benchmarks.workloads.model_workloads``: forward, backward, SGD
step on a fixed random batch); after warm-up they are profiled alternately, one step of each per round, ``--steps`` rounds. Prints, per aten / timm_spe op, the self CPU time per step of each model and the
difference, sorted by the difference: the rows at the top are where resnet164_spe spends the time resnet164 does
not. Wall times are the median of the same profiled steps. Run it with nothing else on the cores.

``--blocks`` times instead, without the profiler, one block per stage (forward + backward of an inner block, no
downsample, on a random input and output gradient of that stage's shape) of both models, interleaved, and scales
each stage's difference by its number of blocks: how much of the step's difference the blocks themselves account
for. ``--blocks --tiny`` does the same on batch 2 of 2 x 2 maps: the blocks' fixed cost per call. Each stage's row
also counts the ops a block's forward + backward dispatches (``aten ops``, resnet164 / resnet164_spe), and the last
line divides each stage's difference by the extra ops: with ``--tiny``, what each op SPE adds costs.

``--autocast bfloat16|float16``: forward passes under CPU autocast to that dtype (blocks: on an input in that dtype,
as the previous block's output is under autocast).
"""
import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import timm_spe

if not __package__:  # run as a file (python benchmarks/profile_step.py): the package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# the benchmark's own models, train steps and interleaved timer
from benchmarks.timing import per_round_ratios, timed_interleaved  # noqa: E402
from benchmarks.workloads import (  # noqa: E402
    CHANNELS_LAST,
    KERNELS,
    create,
    memory_format,
    model_workloads,
    uses_kernels,
)


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


class _CountOps(TorchDispatchMode):
    """Counts the ATen (and timm_spe) ops dispatched while it is active, forward and backward alike."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def aten_ops(fn: Callable[[], None]) -> int:
    """How many ops ``fn`` dispatches (each one costs its dispatch, checks and allocation, however small)."""
    with _CountOps() as mode:
        fn()
    return mode.count


def block_workloads(name: str, batch: int, size: int = 0, autocast: Optional[torch.dtype] = None
                    ) -> Dict[str, Tuple[Callable[[], None], int, str]]:
    """Per stage: (forward + backward of its middle block on a fixed random input and output gradient, the
    stage's number of blocks, the input's shape). The model is in training mode, as in a train step. ``size``:
    maps of ``size x size`` instead of the stage's own (tiny inputs leave a block's fixed cost per call).
    ``autocast``: the forward under CPU autocast to that dtype, input and gradient in it."""
    torch.manual_seed(0)
    model = create(name).train()
    layout = memory_format(name)
    shapes = {}
    stages = [n for n, _ in model.named_children() if n.startswith('layer')]
    hooks = [getattr(model, s)[-1].register_forward_pre_hook(
        lambda m, a, s=s: shapes.__setitem__(s, tuple(a[0].shape))) for s in stages]
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    kernels = uses_kernels(name)
    work = {}
    for stage in stages:
        blocks = getattr(model, stage)
        block = blocks[len(blocks) // 2]
        shape = (batch,) + shapes[stage][1:2] + ((size, size) if size else shapes[stage][2:])
        dtype = autocast or torch.float32
        x = torch.randn(shape).to(dtype).contiguous(memory_format=layout).requires_grad_()
        grad = torch.randn(shape).to(dtype).contiguous(memory_format=layout)

        def fn(block=block, x=x, grad=grad, dtype=dtype):
            timm_spe.set_cpu_kernels(kernels)
            with torch.autocast('cpu', dtype=dtype, enabled=autocast is not None):
                out = block(x)
            out.backward(grad)
        work[stage] = (fn, len(blocks), 'x'.join(map(str, shape)))
    return work


def blocks_main(args, workloads: Dict[str, str]) -> None:
    """Print, per stage, the median ms of one block's forward + backward of each model and the difference
    scaled by the stage's block count."""
    base, other = workloads.values()
    batch, size = (2, 2) if args.tiny else (args.batch, 0)
    per_model = {w: block_workloads(w, batch, size, _autocast(args)) for w in (base, other)}
    layout = 'channels_last' if args.channels_last else 'NCHW'
    print(f'{layout}{_autocast_label(args)}, cpu kernels {"on" if args.cpu_kernels else "off"}, batch {batch}, '
          f'{torch.get_num_threads()} threads; one middle block per stage, forward + backward, median of '
          f'{args.steps} interleaved rounds after {args.warmup} warm-up')
    print(f'{"stage":8s} {"input":16s} {"resnet164":>10s} {"resnet164_spe":>14s} {"diff":>7s} '
          f'{"per round":>10s} {"aten ops":>10s} {"x blocks":>9s}')
    total, per_op = 0., []
    for stage, (fn, count, shape) in per_model[base].items():
        other_fn = per_model[other][stage][0]
        ops = aten_ops(fn), aten_ops(other_fn)
        times = timed_interleaved({base: fn, other: other_fn}, args.warmup, args.steps)
        b, o = times[base]['median_ms'], times[other]['median_ms']
        q = per_round_ratios(times[other], times[base])['median']
        total += (o - b) * count
        per_op.append(f'{(o - b) * 1e3 / (ops[1] - ops[0]):.1f}' if ops[1] > ops[0] else '-')
        print(f'{stage:8s} {shape:16s} {b:10.2f} {o:14.2f} {o - b:7.2f} {q:10.3f} {f"{ops[0]}/{ops[1]}":>10s} '
              f'{(o - b) * count:9.1f}')
    print(f'all blocks: {total:.0f} ms per train step (forward + backward of the blocks alone)')
    print(f'difference per extra op (us): {" / ".join(per_op)}')


def _autocast(args) -> Optional[torch.dtype]:
    return getattr(torch, args.autocast) if args.autocast else None


def _autocast_label(args) -> str:
    return f', {args.autocast} autocast' if args.autocast else ''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--channels-last', action='store_true')
    ap.add_argument('--cpu-kernels', action='store_true')
    ap.add_argument('--steps', type=int, default=3)
    ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--batch', type=int, default=128)
    ap.add_argument('--top', type=int, default=25)
    ap.add_argument('--autocast', choices=('bfloat16', 'float16'), help='forward passes under CPU autocast')
    ap.add_argument('--blocks', action='store_true', help='time one block per stage instead (no profiler)')
    ap.add_argument('--tiny', action='store_true',
                    help='with --blocks: batch 2 of 2 x 2 maps, so that what is timed is each block\'s fixed cost per '
                         'call (Python, dispatch, autograd; the N x C work of batch 2)')
    args = ap.parse_args()
    timm_spe.set_cpu_kernels(args.cpu_kernels)  # builds them once, before anything is profiled
    suffix = CHANNELS_LAST if args.channels_last else ''
    names = ['resnet164', 'resnet164_spe']
    workloads = {'resnet164': 'resnet164' + suffix,
                 'resnet164_spe': 'resnet164_spe' + (KERNELS if args.cpu_kernels else '') + suffix}
    if args.blocks:
        return blocks_main(args, workloads)
    steps = {n: model_workloads(w, args.batch, autocast=_autocast(args))['train_step'] for n, w in workloads.items()}
    for _ in range(args.warmup):
        for fn in steps.values():
            fn()
    results = profile_interleaved(steps, args.steps)
    base, other = names[0], names[-1]
    (b_ops, b_wall), (o_ops, o_wall) = results[base], results[other]
    keys = set(b_ops) | set(o_ops)
    rows = sorted(keys, key=lambda k: o_ops.get(k, (0, 0))[0] - b_ops.get(k, (0, 0))[0], reverse=True)
    layout = 'channels_last' if args.channels_last else 'NCHW'
    print(f'{layout}{_autocast_label(args)}, cpu kernels {"on" if args.cpu_kernels else "off"}, batch {args.batch}, '
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
