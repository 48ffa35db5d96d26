"""SPE's block tail under CPU autocast: what the fused path costs over the plain block's tail, and what the plain ops cost.

    python benchmarks/tail_autocast.py [--dtype bfloat16|float16] [--batch 128] [--rounds 12] [--nchw] [--out F.json]

One block per stage of resnet164_spe (32x32 / 16x16 / 8x8 maps, batch 128, channels_last by default), its tail alone:
forward + backward of ``relu(bn3(x) + shortcut)`` (the plain block), of ``timm_spe.spe.batch_norm_spe_add_relu`` (BN,
SPE, add, ReLU fused: what SPE blocks run in training), of the same with the CPU kernels on (``set_cpu_kernels``: one
pass each for the max/min, the tail, the backward sums and BN's input gradient) and with the fused function switched
off (the plain autograd ops every SPE block ran under autocast before the fused paths took low-precision activations), on a
random activation in the autocast dtype. Interleaved rounds, median ms of each after two warm-up rounds. Convolutions
are left out: on a CPU without native bf16 they dominate a step and hide what SPE adds. Run it with nothing else on
the cores.
"""
import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

if not __package__:  # run as a file: the package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timm_spe  # noqa: E402
import timm_spe.spe as spe_mod  # noqa: E402


def tail_workloads(bn3, spe, x, shortcut, grad, dtype):
    """``{'plain tail': fn, 'SPE fused': fn, 'SPE plain ops': fn}``, each a forward + backward under autocast."""
    plain_bn, spe_bn = copy.deepcopy(bn3), copy.deepcopy(bn3)

    def plain():
        a, s = x.clone().requires_grad_(), shortcut.clone().requires_grad_()
        with torch.autocast('cpu', dtype=dtype):
            out = torch.relu(plain_bn(a) + s)
        out.backward(grad)

    def with_spe(fused, kernels=False):
        def step():
            a, s = x.clone().requires_grad_(), shortcut.clone().requires_grad_()
            fusable = spe_mod._block_tail_fusable
            if not fused:
                spe_mod._block_tail_fusable = lambda *args: False
            try:
                with timm_spe.set_cpu_kernels(kernels):
                    with torch.autocast('cpu', dtype=dtype):
                        out = spe_mod.batch_norm_spe_add_relu(a, s, spe_bn, spe)
                    out.backward(grad)
            finally:
                spe_mod._block_tail_fusable = fusable
        return step

    return {'plain tail': plain, 'SPE fused': with_spe(True), 'SPE fused +cpu_kernels': with_spe(True, True),
            'SPE plain ops': with_spe(False)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float16'))
    ap.add_argument('--batch', type=int, default=128)
    ap.add_argument('--rounds', type=int, default=12, help='interleaved rounds, the first two are warm-up')
    ap.add_argument('--nchw', action='store_true', help='NCHW instead of channels_last')
    ap.add_argument('--out', help='also write the medians as JSON here')
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    layout = torch.contiguous_format if args.nchw else torch.channels_last
    torch.manual_seed(0)
    model = timm.create_model('resnet164_spe').train()
    print(f'{args.dtype} autocast, {"NCHW" if args.nchw else "channels_last"}, batch {args.batch}, '
          f'{torch.get_num_threads()} threads; median ms of forward + backward, {args.rounds - 2} rounds')
    extra = {'SPE fused': 0., 'SPE fused +cpu_kernels': 0., 'SPE plain ops': 0.}
    report = {'dtype': args.dtype, 'layout': 'NCHW' if args.nchw else 'channels_last', 'batch': args.batch,
              'threads': torch.get_num_threads(), 'rounds': args.rounds - 2, 'torch': torch.__version__,
              'cpu': platform.processor() or platform.machine(), 'stages': {}}
    for stage, hw in (('layer1', 32), ('layer2', 16), ('layer3', 8)):
        blocks = getattr(model, stage)
        block = blocks[len(blocks) // 2]
        x = torch.randn(args.batch, block.bn3.num_features, hw, hw).to(dtype).contiguous(memory_format=layout)
        fns = tail_workloads(block.bn3, block.se, x, torch.randn_like(x), torch.randn_like(x), dtype)
        times = {name: [] for name in fns}
        for r in range(args.rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                if r >= 2:
                    times[name].append((time.perf_counter() - t0) * 1e3)
        med = {name: statistics.median(t) for name, t in times.items()}
        for name in extra:
            extra[name] += (med[name] - med['plain tail']) * len(blocks)
        report['stages'][stage] = {'shape': list(x.shape), 'blocks': len(blocks), 'median_ms': med}
        print(f'{stage} {"x".join(map(str, x.shape))}: ' + ', '.join(f'{n} {t:.1f}' for n, t in med.items()))
    print('SPE over the plain tails, all blocks (ms per train step): '
          + ', '.join(f'{name} {ms:.0f}' for name, ms in extra.items()))
    report['spe_over_plain_tails_ms_per_step'] = extra
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(report, f, indent=1)


if __name__ == '__main__':
    main()
