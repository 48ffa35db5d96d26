"""Benchmark SPE against no attention, SE, ECA and an unfused reference of the authors' formulation.

    python benchmarks/benchmark.py [--out benchmarks/results.json] [--plot benchmarks/results.png] [--quick]
    python benchmarks/benchmark.py --compile resnet164,resnet164_spe --out benchmarks/results_compile.json
    python benchmarks/benchmark.py --primitives --out benchmarks/results_primitives.json
    python benchmarks/benchmark.py --compare benchmarks/results_malloc_default.json benchmarks/results.json

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
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import SEModule
from tqdm import tqdm

import timm_spe
from timm_spe import SpeModule

# the authors' formulation, unfused: the tests' reference (tests/spe_reference.py), so both time and check one thing
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))
from spe_reference import UnfusedSpeReference  # noqa: E402

CHANNELS_LAST = ' (channels_last)'  # suffix: model and batch in channels_last, as the train recipes run them
KERNELS = ' +cpu_kernels'  # before CHANNELS_LAST: with timm_spe's one-pass CPU kernels on
MODELS = ('resnet164', 'resnet164_spe', 'resnet164_spe' + KERNELS, 'resnet164_se', 'resnet164_eca',
          'resnet164_spe_unfused', 'resnet164' + CHANNELS_LAST, 'resnet164_spe' + CHANNELS_LAST,
          'resnet164_spe' + KERNELS + CHANNELS_LAST)


def _memory_format(name: str) -> torch.memory_format:
    return torch.channels_last if name.endswith(CHANNELS_LAST) else torch.contiguous_format


def baseline(name: str) -> str:
    """The resnet164 entry a model's ratios are taken against (same memory format)."""
    return 'resnet164' + CHANNELS_LAST if name.endswith(CHANNELS_LAST) else 'resnet164'


COMPARED = ('resnet164', 'resnet164_spe', 'resnet164_spe' + KERNELS, 'resnet164' + CHANNELS_LAST,
            'resnet164_spe' + CHANNELS_LAST, 'resnet164_spe' + KERNELS + CHANNELS_LAST)  # rows of --compare


def uses_kernels(name: str) -> bool:
    return KERNELS in name


def model_names(cpu_kernels: bool = True) -> List[str]:
    return [n for n in MODELS if cpu_kernels or not uses_kernels(n)]


def create(name: str) -> nn.Module:
    arch = name.removesuffix(CHANNELS_LAST).removesuffix(KERNELS)
    if arch == 'resnet164_spe_unfused':
        model = timm.create_model('resnet164', attn_layer=UnfusedSpeReference)
    else:
        model = timm.create_model(arch)
    return model.to(memory_format=_memory_format(name))


def input_batch(name: str, batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32).contiguous(memory_format=_memory_format(name))


