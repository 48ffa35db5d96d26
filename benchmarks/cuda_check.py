"""CUDA check: every SPE model kind trains a step on a GPU, in fp32 and under bf16 / fp16 autocast.

For each model kind (CIFAR ResNet with SPE, with drop-path, the paper formulation, timm's ResNet with
``attn_layer='spe'``, ``SpeModule`` alone) and memory format, from identical initial weights and batch:

- fp32 on CUDA, the default path (the Triton kernels where Triton runs on the GPU) and the stock ops
  (``timm_spe.set_triton_kernels(False)``), each against fp32 on CPU: loss, logits and gradients agree;
- fp32 on CUDA on the Triton kernels (``set_triton_kernels(True)``) against the stock ops: gradients equal to float32
  rounding;
- autocast bf16 / fp16 on CUDA (the default path) against fp32 on CUDA: the step runs, loss and gradients are finite
  and close (relative error of the whole gradient vector, reported; low-precision rounding is expected), and against
  the stock ops under the same autocast (reported);
- eval forward on CUDA vs CPU.

Around them, the train-step timing of the CUDA goals (batch 128, 32 x 32, channels_last, cuDNN's TF32 at PyTorch's
default): resnet164, resnet164_spe (the default path, no switch), resnet164_spe on the stock ops (``+stock``) and
resnet164_se, eager fp32 and eager under bf16 autocast (both before the cases), then resnet164, resnet164_spe (the
default path: its Triton ops traced into inductor's code, ``compiled_triton``) and resnet164_spe on the stock ops
``torch.compile``d (inductor, ``fullgraph=True``: a graph break fails the configuration; fp32, after the cases:
compilation takes minutes; the resnet83 trio with ``--small``), interleaved over rounds within a setting (medians). ``ratio_to_resnet164`` holds the goals' ratios (resnet164_spe and resnet164_se to resnet164 in the same
setting: ``<model>/fp32``, ``/bf16_autocast``, ``resnet164_spe/compiled``), ``ratio_to_plain`` every configuration's
to the plain model of its depth, ``setup_s`` the seconds to build and warm up each (compilation included),
``compiled_graphs`` the graphs Dynamo compiled for each compiled one. The report is rewritten after every case and
timing step (``complete`` says whether the run got to its end), so a run stopped by a time limit keeps what it measured.

Run on a machine with a GPU:  python benchmarks/cuda_check.py [--out cuda_check.json] [--rounds 3] [--small]
(``--settings compiled --no-cases`` times only the compiled setting: on an H200 resnet164 and resnet164_spe on the stock
ops took 141.5 and 84.3 s to compile and warm up)
Exit code 1 if any case failed (exception, non-finite values, or fp32 CUDA/CPU disagreement) or any timed
configuration failed (its error is in the report).
"""
import argparse
import copy
import json
import os
import time
import traceback

import timm
import torch
import torch.nn as nn

import timm_spe


def _kinds():
    cifar = dict(num_classes=10)
    return {
        'resnet83_spe': (lambda: timm.create_model('resnet83_spe', **cifar), 32),
        'resnet83_spe+drop_path': (lambda: timm.create_model('resnet83_spe', drop_path_rate=0.1, **cifar), 32),
        'resnet83_spe(paper)': (
            lambda: timm.create_model('resnet83_spe', attn_kwargs=dict(formulation='paper'), **cifar), 32),
        'resnet164_spe': (lambda: timm.create_model('resnet164_spe', **cifar), 32),
        'resnet18_spe': (lambda: timm.create_model('resnet18_spe', num_classes=10), 64),
        'resnet50(attn_layer=spe)': (
            lambda: timm.create_model('resnet50', block_args=dict(attn_layer='spe'), num_classes=10), 64),
        'SpeModule': (lambda: nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64),
                                            timm_spe.SpeModule(64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                            nn.Linear(64, 10)), 32),
    }


