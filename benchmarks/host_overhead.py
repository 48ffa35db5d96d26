"""Host time of one block tail's forward + backward where dispatch dominates: the eager GPU step's overhead, by proxy.

    python benchmarks/host_overhead.py [--quick] [--device cpu|cuda] [--rounds 30] [--calls 10] [--nchw] [--threads 1]
                                       [--out F.json]

On a GPU the eager resnet164 train step is bound by the host (``benchmarks/results/cuda_profile_h200.log``: 69 ms of
wall time for 19.5 ms of GPU work), so what an SPE block costs there is mostly the host time of its tail. This times
that tail alone, forward + backward, on tiny tensors (batch 2, 8 x 8 maps) where the kernels' own work is negligible,
at each resnet164 stage's width (64 / 128 / 256 channels; channels_last unless ``--nchw``):

- ``plain``: resnet164's tail, ``relu(bn3(x) + shortcut)``;
- ``se``: resnet164_se's, ``relu(se(bn3(x)) + shortcut)`` (timm's SEModule);
- ``spe stock``: resnet164_spe's on the stock ops (``set_triton_kernels(False)``: the fused autograd function);
- ``spe triton, custom ops``: on the Triton kernels, each launch through its ``torch.ops.timm_spe`` custom op (as
  ``torch.compile`` calls them, and eager code did before);
- ``spe triton, direct``: on the Triton kernels launched directly, the eager default.

On the CPU (the default device) every Triton launch is replaced by a no-op stub with the same arguments: Triton's
interpreter would time numpy, not a launch. The two Triton rows then time only the layers around the launches (the
autograd functions, the allocations, the checks, the custom ops' dispatch), not the launches themselves (a bare one
took 20.5 us of host time on an H200, ``cuda_profile_h200.log``) and no kernel: a proxy for the host work on a GPU,
not a GPU timing, and the CPU's ATen ops are not CUDA's. ``launches per tail`` says how many launches to add back.
With ``--device cuda`` the kernels run for real, launches included; the GPU is synchronised only at the end of each
timed batch of ``--calls`` tails, so with these tensors what is timed is the host.

Medians over ``--rounds`` interleaved rounds (``benchmarks.timing.timed_interleaved``), in microseconds per tail, and
per train step: each tail's excess over ``plain`` times resnet164's 18 blocks per stage. ``--quick`` (3 rounds of 1
call, seconds) only checks that it runs. One intra-op thread by default (``--threads``): the work is dispatch, which
a GPU step's one host thread does, and tiny ops split over threads time their synchronisation. Run it with nothing
else on the cores; ``--out`` also writes the JSON.
"""
import argparse
import os
import platform
import sys
from contextlib import contextmanager
from pathlib import Path

import timm
import torch

if not __package__:  # run as a file: the package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timm_spe  # noqa: E402
from benchmarks.timing import timed_interleaved, write_result  # noqa: E402
from timm_spe import spe_triton  # noqa: E402
from timm_spe.spe import batch_norm_spe_add_relu  # noqa: E402

STAGES = (('layer1', 64), ('layer2', 128), ('layer3', 256))
BLOCKS_PER_STAGE = 18  # resnet164: (164 - 2) / 9
KERNELS = ('_tail_kernel', '_sums_kernel', '_dot_kernel', '_gate_backward_kernel', '_mix_backward_kernel',
           '_input_grad_kernel')


class _NoLaunch:
    """A Triton kernel's ``kernel[grid](*args, **constexprs)`` that launches nothing and counts the calls."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        self.launches += 1


def _as_is(kernel):
    return kernel


@contextmanager
def stubbed_launches():
    """The Triton kernels of ``timm_spe._triton_ops`` replaced by :class:`_NoLaunch` stubs (CPU tensors taken, as under
    the interpreter); yields the stubs."""
    from timm_spe import _triton_ops
    stubs = {name: _NoLaunch() for name in KERNELS}
    saved = {name: getattr(_triton_ops, name) for name in KERNELS}
    wrap = _triton_ops.wrap_triton
    interpret = os.environ.get('TRITON_INTERPRET')
    os.environ['TRITON_INTERPRET'] = '1'  # spe_triton.applies takes CPU tensors only under the interpreter
    try:
        for name, stub in stubs.items():
            setattr(_triton_ops, name, stub)
        _triton_ops.wrap_triton = _as_is  # the launch functions wrap each kernel; a stub stays itself
        yield stubs
    finally:
        for name, kernel in saved.items():
            setattr(_triton_ops, name, kernel)
        _triton_ops.wrap_triton = wrap
        if interpret is None:
            os.environ.pop('TRITON_INTERPRET')
        else:
            os.environ['TRITON_INTERPRET'] = interpret


def _block(model_name: str, stage: str):
    blocks = getattr(timm.create_model(model_name).train(), stage)
    return blocks[len(blocks) // 2]


def tail_workloads(stage: str, device: torch.device, layout, calls: int):
    """``{name: fn}``: each fn runs ``calls`` forward + backward passes of one block tail of ``stage`` (then
    synchronises, on CUDA). Modules from the models' middle blocks, inputs random, batch 2, 8 x 8."""
    torch.manual_seed(0)
    plain, se, spe = (_block(m, stage).to(device) for m in ('resnet164', 'resnet164_se', 'resnet164_spe'))
    c = plain.bn3.num_features
    x = torch.randn(2, c, 8, 8, device=device).contiguous(memory_format=layout).requires_grad_()
    shortcut = torch.randn_like(x).requires_grad_()
    grad = torch.randn_like(x)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

    def timed(tail, block, setting=None, direct=True):
        leaves = [x, shortcut, *block.parameters()]

        def run():
            previous = spe_triton._DIRECT_LAUNCHES
            spe_triton._DIRECT_LAUNCHES = direct
            try:
                with timm_spe.set_triton_kernels(setting):
                    for _ in range(calls):
                        for t in leaves:  # as after zero_grad(set_to_none=True): gradients stored, not accumulated
                            t.grad = None
                        tail().backward(grad)
            finally:
                spe_triton._DIRECT_LAUNCHES = previous
            sync()
        return run

    def plain_tail():
        y = plain.bn3(x)
        y += shortcut
        return plain.act3(y)

    def se_tail():
        y = se.se(se.bn3(x))
        y += shortcut
        return se.act3(y)

    def spe_tail():
        return batch_norm_spe_add_relu(x, shortcut, spe.bn3, spe.se)

    return {
        'plain': timed(plain_tail, plain),
        'se': timed(se_tail, se),
        'spe stock': timed(spe_tail, spe, False),
        'spe triton, custom ops': timed(spe_tail, spe, True, False),
        'spe triton, direct': timed(spe_tail, spe, True, True),
    }