def timed_interleaved(fns: Dict[str, Callable[[], None]], warmup: int, repeats: int) -> Dict[str, Dict[str, float]]:
    """Time several workloads round-robin (one run of each per repeat), so that drift in machine state
    (other load, frequency, the allocator's state) falls on all of them alike. The order rotates by one
    each round, so no workload always runs after the same one (whose leftover cache and heap state it
    would otherwise always inherit)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    keys = list(fns)
    times: Dict[str, List[float]] = {key: [] for key in keys}
    for round_index in range(repeats):
        shift = round_index % len(keys)
        for key in keys[shift:] + keys[:shift]:
            t0 = time.perf_counter()
            fns[key]()
            times[key].append(time.perf_counter() - t0)
    return {key: summarize(t) for key, t in times.items()}


def summarize(times: List[float]) -> Dict[str, object]:
    """Median, min and max in ms, and every timing in run order (``times_ms``, for per-round ratios)."""
    return {'median_ms': 1e3 * statistics.median(times), 'min_ms': 1e3 * min(times), 'max_ms': 1e3 * max(times),
            'times_ms': [1e3 * t for t in times]}


def per_round_ratios(times: Dict[str, object], base: Dict[str, object]) -> Dict[str, float]:
    """Median (min, max) over rounds of ``time / base time`` in the same round of :func:`timed_interleaved`:
    drift between rounds cancels in each pair, which the ratio of the two medians does not do."""
    ratios = [t / b for t, b in zip(times['times_ms'], base['times_ms'])]
    return {'median': statistics.median(ratios), 'min': min(ratios), 'max': max(ratios)}


def model_workloads(name: str, batch: int, compiled: bool = False) -> Dict[str, Callable[[], None]]:
    """``{'eval_forward': fn, 'train_step': fn}`` for one model on a fixed random batch (optionally the model
    wrapped in ``torch.compile``, default inductor backend; the first calls compile)."""
    torch.manual_seed(0)
    module = create(name)
    model = torch.compile(module) if compiled else module
    x = input_batch(name, batch)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)

    kernels = uses_kernels(name)

    def eval_forward():
        timm_spe.set_cpu_kernels(kernels)
        model.eval()
        with torch.no_grad():
            model(x)

    def train_step():
        timm_spe.set_cpu_kernels(kernels)
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return {'eval_forward': eval_forward, 'train_step': train_step}


def gemm_peak_gflops(size: int = 2048, repeats: int = 10) -> float:
    """This machine's single-precision GEMM rate now: ``size``^2 ``torch.mm``, best of ``repeats`` after one
    warm-up (the ceiling a conv-heavy step can approach; measured in the same run as the steps it scales)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size ** 3 / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_gflop(name: str, batch: int) -> Dict[str, float]:
    """FLOPs (GFLOP) of one eval forward and one train step (forward + backward) of a model, counted by
    ``torch.utils.flop_counter`` (convolutions and matmuls: what the GEMM peak bounds)."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    model, x = create(name), input_batch(name, batch)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    eval_flop = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        model.train()(x).sum().backward()
    return {'eval_forward': eval_flop / 1e9, 'train_step': counter.get_total_flops() / 1e9}


def efficiency(models: Dict[str, Dict[str, Dict[str, float]]], gflop: Dict[str, Dict[str, float]],
               peak_gflops: float) -> Dict[str, Dict[str, float]]:
    """Per model and workload: the median step's achieved GFLOP/s as a fraction of the GEMM peak."""
    out = {}
    for name, r in models.items():
        arch = name.removesuffix(CHANNELS_LAST).removesuffix(KERNELS)
        if arch in gflop:
            out[name] = {k: gflop[arch][k] / (r[k]['median_ms'] / 1e3) / peak_gflops
                         for k in ('eval_forward', 'train_step')}
    return out