def _step(model, x, y, device, memory_format, autocast_dtype=None):
    torch.manual_seed(1)  # the same drop-path masks for every step on one device
    model = model.to(device).to(memory_format=memory_format).train()
    x = x.to(device).to(memory_format=memory_format)
    y = y.to(device)
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
    loss.backward()
    grads = torch.cat([p.grad.float().flatten().cpu() for p in model.parameters() if p.grad is not None])
    return loss.detach().float().cpu(), out.detach().float().cpu(), grads


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check_kind(name, make, size, memory_format, cuda):
    torch.manual_seed(0)
    ref = make()
    x = torch.randn(8, 3, size, size)
    y = torch.randint(0, 10, (8,))
    res = {'kind': name, 'memory_format': 'channels_last' if memory_format == torch.channels_last else 'nchw'}

    def on_cuda(triton, autocast_dtype=None):
        with timm_spe.set_triton_kernels(triton):
            return _step(copy.deepcopy(ref), x, y, cuda, memory_format, autocast_dtype)
    loss_cpu, out_cpu, g_cpu = _step(copy.deepcopy(ref), x, y, torch.device('cpu'), memory_format)
    loss_gpu, out_gpu, g_gpu = on_cuda(None)  # the default path: no switch
    loss_s, out_s, g_s = on_cuda(False)
    res['fp32_cuda_vs_cpu'] = {'loss': abs(float(loss_gpu - loss_cpu)), 'logits_rel': _rel(out_gpu, out_cpu),
                               'grad_rel': _rel(g_gpu, g_cpu)}
    res['fp32_stock_vs_cpu'] = {'loss': abs(float(loss_s - loss_cpu)), 'logits_rel': _rel(out_s, out_cpu),
                                'grad_rel': _rel(g_s, g_cpu)}
    # drop-path draws its masks from each device's own generator: CUDA and CPU steps differ there
    stochastic = 'drop_path' in name
    ok = stochastic or all(res[k]['grad_rel'] < 1e-2 and res[k]['logits_rel'] < 1e-2
                           for k in ('fp32_cuda_vs_cpu', 'fp32_stock_vs_cpu'))
    loss_t, out_t, g_t = on_cuda(True)
    res['fp32_triton_vs_stock'] = {'loss': abs(float(loss_t - loss_s)), 'grad_rel': _rel(g_t, g_s)}
    ok &= stochastic or res['fp32_triton_vs_stock']['grad_rel'] < 1e-3
    for dtype in (torch.bfloat16, torch.float16):
        loss_a, out_a, g_a = on_cuda(None, dtype)
        g_as = on_cuda(False, dtype)[2]
        finite = bool(torch.isfinite(g_a).all() and torch.isfinite(loss_a))
        res[f'autocast_{str(dtype)[6:]}'] = {'loss_abs_diff': abs(float(loss_a - loss_gpu)),
                                            'grad_rel': _rel(g_a, g_gpu), 'finite': finite,
                                            'grad_rel_to_stock_autocast': _rel(g_a, g_as)}
        ok &= finite
    m_cpu = copy.deepcopy(ref).eval().to(memory_format=memory_format)
    m_gpu = copy.deepcopy(ref).eval().to(cuda).to(memory_format=memory_format)
    with torch.no_grad():
        e_cpu = m_cpu(x.to(memory_format=memory_format))
        e_gpu = m_gpu(x.to(cuda).to(memory_format=memory_format)).cpu()
    res['eval_cuda_vs_cpu_rel'] = _rel(e_gpu, e_cpu)
    ok &= res['eval_cuda_vs_cpu_rel'] < 1e-2
    res['ok'] = bool(ok)
    return res


SETTINGS = ('fp32', 'bf16_autocast', 'compiled')
# (model, Triton setting): None the default path (no switch), False the stock ops, True the Triton kernels switched on
TIMED = (('resnet164', None), ('resnet164_spe', None), ('resnet164_spe', False), ('resnet164_se', None))
# compiled: the default path (its Triton ops traced into inductor's code), then the stock ops (inductor fuses them)
COMPILED = (('resnet164', None), ('resnet164_spe', None), ('resnet164_spe', False))
COMPILED_SMALL = (('resnet83', None), ('resnet83_spe', None), ('resnet83_spe', False))
GOALS = ('resnet164_spe/fp32', 'resnet164_se/fp32', 'resnet164_spe/bf16_autocast', 'resnet164_se/bf16_autocast',
         'resnet164_spe/compiled')  # the keys of ratio_to_resnet164
_SUFFIX = {None: '', False: '+stock', True: '+triton'}


def config_key(model_name, triton, setting):
    """``<model>[+stock|+triton]/<setting>``: no suffix for the default path."""
    return f'{model_name}{_SUFFIX[triton]}/{setting}'


def _plain(model_name):
    """The plain model of ``model_name``'s depth: ``resnet164_spe`` -> ``resnet164``."""
    return model_name.split('_')[0]


