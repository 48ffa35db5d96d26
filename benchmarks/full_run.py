"""The default run: every model's eval forward, train step and memory, the SPE module against SE, the primitives and
the GEMM peak, in one run; ratios to resnet164, the table, the README's Performance sentences and the plot."""
import argparse
from typing import Dict, List

from benchmarks.allocator import fmt_allocator
from benchmarks.memory import memory_of_models
from benchmarks.primitives import bench_modules, bench_reductions, reductions_table
from benchmarks.timing import fmt, fmt_ratio, per_round_ratios, write_result
from benchmarks.workloads import (
    CHANNELS_LAST,
    KERNELS,
    baseline,
    bench_models,
    efficiency,
    gemm_peak_gflops,
    model_names,
    step_gflop,
)


def run_full(args: argparse.Namespace, meta: Dict[str, object]) -> None:
    """Measure everything (memory first, in subprocesses, while this process is small), add the ratios, print the
    table (and, with the CPU kernels, the README's Performance sentences), write the JSON (``--out``) and the plot
    (``--plot``)."""
    names = model_names(not args.no_cpu_kernels)
    results = {'meta': meta, 'models': {}, 'modules': [], 'reductions': [], 'memory': {}}
    results['memory'] = memory_of_models(names, args.batch)  # first, while this process is small
    results['models'] = bench_models(names, args.batch, args.warmup, args.repeats)
    results['modules'] = bench_modules(args.warmup, args.repeats + 3, args.quick, not args.no_cpu_kernels)
    results['reductions'] = bench_reductions(args.warmup, args.repeats + 3, args.quick, not args.no_cpu_kernels)
    results['gemm_size'] = 512 if args.quick else 2048
    results['gemm_peak_gflops'] = gemm_peak_gflops(results['gemm_size'])
    results['gflop'] = {arch: step_gflop(arch, args.batch) for arch in ('resnet164', 'resnet164_spe')}
    results['fraction_of_gemm_peak'] = efficiency(results['models'], results['gflop'], results['gemm_peak_gflops'])
    add_ratios(results, names)
    table = full_table(results, names)
    print(table)
    results['table'] = table
    if 'speedup_vs_unfused_cpu_kernels' in results:
        print('\nREADME, Performance:', performance_summary(results))
    write_result(args.out, results)
    if args.plot:
        plot(names, results['ratios'], args.plot, meta)


def add_ratios(results: Dict, names: List[str]) -> None:
    """Each model's ratios to its resnet164 (of the medians, per round, and of memory) and the speed-ups over the
    unfused reference, into ``results``."""
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
    if 'resnet164_spe' + KERNELS in names:
        spe_k = results['models']['resnet164_spe' + KERNELS]
        results['speedup_vs_unfused_cpu_kernels'] = {
            k: ref[k]['median_ms'] / spe_k[k]['median_ms'] for k in ('eval_forward', 'train_step')}


def full_table(results: Dict, names: List[str]) -> str:
    """The run's markdown: machine line, models (times, memory, ratios), per-round ratios, speed-ups, GEMM peak
    fractions, modules and primitives."""
    meta, ratios = results['meta'], results['ratios']
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