def bench_models(names: List[str], batch: int, warmup: int, repeats: int) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Time every model, interleaved (see :func:`timed_interleaved`) instead of whichever runs first getting
    a different machine."""
    work = {name: model_workloads(name, batch) for name in names}
    results: Dict[str, Dict[str, Dict[str, float]]] = {name: {} for name in names}
    for kind in tqdm(('eval_forward', 'train_step'), desc='models'):
        for name, t in timed_interleaved({name: work[name][kind] for name in names}, warmup, repeats).items():
            results[name][kind] = t
    return results


def bench_modules(warmup: int, repeats: int, quick: bool, cpu_kernels: bool = True) -> List[Dict[str, object]]:
    """SpeModule (kernels off, and on) vs SEModule (training mode) per input shape, forward (no grad) and
    forward+backward, interleaved."""
    rows = []
    shapes = [(8, 256, 8, 8), (8, 64, 32, 32)] if quick else [(128, 256, 8, 8), (128, 64, 32, 32)]
    for shape in shapes:
        x = torch.randn(*shape)
        xg = x.clone().requires_grad_()
        modules = {'SpeModule': SpeModule(shape[1]).train(), 'SEModule': SEModule(shape[1]).train()}
        if cpu_kernels:
            modules = {'SpeModule': modules['SpeModule'], 'SpeModule' + KERNELS: modules['SpeModule'],
                       'SEModule': modules['SEModule']}

        def forward(label: str, module: nn.Module) -> Callable[[], None]:
            def fn():
                timm_spe.set_cpu_kernels(uses_kernels(label))
                with torch.no_grad():
                    module(x)
            return fn

        def forward_backward(label: str, module: nn.Module) -> Callable[[], None]:
            def fn():
                timm_spe.set_cpu_kernels(uses_kernels(label))
                module.zero_grad(set_to_none=True)
                xg.grad = None
                module(xg).sum().backward()
            return fn

        fwd = timed_interleaved({k: forward(k, m) for k, m in modules.items()}, warmup, repeats)
        fwd_bwd = timed_interleaved({k: forward_backward(k, m) for k, m in modules.items()}, warmup, repeats)
        for label in modules:
            rows.append({'module': label, 'shape': 'x'.join(map(str, shape)),
                         'forward': fwd[label], 'forward_backward': fwd_bwd[label]})
    return rows


def bench_reductions(warmup: int, repeats: int, quick: bool, cpu_kernels: bool = True) -> List[Dict[str, object]]:
    """The primitives SPE's cost comes down to, on each stage's block output: SE's mean, SPE's amax + amin
    (inference), max(dim) with indices (what autograd-free exact pooling gradients need) and the vectorised
    search SPE trains with (NCHW and channels_last), the one-pass CPU kernels; the gate's N x C math (forward and
    closed-form backward, Python and the small ops together; the same ops run from TorchScript's C++ interpreter, and
    one such op alone: what moving the orchestration out of Python could save); BN's backward in channels_last (ATen's, and the
    kernels' per-map sums + input gradient that replace it in SPE's block); the block tail (residual add and
    ReLU; SPE's gated ``relu(y * gate + s)`` eager and as one kernel); and a multiply into a fresh tensor vs in
    place (the allocation's cost)."""
    from timm_spe.cpu_kernels import max_min_with_indices
    from timm_spe.spe_me import _spe_gate_backward, spe_gate
    timm_spe.set_cpu_kernels(False)
    with warnings.catch_warnings():  # TorchScript is deprecated; here it only runs the same ops from C++
        warnings.simplefilter('ignore')
        spe_gate_cpp, spe_gate_backward_cpp = torch.jit.script(spe_gate), torch.jit.script(_spe_gate_backward)
    shapes = [(8, 64, 32, 32), (8, 256, 8, 8)] if quick else [(128, 64, 32, 32), (128, 128, 16, 16), (128, 256, 8, 8)]
    rows = []
    for shape in shapes:
        x = torch.randn(*shape)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        flat = x.flatten(2)
        rows_cl = x_cl.permute(0, 2, 3, 1).flatten(1, 2)  # N x HW x C, a view of the channels_last tensor
        y, s, gate = x.clone(), torch.randn(*shape), torch.rand(shape[0], shape[1], 1, 1)  # block tails, in place on y
        # the gate's N x C math on this stage's pools (authors' formulation; forward, and backward's closed form)
        f_max, f_min, g_gate = torch.randn(shape[:2]), torch.randn(shape[:2]), torch.randn(shape[:2])
        lam, gate_params = torch.tensor([0.6, 0.4]), [torch.randn(shape[1]) for _ in range(4)]
        # the block's last BN backward in channels_last: ATen's, and the kernels' two passes that replace it
        c = shape[1]
        g_cl = torch.randn(*shape).contiguous(memory_format=torch.channels_last)
        bn_w, bn_b, run_mean, run_var = torch.rand(c) + 0.5, torch.randn(c), torch.zeros(c), torch.ones(c)
        _, bn_mean, bn_invstd = torch.native_batch_norm(x_cl, bn_w, bn_b, run_mean, run_var, True, 0.1, 1e-5)
        i_max, i_min = (torch.randint(0, shape[2] * shape[3], shape[:2]) for _ in range(2))
        bn_buf, n_by_c = torch.empty_like(g_cl), [torch.randn(shape[:2]) for _ in range(3)]
        ops = {
            'mean (SE)': lambda: x.mean((2, 3)),
            'amax + amin (SPE inference)': lambda: (x.amax((2, 3)), x.amin((2, 3))),
            'aminmax (one stock op for both)': lambda: torch.aminmax(flat, dim=-1),
            'max(dim) + min(dim) with indices': lambda: (flat.max(-1), flat.min(-1)),
            'max_min_with_indices (SPE training)': lambda: max_min_with_indices(x),
            'amax + amin, channels_last': lambda: (x_cl.amax((2, 3)), x_cl.amin((2, 3))),
            'aminmax, channels_last': lambda: torch.aminmax(rows_cl, dim=1),
            'max_min_with_indices, channels_last': lambda: max_min_with_indices(x_cl),
            **({
                'one-pass kernel: max + min': lambda: torch.ops.timm_spe.max_min(x),
                'one-pass kernel: with indices': lambda: torch.ops.timm_spe.max_min_with_indices(x),
                'one-pass kernel: with indices, channels_last': lambda: torch.ops.timm_spe.max_min_with_indices(x_cl),
            } if cpu_kernels else {}),
            'N x C gate: forward + closed-form backward': lambda: (
                spe_gate(f_max, f_min, lam, *gate_params, False),
                _spe_gate_backward(g_gate, f_max, f_min, lam, *gate_params, False)),
            'N x C gate: the same ops run from C++ (TorchScript)': lambda: (
                spe_gate_cpp(f_max, f_min, lam, *gate_params, False),
                spe_gate_backward_cpp(g_gate, f_max, f_min, lam, *gate_params, False)),
            'one N x C op (a multiply)': lambda: f_max * f_min,
            'BN backward, channels_last (ATen)': lambda: torch.ops.aten.native_batch_norm_backward(
                g_cl, x_cl, bn_w, run_mean, run_var, bn_mean, bn_invstd, True, 1e-5, [True, True, True]),
            **({'one-pass kernels: per-map sums + input gradient, channels_last': lambda: (
                torch.ops.timm_spe.channels_last_per_map_sums(g_cl, x_cl, bn_mean, i_max, i_min),
                torch.ops.timm_spe.bn_input_grad_(bn_buf, g_cl, x_cl, n_by_c[0], bn_b, bn_w, i_max, n_by_c[1], i_min,
                                                  n_by_c[2]))}
               if cpu_kernels else {}),
            'block tail: add_ + relu_ (plain block)': lambda: y.add_(s).relu_(),
            'block tail: addcmul + relu_ (SPE)': lambda: torch.addcmul(s, y, gate, out=y).relu_(),
            **({'one-pass kernel: block tail': lambda: torch.ops.timm_spe.scale_add_relu_(y, s, gate)}
               if cpu_kernels else {}),
            'x * 2 into a new tensor': lambda: x * 2,
            'x.mul_(1) in place': lambda: x.mul_(1),
        }
        for op, t in timed_interleaved(ops, warmup, repeats).items():
            rows.append({'op': op, 'shape': 'x'.join(map(str, shape)), 'time': t})
    return rows


def saved_for_backward_mib(model: nn.Module, x: torch.Tensor) -> float:
    """Unique storage bytes autograd holds for backward after one training forward (exact, allocator-independent)."""
    storages: Dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values()) / 2 ** 20


def memory(name: str, batch: int) -> Dict[str, float]:
    """In a fresh subprocess: bytes saved for backward, and the peak RSS of two train steps above the RSS
    with the model and batch already in memory (activations, gradients, optimizer state, allocator)."""
    code = f'''
import json, resource, sys, torch, torch.nn.functional as F
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import benchmark, timm_spe
timm_spe.set_cpu_kernels({uses_kernels(name)!r})
m = benchmark.create({name!r}).train()
x = benchmark.input_batch({name!r}, {batch}); y = torch.randint(0, 10, ({batch},))
opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
base = int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()
for _ in range(2):
    opt.zero_grad(set_to_none=True); F.cross_entropy(m(x), y).backward(); opt.step()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
saved = benchmark.saved_for_backward_mib(m, x)
print(json.dumps({{'saved_for_backward_mib': saved, 'peak_rss_growth_mib': max(peak - base, 0) / 2**20}}))
'''
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compiled_train_steps(names: List[str], batch: int, warmup: int, repeats: int) -> Dict[str, object]:
    """Train steps of ``torch.compile``d models (inductor), interleaved; compilation happens in the first
    warm-up call of each and is timed separately."""
    work, compile_s = {}, {}
    for name in tqdm(names, desc='compiling'):
        work[name] = model_workloads(name, batch, compiled=True)['train_step']
        t0 = time.perf_counter()
        work[name]()
        compile_s[name] = time.perf_counter() - t0
    times = timed_interleaved(work, max(warmup - 1, 0), repeats)
    base = times[names[0]]['median_ms']
    return {'train_step': times, 'first_call_s': compile_s, 'ratios': {n: t['median_ms'] / base for n, t in times.items()}}


def reductions_table(rows: List[Dict[str, object]]) -> str:
    """The primitives as a markdown table: one row per op, one column per shape."""
    shapes = list(dict.fromkeys(row['shape'] for row in rows))
    lines = ['| op, ms | ' + ' | '.join(shapes) + ' |', '|---|' + '---|' * len(shapes)]
    for op in dict.fromkeys(row['op'] for row in rows):
        cells = {row['shape']: fmt_fine(row['time']) for row in rows if row['op'] == op}
        lines.append(f'| {op} | ' + ' | '.join(cells[sh] for sh in shapes) + ' |')
    return '\n'.join(lines)


def fmt(t: Dict[str, float]) -> str:
    return f"{t['median_ms']:9.1f} ({t['min_ms']:.1f}-{t['max_ms']:.1f})"


def fmt_fine(t: Dict[str, float]) -> str:
    """As :func:`fmt`, with the decimals a sub-millisecond median needs (one small op takes microseconds)."""
    d = 3 if t['median_ms'] < 0.1 else 2 if t['median_ms'] < 1 else 1
    return f"{t['median_ms']:.{d}f} ({t['min_ms']:.{d}f}-{t['max_ms']:.{d}f})"


def fmt_ratio(q: Dict[str, float]) -> str:
    return f"{q['median']:.3f} ({q['min']:.3f}-{q['max']:.3f})"


def allocator_settings() -> Dict[str, str]:
    """The environment variables that change how this process allocates memory (glibc malloc tunables, a
    preloaded allocator): on CPU they change train-step times a lot (README, "CPU memory allocator")."""
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith('MALLOC_') or k in ('GLIBC_TUNABLES', 'LD_PRELOAD')}