def _timed_step(model_name, triton, setting, cuda, batch=128):
    """A closure running one train step (forward, backward, SGD) of ``model_name`` in ``setting``, with the Triton
    kernels' setting ``triton`` (None: the default)."""
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10).to(cuda).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=cuda).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=cuda)
    run = torch.compile(model, fullgraph=True) if setting == 'compiled' else model
    dtype = torch.bfloat16 if setting == 'bf16_autocast' else None

    def step():
        with timm_spe.set_triton_kernels(triton):
            opt.zero_grad(set_to_none=True)
            with torch.autocast('cuda', dtype=dtype, enabled=dtype is not None):
                loss = nn.functional.cross_entropy(run(x), y)
            loss.backward()
            opt.step()
    return step


def default_path(cuda) -> str:
    """``'triton'`` where the default path (no switch) takes the Triton kernels on this GPU, else ``'stock'`` (the first
    call checks the GPU: a one-line warning says why Triton cannot run there)."""
    from timm_spe import spe_triton
    with timm_spe.set_triton_kernels(None):
        return 'triton' if spe_triton.applies(torch.empty((1, 1, 1, 1), device=cuda)) else 'stock'


def _compiled_triton() -> str:
    """How torch.compile sees the Triton kernels: ``'triton_op'`` (traced into inductor's code) or ``'custom_op'``
    (opaque calls: a torch without ``torch.library.triton_op``, or Triton's interpreter), ``None`` without Triton."""
    try:
        from timm_spe import _triton_ops
    except ImportError:
        return None
    return 'triton_op' if _triton_ops.TRACEABLE else 'custom_op'


def gpu_slug(name: str) -> str:
    """A GPU's short name for file names: ``'NVIDIA H200'`` -> ``'h200'``, ``'NVIDIA H100 80GB HBM3'`` -> ``'h100'``."""
    import re
    model = re.search(r'\b([a-z]+\d+[a-z]*)\b', name.lower().replace('nvidia', ''))
    return model.group(1) if model else re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_') or 'gpu'


def _graphs_compiled() -> int:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters['stats'].get('unique_graphs', 0))


def time_train_steps(cuda, settings=SETTINGS, rounds=3, steps=10, warmup=5, into=None, save=lambda: None,
                     configs=TIMED):
    """Median ms per train step of every (model, Triton setting) in ``configs`` per setting, one setting at a time: its
    configurations are built and warmed up (``warmup`` steps, compilation included, the seconds recorded), then run
    interleaved, each round ``steps`` times; and the ratios to the plain model of the same depth in the same setting
    (``ratio_to_plain``; the goals' in ``ratio_to_resnet164``). In the compiled setting (minutes per configuration)
    the configurations set up so far are timed after each one from the second on, so a run stopped by a time limit
    while compiling the next keeps an interleaved measurement of those before it (the last pass is the one kept). A
    configuration that fails is recorded with its error and left out. ``into`` (a dict) is filled as it goes and
    ``save`` called after each step of the way. cuDNN's TF32 is left at PyTorch's default here (on), as a user's
    training gets it; the correctness cases turn it off."""
    res = into if into is not None else {}
    for part in ('ms', 'ratio_to_resnet164', 'ratio_to_plain', 'setup_s', 'compiled_graphs', 'errors'):
        res.setdefault(part, {})
    for setting in settings:
        steps_of = {}
        for i, (model_name, triton) in enumerate(configs):
            key = config_key(model_name, triton, setting)
            t, graphs = time.perf_counter(), _graphs_compiled()
            try:
                step = _timed_step(model_name, triton, setting, cuda)
                for _ in range(warmup):
                    step()
                torch.cuda.synchronize()
                steps_of[key] = step
            except Exception as e:  # time the others; say why this one is missing
                res['errors'][key] = f'{type(e).__name__}: {e}'.splitlines()[0][:300]
            res['setup_s'][key] = round(time.perf_counter() - t, 1)
            if setting == 'compiled':
                res['compiled_graphs'][key] = _graphs_compiled() - graphs
            print(f'{key}: set up in {res["setup_s"][key]} s{" (failed)" if key in res["errors"] else ""}', flush=True)
            save()
            if i + 1 == len(configs) or (setting == 'compiled' and len(steps_of) > 1):
                _time_interleaved(steps_of, setting, rounds, steps, res)
                save()
    return res


