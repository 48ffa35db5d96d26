"""SPE's parts timed alone (``--primitives``, and in the full run): the SPE module against timm's SEModule, and the
primitives behind the differences, on each stage's block output.

Every workload here is a closure over its loop iteration's tensors, timed inside that iteration, never after
(pyproject.toml lets this file's closures bind loop variables: ruff's B023).
"""
import warnings
from typing import Callable, Dict, List

import torch
import torch.nn as nn
from timm.layers import SEModule

import timm_spe
from benchmarks.timing import fmt_fine, timed_interleaved, write_result
from benchmarks.workloads import KERNELS, uses_kernels
from timm_spe import SpeModule


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


def reductions_table(rows: List[Dict[str, object]]) -> str:
    """The primitives as a markdown table: one row per op, one column per shape."""
    shapes = list(dict.fromkeys(row['shape'] for row in rows))
    lines = ['| op, ms | ' + ' | '.join(shapes) + ' |', '|---|' + '---|' * len(shapes)]
    for op in dict.fromkeys(row['op'] for row in rows):
        cells = {row['shape']: fmt_fine(row['time']) for row in rows if row['op'] == op}
        lines.append(f'| {op} | ' + ' | '.join(cells[sh] for sh in shapes) + ' |')
    return '\n'.join(lines)


def run_primitives(args, meta: Dict[str, object]) -> None:
    """``--primitives``: only the primitives table (seconds), written to ``--out`` with this run's meta; the
    primitives are timed ``repeats + 3`` times, as in the full run."""
    result = {'meta': {**meta, 'repeats': args.repeats + 3},
              'reductions': bench_reductions(args.warmup, args.repeats + 3, args.quick, not args.no_cpu_kernels)}
    result['table'] = reductions_table(result['reductions'])
    print(result['table'])
    write_result(args.out, result)