def fmt_allocator(settings: Dict[str, str]) -> str:
    return ' '.join(f'{k}={v}' for k, v in settings.items()) if settings else 'glibc malloc defaults'


def compare_table(before: Dict, after: Dict) -> str:
    """Markdown table of two runs' median times for resnet164 and resnet164_spe (both memory formats; with the CPU
    kernels too where both runs have them) and the
    speed-up from the first to the second; columns are named by each run's allocator settings."""
    lines = [f"| ms, median | {fmt_allocator(before['meta']['allocator'])} ({before['meta']['date']}) "
             f"| {fmt_allocator(after['meta']['allocator'])} ({after['meta']['date']}) | speed-up |", '|---|---:|---:|---:|']
    for name in (n for n in COMPARED if n in before['models'] and n in after['models']):
        for kind in ('eval_forward', 'train_step'):
            a, b = before['models'][name][kind]['median_ms'], after['models'][name][kind]['median_ms']
            lines.append(f"| {name}, {kind.replace('_', ' ')} | {a:.0f} | {b:.0f} | {a / b:.2f}x |")
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='benchmarks/results.json')
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
    parser.add_argument('--pool', nargs='+', default=None, metavar='RESULTS.json',
                        help="only this: issue 17's goals from the per-round ratios of these full runs pooled, with "
                             "a 95 %% interval of the median and a verdict")
    parser.add_argument('--compare', nargs=2, default=None, metavar=('BEFORE.json', 'AFTER.json'),
                        help='only this: print the medians of two result files side by side (e.g. allocator settings)')
    args = parser.parse_args()
    if args.pool:
        print(pooled_goals_table([json.loads(Path(f).read_text()) for f in args.pool]))
        return
    if args.compare:
        before, after = (json.loads(Path(f).read_text()) for f in args.compare)
        print(compare_table(before, after))
        return
    if args.quick:
        args.batch, args.warmup, args.repeats = 8, 1, 2
    if args.compile:
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
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        return

    meta = {
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'machine': f'{platform.processor() or platform.machine()}, {platform.system()} {platform.release()}',
        'cpu_count': os.cpu_count(),
        'torch_threads': torch.get_num_threads(), 'torch': torch.__version__, 'timm': timm.__version__,
        'timm_spe': timm_spe.__version__, 'batch': args.batch, 'warmup': args.warmup, 'repeats': args.repeats,
        'allocator': allocator_settings(), 'cpu_kernels': not args.no_cpu_kernels,
    }
    if not args.no_cpu_kernels:
        try:
            timm_spe.set_cpu_kernels(True)  # build (or load) once, before anything is timed
        except RuntimeError as e:
            parser.error(f'{e} Or run with --no-cpu-kernels.')
    if args.models:
        names = [n.strip() for n in args.models.split(',')]
        unknown = [n for n in names if n not in MODELS]
        if unknown:
            parser.error(f'--models: unknown model(s) {unknown}; choose from {list(MODELS)}')
        if args.no_cpu_kernels and any(uses_kernels(n) for n in names):
            parser.error('--models: a +cpu_kernels model cannot run with --no-cpu-kernels')
        names = list(dict.fromkeys(baseline(n) for n in names)) + [n for n in names if n != baseline(n)]
        result = {'meta': meta, 'models': bench_models(names, args.batch, args.warmup, args.repeats)}
        for name in names:
            r, base = result['models'][name], result['models'][baseline(name)]
            print(f"{name}: eval forward {fmt(r['eval_forward'])} ms, train step {fmt(r['train_step'])} ms; per-round "
                  f"ratio to {baseline(name)}: {fmt_ratio(per_round_ratios(r['eval_forward'], base['eval_forward']))}"
                  f" / {fmt_ratio(per_round_ratios(r['train_step'], base['train_step']))}")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        return
    if args.primitives:  # this run's meta; the primitives are timed repeats + 3 times, as in the full run
        result = {'meta': {**meta, 'repeats': args.repeats + 3},
                  'reductions': bench_reductions(args.warmup, args.repeats + 3, args.quick, not args.no_cpu_kernels)}
        result['table'] = reductions_table(result['reductions'])
        print(result['table'])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        return
    names = model_names(not args.no_cpu_kernels)
    results = {'meta': meta, 'models': {}, 'modules': [], 'reductions': [], 'memory': {}}
    for name in tqdm(names, desc='models (memory, subprocesses)'):  # first, while this process is small
        results['memory'][name] = memory(name, args.batch)
    results['models'] = bench_models(names, args.batch, args.warmup, args.repeats)
    results['modules'] = bench_modules(args.warmup, args.repeats + 3, args.quick, not args.no_cpu_kernels)
    results['reductions'] = bench_reductions(args.warmup, args.repeats + 3, args.quick, not args.no_cpu_kernels)
    results['gemm_size'] = 512 if args.quick else 2048
    results['gemm_peak_gflops'] = gemm_peak_gflops(results['gemm_size'])
    results['gflop'] = {arch: step_gflop(arch, args.batch) for arch in ('resnet164', 'resnet164_spe')}
    results['fraction_of_gemm_peak'] = efficiency(results['models'], results['gflop'], results['gemm_peak_gflops'])

    ratios = {}
    for name in names:
        r, m = results['models'][name], results['memory'][name]
        base, base_mem = results['models'][baseline(name)], results['memory'][baseline(name)]
        ratios[name] = {
            'eval_forward': r['eval_forward']['median_ms'] / base['eval_forward']['median_ms'],
            'train_step': r['train_step']['median_ms'] / base['train_step']['median_ms'],
            'saved_for_backward': m['saved_for_backward_mib'] / base_mem['saved_for_backward_mib'],
            'peak_rss_growth': m['peak_rss_growth_mib'] / max(base_mem['peak_rss_growth_mib'], 1e-9),
            'eval_forward_per_round': per_round_ratios(r['eval_forward'], base['eval_forward']),
            'train_step_per_round': per_round_ratios(r['train_step'], base['train_step']),
        }
    results['ratios'] = ratios
    spe, ref = results['models']['resnet164_spe'], results['models']['resnet164_spe_unfused']
    results['speedup_vs_unfused'] = {k: ref[k]['median_ms'] / spe[k]['median_ms'] for k in ('eval_forward', 'train_step')}
    spe_k = None
    if 'resnet164_spe' + KERNELS in names:
        spe_k = results['models']['resnet164_spe' + KERNELS]
        results['speedup_vs_unfused_cpu_kernels'] = {
            k: ref[k]['median_ms'] / spe_k[k]['median_ms'] for k in ('eval_forward', 'train_step')}

    lines = [
        f"machine: {meta['machine']}; torch {meta['torch']} ({meta['torch_threads']} threads); timm {meta['timm']}; "
        f"{meta['date']}; {fmt_allocator(meta['allocator'])}; batch {meta['batch']}, 32x32; "
        f"median (min-max) of {meta['repeats']} after {meta['warmup']} warm-up",
        '',
        '| model | eval forward ms | train step ms | saved for backward MiB | peak RSS growth MiB | eval / r164 | train / r164 | saved / r164 | RSS / r164 |',
        '|---|---|---|---:|---:|---:|---:|---:|---:|',
    ]
    for name in names:
        r, m, q = results['models'][name], results['memory'][name], ratios[name]
        lines.append(
            f"| {name} | {fmt(r['eval_forward'])} | {fmt(r['train_step'])} | {m['saved_for_backward_mib']:.0f} "
            f"| {m['peak_rss_growth_mib']:.0f} | {q['eval_forward']:.3f} | {q['train_step']:.3f} "
            f"| {q['saved_for_backward']:.3f} | {q['peak_rss_growth']:.3f} |")
    lines += ['', f'Per-round ratios (each timed round of a model over the same round of its resnet164), median (min-max) '
                  f'of {meta["repeats"]}:', '', '| model | eval / r164 per round | train / r164 per round |', '|---|---|---|']
    for name in names:
        q = ratios[name]
        lines.append(f"| {name} | {fmt_ratio(q['eval_forward_per_round'])} | {fmt_ratio(q['train_step_per_round'])} |")
    lines += ['', f"resnet164_spe vs unfused reference: {results['speedup_vs_unfused']['eval_forward']:.2f}x faster "
                  f"(eval forward), {results['speedup_vs_unfused']['train_step']:.2f}x (train step)"]
    if 'speedup_vs_unfused_cpu_kernels' in results:
        q = results['speedup_vs_unfused_cpu_kernels']
        lines += [f"resnet164_spe{KERNELS} vs unfused reference: {q['eval_forward']:.2f}x faster (eval forward), "
                  f"{q['train_step']:.2f}x (train step)"]
    g = results['gflop']
    lines += ['', f"GEMM peak (float32 {results['gemm_size']}^2 torch.mm, best of 10, this run): {results['gemm_peak_gflops']:.0f} GFLOP/s; "
                  f"FLOPs per step (torch.utils.flop_counter): eval forward {g['resnet164']['eval_forward']:.1f}, "
                  f"train step {g['resnet164']['train_step']:.1f} GFLOP (resnet164), "
                  f"{g['resnet164_spe']['eval_forward']:.1f} / {g['resnet164_spe']['train_step']:.1f} (resnet164_spe)",
              '', '| model | eval forward, fraction of GEMM peak | train step, fraction of GEMM peak |', '|---|---:|---:|']
    for name, q in results['fraction_of_gemm_peak'].items():
        lines.append(f"| {name} | {q['eval_forward']:.2f} | {q['train_step']:.2f} |")
    lines += ['',
              '| module | input | forward ms | forward+backward ms |', '|---|---|---|---|']
    for row in results['modules']:
        lines.append(f"| {row['module']} | {row['shape']} | {fmt(row['forward'])} | {fmt(row['forward_backward'])} |")
    lines += ['', reductions_table(results['reductions'])]
    table = '\n'.join(lines)
    print(table)
    results['table'] = table
    if spe_k is not None:
        print('\nREADME, Performance:', performance_summary(results))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(names, ratios, args.plot, meta)


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
    lines += ['', 'channels_last (the layout every CPU recipe trains in; issue 17\'s goals):', '',
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


# issue 17's goals: (row, model, baseline, measurement, goal)
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


def pooled_goals_table(runs: List[Dict]) -> str:
    """Issue 17's goals from the per-round ratios of several runs pooled (each round: a model's time over its
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


def performance_summary(results: Dict) -> str:
    """The README's performance sentences, every figure from ``results`` (a full run's JSON)."""
    q, f, g = results['ratios'], results['fraction_of_gemm_peak'], results['gflop']['resnet164']['train_step']
    spe, spe_k, spe_k_cl = 'resnet164_spe', 'resnet164_spe' + KERNELS, 'resnet164_spe' + KERNELS + CHANNELS_LAST
    return (
        f"On the 2-core CPU this project is developed on, at batch {results['meta']['batch']}, 32x32 (NCHW), "
        f"resnet164_spe costs {q[spe]['eval_forward']:.3f}x resnet164's eval forward and "
        f"{q[spe]['train_step']:.3f}x its train step in eager PyTorch, and {q[spe_k]['eval_forward']:.3f}x / "
        f"{q[spe_k]['train_step']:.3f}x with the optional CPU kernels; in channels_last, the layout `./run.sh train` "
        f"trains in, {q[spe_k_cl]['eval_forward']:.3f}x / {q[spe_k_cl]['train_step']:.3f}x with the kernels. "
        f"Autograd saves {q[spe]['saved_for_backward']:.3f}x resnet164's memory for backward (timm's SE: "
        f"{q['resnet164_se']['train_step']:.3f}x train step, {q['resnet164_se']['saved_for_backward']:.3f}x memory). "
        f"A train step is {g:.0f} GFLOP; resnet164 runs it at "
        f"{f['resnet164' + CHANNELS_LAST]['train_step']:.2f} of this machine's float32 GEMM peak in channels_last, "
        f"resnet164_spe at {f[spe_k_cl]['train_step']:.2f}.")


def plot(names: List[str], ratios: Dict[str, Dict[str, float]], path: str, meta: Dict[str, object]) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    keys = ['eval_forward', 'train_step', 'saved_for_backward', 'peak_rss_growth']
    names = [n for n in names if n != baseline(n)]
    fig, ax = plt.subplots(figsize=(11, 3.6))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        ax.bar([k + i * width for k in range(len(keys))], [ratios[n][k] for k in keys], width, label=n)
    ax.axhline(1.0, color='k', lw=0.8)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))], keys)
    ax.set_ylabel('ratio to resnet164 (same memory format)')
    ax.set_title(f"batch {meta['batch']}, {meta['torch_threads']} threads, torch {meta['torch']}")
    ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == '__main__':
    main()
