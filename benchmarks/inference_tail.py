"""SPE's inference tail inside a model: what the block after BN costs with SPE, per stage, against the plain block.

    python benchmarks/inference_tail.py [--dtype bfloat16|float16|float32] [--batch 128] [--iterations 40]
        [--out F.json]

A middle block per stage of resnet164_spe (eval, batch 128 by default, channels_last, autocast to ``--dtype``): each
iteration runs the block's convolutions and BN on a fresh input, then times, one after the other on a fresh BN output,
what can follow it:

- ``plain``: the plain block's ``x += shortcut`` and in-place ReLU;
- ``one op``: ``timm_spe.spe.spe_add_relu_`` with the CPU kernels on (max/min, Eq. 3, the gate, the tail in one call);
- ``kernel steps``: the same as separate calls (the kernels' max/min, ``mix_weights``, the eager gate and its cast, the
  kernels' fused tail), as the kernels ran it before the one-call op;
- ``default path``: kernels off (``amax``, ``amin``, the eager gate, ``addcmul`` + ``relu_``);
- ``aminmax``: ``torch.aminmax`` over the same H x W views, the one eager op that returns both pools;
- ``pool reads``: ``amax`` and ``amin`` alone, the two reads of the block output that any path without the kernels
  makes (no eager op returns both pools faster): the floor under the default path's cost.

Timed inside the model on purpose: measured in a loop on their own, the small ops cost several times less than between
a block's big passes. Median ms of each after five warm-up iterations, and the ATen ops each dispatches (counted once
more, untimed, with ``profile_step.aten_ops``). Run it with nothing else on the cores.
"""
import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Tuple

import timm
import torch

if not __package__:  # run as a file: the package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timm_spe  # noqa: E402
from benchmarks.profile_step import aten_ops  # noqa: E402
from timm_spe.cpu_kernels import max_min, scale_add_relu_  # noqa: E402
from timm_spe.spe import spe_add_relu_  # noqa: E402
from timm_spe.spe_math import spe_gate  # noqa: E402

STAGES = (('layer1', 64, 32), ('layer2', 128, 16), ('layer3', 256, 8))
WARMUP = 5


def stage_times(block, shortcut: torch.Tensor, iterations: int) -> Tuple[dict, dict]:
    """Median ms of each candidate on this block's fresh BN outputs, and the ATen ops each dispatches (call under
    no_grad and autocast)."""
    spe = block.se
    times = {}

    def kernel_steps(y):
        f_max, f_min = max_min(y)
        gate = spe_gate(f_max, f_min, spe.mix_weights(), spe.w_exc, spe.b_exc, spe.w_rew, spe.b_rew, spe.paper)
        scale_add_relu_(y, shortcut, gate.to(y.dtype).view(y.shape[0], -1, 1, 1))

    def default_path(y):
        with timm_spe.set_cpu_kernels(False):
            gate = spe_gate(y.amax((2, 3)), y.amin((2, 3)), spe.mix_weights(), spe.w_exc, spe.b_exc, spe.w_rew,
                            spe.b_rew, spe.paper)
            torch.addcmul(shortcut, y, gate.to(y.dtype).view(y.shape[0], -1, 1, 1), out=y).relu_()

    def aminmax(y):
        torch.aminmax(y.permute(0, 2, 3, 1).reshape(y.shape[0], -1, y.shape[1]), dim=1)

    def pool_reads(y):
        y.amax((2, 3)), y.amin((2, 3))

    def plain(y):
        y += shortcut
        torch.relu_(y)

    candidates = {'plain': plain, 'one op': lambda y: spe_add_relu_(y, shortcut, spe),
                  'kernel steps': kernel_steps, 'default path': default_path, 'aminmax': aminmax,
                  'pool reads': pool_reads}
    for _ in range(iterations):
        before_bn = block.conv3(block.act2(block.bn2(block.conv2(block.act1(block.bn1(block.conv1(shortcut)))))))
        for name, fn in candidates.items():
            y = block.bn3(before_bn)
            t0 = time.perf_counter()
            fn(y)
            times.setdefault(name, []).append(1e3 * (time.perf_counter() - t0))
    ops = {name: aten_ops(lambda fn=fn: fn(block.bn3(before_bn))) - aten_ops(lambda: block.bn3(before_bn))
           for name, fn in candidates.items()}
    return {name: statistics.median(t[WARMUP:]) for name, t in times.items()}, ops


def measure(dtype: torch.dtype, batch: int, iterations: int) -> Tuple[dict, dict]:
    timm_spe.set_cpu_kernels(True)
    torch.manual_seed(0)
    model = timm.create_model('resnet164_spe').eval().to(memory_format=torch.channels_last)
    results, ops = {}, {}
    for stage, channels, size in STAGES:
        shortcut = torch.randn(batch, channels, size, size).to(dtype).contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast('cpu', dtype=dtype, enabled=dtype != torch.float32):
            results[stage], ops[stage] = stage_times(getattr(model, stage)[5], shortcut, iterations)
        print(stage, '  '.join(f'{name} {ms:.3f} ms ({ops[stage][name]} ops)' for name, ms in results[stage].items()))
    return results, ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float16', 'float32'])
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--iterations', type=int, default=40)
    parser.add_argument('--out', type=Path, default=None)
    args = parser.parse_args()
    if args.iterations <= WARMUP:
        parser.error(f'--iterations must be more than the {WARMUP} warm-up iterations, got {args.iterations}')
    results, ops = measure(getattr(torch, args.dtype), args.batch, args.iterations)
    if args.out:
        meta = {'date': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'machine': platform.machine(), 'torch': torch.__version__,
                'timm': timm.__version__, 'threads': torch.get_num_threads(), 'dtype': args.dtype, 'batch': args.batch,
                'iterations': args.iterations, 'warmup': WARMUP, 'layout': 'channels_last'}
        args.out.write_text(json.dumps({'meta': meta, 'ms_per_block': results, 'aten_ops': ops}, indent=1) + '\n')


if __name__ == '__main__':
    main()