def _time_interleaved(steps_of, setting, rounds, steps, res):
    """Run ``steps_of``'s steps interleaved over ``rounds`` and put their medians and ratios in ``res``."""
    times = {key: [] for key in steps_of}
    for _ in range(rounds):
        for key, step in steps_of.items():
            for _ in range(steps):
                torch.cuda.synchronize()
                t = time.perf_counter()
                step()
                torch.cuda.synchronize()
                times[key].append(time.perf_counter() - t)
    for key, t in times.items():
        res['ms'][key] = sorted(t)[len(t) // 2] * 1e3
    for key in times:
        model_name = key.split('/')[0].split('+')[0]
        base = res['ms'].get(f'{_plain(model_name)}/{setting}')
        if base and model_name != _plain(model_name):
            res['ratio_to_plain'][key] = res['ms'][key] / base
            if key in GOALS:
                res['ratio_to_resnet164'][key] = res['ratio_to_plain'][key]
    print(setting, json.dumps({k: round(v, 2) for k, v in res['ms'].items() if k.endswith('/' + setting)}),
          flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default=None, help='write the results as JSON here (default: print only)')
    parser.add_argument('--out-dir', default=None,
                        help='write the results as DIR/cuda_check_<gpu>.json (e.g. cuda_check_h200.json)')
    parser.add_argument('--no-timing', action='store_true', help='skip the batch-128 train-step timing')
    parser.add_argument('--rounds', type=int, default=3, help='interleaved timing rounds (default 3)')
    parser.add_argument('--settings', default=','.join(SETTINGS),
                        help=f'timed settings, comma-separated (default: all, {",".join(SETTINGS)})')
    parser.add_argument('--no-cases', action='store_true',
                        help='skip the correctness cases (e.g. to time only the compiled setting within a time limit)')
    parser.add_argument('--small', action='store_true',
                        help='compile resnet83 and resnet83_spe instead of resnet164 and resnet164_spe (faster)')
    args = parser.parse_args()
    settings = [t.strip() for t in args.settings.split(',') if t.strip()]
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        parser.error(f'--settings: unknown {", ".join(unknown)}; choose from {", ".join(SETTINGS)}')
    if not torch.cuda.is_available():
        raise SystemExit('cuda_check: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine.')
    cuda = torch.device('cuda')
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        args.out = os.path.join(args.out_dir, f'cuda_check_{gpu_slug(torch.cuda.get_device_name(0))}.json')
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:  # the stock path needs no Triton; the Triton cases then fail, and say so
        triton_version = None
    report = {'torch': torch.__version__, 'triton': triton_version, 'timm': timm.__version__,
              'timm_spe': timm_spe.__version__, 'gpu': torch.cuda.get_device_name(0),
              'default_path': default_path(cuda),
              'settings': settings if not args.no_timing else [], 'cases_run': not args.no_cases,
              'compiled_models': [config_key(m, t, 'compiled').split('/')[0]
                                  for m, t in (COMPILED_SMALL if args.small else COMPILED)],
              'compiled_triton': _compiled_triton(),
              'cases': [], 'failed': 0, 'complete': False}

    def save():  # after every case and timing step: a run stopped by a time limit keeps what it measured
        if args.out:
            with open(args.out + '.tmp', 'w') as f:
                json.dump(report, f, indent=1)
            os.replace(args.out + '.tmp', args.out)

    timing = {}
    if not args.no_timing:  # the eager settings first (seconds), the compiled one last (minutes of compilation)
        report['train_step_b128_channels_last'] = timing
        time_train_steps(cuda, [s for s in settings if s != 'compiled'], rounds=args.rounds, into=timing, save=save)
    # fp32 means fp32 in the cases: TF32 convolutions (cuDNN's default) would differ from the CPU by ~1e-2
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    failed = 0
    for name, (make, size) in ({} if args.no_cases else _kinds()).items():
        for memory_format in (torch.contiguous_format, torch.channels_last):
            try:
                res = check_kind(name, make, size, memory_format, cuda)
            except Exception as e:  # report every kind, not only the first failure
                res = {'kind': name, 'memory_format': str(memory_format), 'ok': False,
                       'error': f'{type(e).__name__}: {e}'.splitlines()[0],
                       'where': traceback.format_exc().strip().splitlines()[-3:]}
            failed += not res['ok']
            report['cases'].append(res)
            report['failed'] = failed
            print(json.dumps(res), flush=True)
            save()
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32  # as the eager timing ran
    if not args.no_timing and 'compiled' in settings:  # each compilation takes a minute or more
        time_train_steps(cuda, ['compiled'], rounds=args.rounds, into=timing, save=save,
                         configs=COMPILED_SMALL if args.small else COMPILED)
    if timing:
        print('train step (batch 128, channels_last):', json.dumps(timing, indent=1))
    report['failed'] = failed
    report['complete'] = True
    timing_errors = len(timing.get('errors', {}))
    print(f'cuda_check: {len(report["cases"]) - failed} passed, {failed} failed; '
          f'{timing_errors} timed configuration(s) failed')
    save()
    raise SystemExit(1 if failed or timing_errors else 0)


if __name__ == '__main__':
    main()