def host_overhead(device: torch.device, layout, rounds: int, calls: int, warmup: int = 2) -> dict:
    """Per stage the median (min, max) microseconds per tail of every workload, the launches per Triton tail, and
    per train step the milliseconds each tail adds over ``plain`` (medians times 18 blocks per stage)."""
    report = {'stages': {}, 'launches_per_tail': None, 'ms_per_step_over_plain': {}}
    with timm_spe.set_cpu_kernels(False), stubbed_launches() if device.type == 'cpu' else _nothing() as stubs:
        for stage, channels in STAGES:
            fns = tail_workloads(stage, device, layout, calls)
            if stubs is not None and report['launches_per_tail'] is None:
                fns['spe triton, direct']()
                report['launches_per_tail'] = sum(s.launches for s in stubs.values()) // calls
            times = timed_interleaved(fns, warmup, rounds)
            us = {name: {k: t[f'{k}_ms'] * 1e3 / calls for k in ('median', 'min', 'max')} for name, t in times.items()}
            report['stages'][stage] = {'channels': channels, 'us_per_tail': us}
            for name, t in us.items():
                over = (t['median'] - us['plain']['median']) * BLOCKS_PER_STAGE / 1e3
                report['ms_per_step_over_plain'][name] = report['ms_per_step_over_plain'].get(name, 0.) + over
    if report['launches_per_tail'] is None:
        report['launches_per_tail'] = 4  # forward 1, backward 3 (timm_spe.spe_triton)
    return report


@contextmanager
def _nothing():
    yield None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    ap.add_argument('--rounds', type=int, default=30, help='interleaved rounds (default 30)')
    ap.add_argument('--calls', type=int, default=10, help='tails per timed batch (default 10)')
    ap.add_argument('--nchw', action='store_true', help='NCHW instead of channels_last')
    ap.add_argument('--threads', type=int, default=1, help='intra-op threads (default 1)')
    ap.add_argument('--quick', action='store_true', help='3 rounds of 1 call: checks that it runs, times nothing')
    ap.add_argument('--out', help='also write the report as JSON here')
    args = ap.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        ap.error('--device cuda: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine.')
    rounds, calls, warmup = (3, 1, 1) if args.quick else (args.rounds, args.calls, 2)
    device = torch.device(args.device)
    layout = torch.contiguous_format if args.nchw else torch.channels_last
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        report = host_overhead(device, layout, rounds, calls, warmup)
    finally:
        torch.set_num_threads(threads)
    stubbed = device.type == 'cpu'
    report['meta'] = {
        'device': torch.cuda.get_device_name(0) if device.type == 'cuda' else platform.processor() or platform.machine(),
        'kernels': 'no-op stubs: launches and kernels not timed' if stubbed else 'real launches',
        'quick': args.quick, 'batch': 2, 'map': '8x8', 'layout': 'NCHW' if args.nchw else 'channels_last',
        'rounds': rounds, 'calls_per_round': calls, 'threads': args.threads, 'torch': torch.__version__}
    print(f"host time per block tail, forward + backward, us (median of {rounds} rounds; batch 2, 8x8, "
          f"{report['meta']['layout']}, {args.device}{', Triton launches stubbed: NOT a GPU timing' if stubbed else ''}"
          f"{'; --quick: not a measurement' if args.quick else ''})")
    for stage, row in report['stages'].items():
        print(f"{stage} ({row['channels']} ch): "
              + ', '.join(f"{name} {t['median']:.0f}" for name, t in row['us_per_tail'].items()))
    print(f"Triton launches per tail: {report['launches_per_tail']}"
          + (' (stubbed: add their host time on the GPU)' if stubbed else ''))
    print('over plain, ms per resnet164 step (54 blocks): '
          + ', '.join(f'{name} {ms:.1f}' for name, ms in report['ms_per_step_over_plain'].items() if name != 'plain'))
    if args.out:
        write_result(args.out, report)
    return report


if __name__ == '__main__':
    main()
