"""benchmarks/benchmark.py runs end to end (quick mode) and reports every measurement it promises."""
import json
import os
import subprocess

import pytest
from helpers import ROOT

from benchmarks import allocator, full_run, goals, primitives, timing, workloads
from benchmarks.spe_reference import UnfusedSpeReference

RESULTS = ROOT / 'benchmarks' / 'results'  # the committed runs


def test_unfused_reference_matches_spe():
    """The benchmark's unfused reference computes the same function as SpeModule (same init)."""
    import torch

    from timm_spe import SpeModule
    torch.manual_seed(0)
    ref, spe = UnfusedSpeReference(8), SpeModule(8)
    with torch.no_grad():
        for name_ref, name in (('w1', 'w_exc'), ('b1', 'b_exc'), ('w2', 'w_rew'), ('b2', 'b_rew')):
            v = torch.randn(8)
            getattr(ref, name_ref).copy_(v.view(1, -1, 1, 1))
            getattr(spe, name).copy_(v)
        ref.p.copy_(torch.tensor([0.3, 0.9]))
        spe.p.copy_(torch.tensor([0.3, 0.9]))
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(spe(x), ref(x), rtol=1e-5, atol=1e-6)


RUN_SH_ALLOCATOR = {'MALLOC_MMAP_THRESHOLD_': '2147483647', 'MALLOC_TRIM_THRESHOLD_': '2147483647'}


def _run_sh_allocator(env: dict) -> dict:
    """The MALLOC_* variables after run.sh's keep_freed_memory, starting from ``env``."""
    script = (f'eval "$(sed -n \'/^keep_freed_memory()/,/^}}/p\' {ROOT / "run.sh"})"; keep_freed_memory; env -0')
    proc = subprocess.run(['bash', '-c', script], capture_output=True, text=True, env=env, check=True)
    pairs = (item.split('=', 1) for item in proc.stdout.split('\0') if item.startswith('MALLOC_'))
    return dict(pairs)


def test_run_sh_keeps_freed_memory_for_train_and_bench():
    base = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}
    assert _run_sh_allocator(base) == RUN_SH_ALLOCATOR
    assert _run_sh_allocator({**base, 'MALLOC_TRIM_THRESHOLD_': '0'})['MALLOC_TRIM_THRESHOLD_'] == '0'  # user's wins
    run_sh = (ROOT / 'run.sh').read_text()
    for command in ('bench)', 'train)'):
        branch = run_sh.split(f'    {command}\n', 1)[1].split(';;', 1)[0]
        assert 'keep_freed_memory' in branch, command


def test_allocator_settings_are_recorded(monkeypatch):
    for k in list(os.environ):
        if k.startswith('MALLOC_') or k in ('GLIBC_TUNABLES', 'LD_PRELOAD'):
            monkeypatch.delenv(k)
    assert allocator.fmt_allocator(allocator.allocator_settings()) == 'glibc malloc defaults'
    monkeypatch.setenv('MALLOC_TRIM_THRESHOLD_', '7')
    monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.mmap_threshold=9')
    monkeypatch.setenv('MALLOCX', 'unrelated')  # not a MALLOC_* name: not recorded
    assert allocator.allocator_settings() == {
        'GLIBC_TUNABLES': 'glibc.malloc.mmap_threshold=9', 'MALLOC_TRIM_THRESHOLD_': '7'}


def test_model_names_with_and_without_cpu_kernels():
    assert workloads.model_names(True) == list(workloads.MODELS)
    without = workloads.model_names(False)
    assert 'resnet164_spe' in without and not any(workloads.uses_kernels(n) for n in without)
    import torch
    model = workloads.create('resnet164_spe' + workloads.KERNELS + workloads.CHANNELS_LAST)
    assert type(model).__name__ == 'CifarResNet' and model.layer1[0].se is not None
    conv = next(p for p in model.parameters() if p.ndim == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_timed_interleaved_rotates_order_and_keeps_rounds():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in 'abc'}
    r = timing.timed_interleaved(fns, warmup=1, repeats=4)
    assert calls[:3] == list('abc')  # warm-up
    assert calls[3:] == list('abc' 'bca' 'cab' 'abc')  # each round starts one later
    assert all(len(t['times_ms']) == 4 for t in r.values())


def test_per_round_ratios_pair_rounds():
    # round 2 is slow for both (drift): paired ratios stay 1.5; the ratio of medians would not see the pairing
    model = timing.summarize([0.003, 0.030, 0.0045])
    base = timing.summarize([0.002, 0.020, 0.003])
    assert timing.per_round_ratios(model, base) == pytest.approx({'median': 1.5, 'min': 1.5, 'max': 1.5})
    assert model['median_ms'] / base['median_ms'] == pytest.approx(1.5)  # same here; differs when rounds cross
    crossed = timing.per_round_ratios(timing.summarize([0.030, 0.003]), timing.summarize([0.002, 0.020]))
    assert crossed == pytest.approx({'median': 7.575, 'min': 0.15, 'max': 15.0})


def test_readme_performance_summary_is_the_committed_runs():
    """README.md's Performance figures (ratios, memory, fraction of GEMM peak) are those of
    benchmarks/results/results.json."""
    results = json.loads((RESULTS / 'results.json').read_text())
    readme = ' '.join((ROOT / 'README.md').read_text().split())
    summary = full_run.performance_summary(results)
    assert summary in readme, f'README.md Performance is stale; write: {summary}'


def test_readme_goal_tables_are_the_committed_runs():
    """benchmarks/README.md's goal tables are those of benchmarks/results/results.json and the two earlier runs beside
    it."""
    runs = [json.loads((RESULTS / f).read_text())
            for f in ('results.json', 'results_2026-11-30-0531.json', 'results_2026-11-25.json')]
    tables = goals.goals_tables(runs)
    assert tables in (ROOT / 'benchmarks' / 'README.md').read_text(), \
        f'benchmarks/README.md goal tables are stale; paste:\n{tables}'


def test_median_interval_is_the_distribution_free_95_percent_interval():
    """n = 30: ranks 10 and 21 (P(Binomial(30, 1/2) <= 9) = 0.021 <= 0.025 < P(<= 10) = 0.049); n = 9: ranks 2 and
    8; up to 8 values: the whole range."""
    values = [float(v) for v in range(30, 0, -1)]  # unsorted on purpose
    assert goals.median_interval(values) == (15.5, 10., 21.)
    assert goals.median_interval([float(v) for v in range(1, 10)]) == (5., 2., 8.)
    assert goals.median_interval([3., 1., 2.]) == (2., 1., 3.)
    assert goals.median_interval([float(v) for v in range(1, 9)]) == (4.5, 1., 8.)


def test_readme_shows_committed_results():
    """benchmarks/README.md's performance table is the one benchmarks/results/results.json was written with."""
    results = json.loads((RESULTS / 'results.json').read_text())
    readme = (ROOT / 'benchmarks' / 'README.md').read_text()
    assert results['table'] in readme, \
        'benchmarks/README.md performance table is stale: paste benchmarks/results/results.json["table"]'


def test_readme_shows_committed_primitives():
    """benchmarks/README.md's primitives table (the default path's reasons) is
    benchmarks/results/results_primitives.json's."""
    results = json.loads((RESULTS / 'results_primitives.json').read_text())
    assert results['table'] == primitives.reductions_table(results['reductions'])
    assert results['table'] in (ROOT / 'benchmarks' / 'README.md').read_text(), \
        'benchmarks/README.md primitives table is stale: paste benchmarks/results/results_primitives.json["table"]'


def test_readme_op_count_table_is_the_committed_count():
    """benchmarks/README.md's CUDA op-count table is benchmarks/results/count_ops.json's, and the Triton path's counts
    in it are within the CUDA goal's 30 per block."""
    from benchmarks.count_ops import markdown_table
    table = json.loads((RESULTS / 'count_ops.json').read_text())['extra_ops_per_block']
    assert markdown_table(table) in (ROOT / 'benchmarks' / 'README.md').read_text(), \
        f'benchmarks/README.md op-count table is stale; paste:\n{markdown_table(table)}'
    assert all(n <= 30 for row in table.values() for n in row['resnet164_spe, Triton kernels'])


def test_readme_autocast_figures_are_the_committed_runs():
    """The bf16 ratios and the tails' milliseconds benchmarks/README.md and the README quote come from the committed
    autocast runs."""
    runs = json.loads((RESULTS / 'results_autocast_bf16.json').read_text())['models']
    bench_readme = ' '.join((ROOT / 'benchmarks' / 'README.md').read_text().split())
    readme = ' '.join((ROOT / 'README.md').read_text().split())

    def ratio(name, base, mode):
        return timing.per_round_ratios(runs[name][mode], runs[base][mode])['median']
    spe = ratio('resnet164_spe (channels_last)', 'resnet164 (channels_last)', 'train_step')
    kernels = ratio('resnet164_spe +cpu_kernels (channels_last)', 'resnet164 (channels_last)', 'train_step')
    kernels_eval = ratio('resnet164_spe +cpu_kernels (channels_last)', 'resnet164 (channels_last)', 'eval_forward')
    se = ratio('resnet164_se', 'resnet164', 'train_step')
    assert f'**{spe:.3f}x**' in bench_readme and f'({spe:.2f}x without)' in readme
    assert f'**{kernels:.3f}x**' in bench_readme and f'{kernels:.2f}x resnet164\'s train step' in readme
    assert f'{kernels_eval:.3f}x' in bench_readme
    assert f'{ratio("resnet164_spe (channels_last)", "resnet164 (channels_last)", "eval_forward"):.3f}x' in bench_readme
    assert f'resnet164_se costs {se:.3f}x' in bench_readme and f'(SE: {se:.2f}x)' in readme
    for dtype in ('bf16', 'fp16'):
        tails = json.loads((RESULTS / f'tail_autocast_{dtype}.json').read_text())['spe_over_plain_tails_ms_per_step']
        assert f"{tails['SPE fused']:.0f} ms" in bench_readme
        assert f"{tails['SPE fused +cpu_kernels']:.0f} ms" in bench_readme
        assert f"{tails['SPE plain ops']:.0f}" in bench_readme


def test_inference_tail_table_is_the_committed_run():
    """benchmarks/README.md's per-block inference tail table is results/inference_tail_bf16.json, row by row: the ms per
    stage and the ATen ops each tail dispatches."""
    result = json.loads((RESULTS / 'inference_tail_bf16.json').read_text())
    ms, ops = result['ms_per_block'], result['aten_ops']
    bench_readme = (ROOT / 'benchmarks' / 'README.md').read_text()
    for name, label in (('plain', '| plain block: '), ('one op', '| SPE, CPU kernels, one call'),
                        ('kernel steps', '| SPE, CPU kernels, as separate calls'), ('default path', '| SPE, default path'),
                        ('aminmax', '| `torch.aminmax` alone'), ('pool reads', '| `amax` + `amin` alone')):
        row = next(line for line in bench_readme.splitlines() if line.startswith(label))
        cells = [c.strip() for c in row.strip('|').split('|')[1:]]
        assert len({ops[stage][name] for stage in ops}) == 1, ops  # the same ops at every stage
        assert cells == [f"{ms[stage][name]:.2f}" for stage in ('layer1', 'layer2', 'layer3')] + [
            str(ops['layer1'][name])], row


def test_default_path_eval_floor_is_the_committed_runs():
    """The floor benchmarks/README.md gives for the default path's eval forward is the two pool reads of the committed
    inference tail run over all 54 blocks, against resnet164's eval forward in the committed bf16 run."""
    ms = json.loads((RESULTS / 'inference_tail_bf16.json').read_text())['ms_per_block']
    plain_eval = json.loads((RESULTS / 'results_autocast_bf16.json').read_text())[
        'models']['resnet164 (channels_last)']['eval_forward']['median_ms']
    reads = 18 * sum(ms[stage]['pool reads'] for stage in ('layer1', 'layer2', 'layer3'))
    bench_readme = ' '.join((ROOT / 'benchmarks' / 'README.md').read_text().split())
    assert f'**{reads:.0f} ms** over the 54 blocks' in bench_readme
    assert f'{reads / plain_eval:.3f} of resnet164\'s bf16 channels_last eval forward in the run above ({plain_eval:.0f} ms)' \
        in bench_readme
    assert f'at least **{1 + reads / plain_eval:.2f}x** the plain one' in bench_readme
    assert 1 + reads / plain_eval > 1.05  # the claim: the eval goal is out of the default path's reach
    stages = ('layer1', 'layer2', 'layer3')
    ops = json.loads((RESULTS / 'inference_tail_bf16.json').read_text())['aten_ops']['layer1']
    others = ops['default path'] - ops['pool reads'] - ops['plain']
    over_plain = [ms[s]['default path'] - ms[s]['plain'] for s in stages]
    per_op = [1e3 * (over - ms[s]['pool reads']) / others for s, over in zip(stages, over_plain)]
    assert f"other {others} small ops" in bench_readme
    assert f"cost {' / '.join(f'{us:.0f}' for us in per_op)} us each" in bench_readme
    assert f"its {' / '.join(f'{over:.2f}' for over in over_plain)} ms over the plain tail" in bench_readme
    with_kernels = ' / '.join(f"{ms[s]['one op'] - ms[s]['plain']:.2f}" for s in stages)
    assert f'the SPE tail costs {with_kernels} ms more than the plain add + ReLU' in bench_readme


def test_float16_table_is_the_committed_run():
    """benchmarks/README.md's float16 autocast table is results/results_autocast_fp16.json: per-round median and
    spread of each model's ratio to its resnet164 baseline, train step and eval forward, and the baseline's step."""
    result = json.loads((RESULTS / 'results_autocast_fp16.json').read_text())
    assert result['meta']['autocast'] == 'float16' and result['meta']['batch'] == 8
    runs = result['models']
    bench_readme = (ROOT / 'benchmarks' / 'README.md').read_text()
    for name, base, label in (
            ('resnet164_spe +cpu_kernels (channels_last)', 'resnet164 (channels_last)', '| resnet164_spe, CPU kernels,'),
            ('resnet164_spe (channels_last)', 'resnet164 (channels_last)', '| resnet164_spe, default path,'),
            ('resnet164_se', 'resnet164', '| resnet164_se, NCHW')):
        row = next(line for line in bench_readme.splitlines() if line.startswith(label))
        cells = [c.strip() for c in row.strip('|').split('|')[1:]]
        expected = []
        for mode in ('train_step', 'eval_forward'):
            r = timing.per_round_ratios(runs[name][mode], runs[base][mode])
            expected.append(f"{r['median']:.3f}x ({r['min']:.3f}-{r['max']:.3f})")
        assert cells == expected, row
    step = runs['resnet164 (channels_last)']['train_step']['median_ms']
    assert f'{step:.0f} ms per float16 train step' in bench_readme


def _h200_profile():
    """``{(model, triton): (ms per step unprofiled, GPU ms per step)}`` and ``{label: host us}`` from
    cuda_profile_h200.log. GPU time: the first profile table's footer after each step line, over its three steps (the
    step line's own self CUDA figure counted kernels twice in that run)."""
    import re
    log = (RESULTS / 'cuda_profile_h200.log').read_text()
    steps = {(m, t == 'True'): (float(w), float(d) / 3) for m, t, w, d in re.findall(
        r'== (\S+) triton=(\w+): ([\d.]+) ms per step unprofiled;.*?Self CUDA time total: ([\d.]+)ms', log, re.S)}
    calls = {label: float(us) for label, us in re.findall(r'^(.+?): host ([\d.]+) us per call', log, re.M)}
    return log, steps, calls


def test_cuda_tables_and_figures_are_the_committed_h200_runs():
    """benchmarks/README.md's H200 figures: the train-step table and the Triton-vs-stock speed-ups are
    results/cuda_check_h200.json (whose cases all pass, the Triton kernels' gradients within the quoted bound of the
    stock path's), the profile table and per-call host times are results/cuda_profile_h200.log; the README's CUDA
    sentence quotes the same ratios."""
    report = json.loads((RESULTS / 'cuda_check_h200.json').read_text())
    assert report['gpu'] == 'NVIDIA H200' and report['failed'] == 0 and len(report['cases']) == 14
    assert all(c['ok'] for c in report['cases'])
    assert max(c['fp32_triton_vs_stock']['grad_rel'] for c in report['cases']) <= 1.6e-7
    timing = report['train_step_b128_channels_last']
    ms, ratio = timing['ms'], timing['ratio_to_resnet164']
    bench_readme = (ROOT / 'benchmarks' / 'README.md').read_text()
    for setting, label in (('fp32', '| fp32 |'), ('bf16_autocast', '| bf16 autocast |')):
        row = next(line for line in bench_readme.splitlines() if line.startswith(label))
        cells = [c.strip() for c in row.strip('|').split('|')[1:]]
        assert cells == [f"{ms[f'resnet164/{setting}']:.1f} ms"] + [
            f"{ratio[f'{m}/{setting}']:.2f}x" for m in ('resnet164_spe', 'resnet164_spe+triton', 'resnet164_se')], row
    flat = ' '.join(bench_readme.split())
    for setting in ('fp32', 'bf16_autocast'):
        stock, triton = ms[f'resnet164_spe/{setting}'], ms[f'resnet164_spe+triton/{setting}']
        assert f'{stock / triton:.2f}x faster' in flat or f'and {stock / triton:.2f}x under' in flat
        assert f'{stock:.1f} / {triton:.1f}' in flat
    assert 'resnet164/compiled' not in ms and not report['complete']  # the README says the compiled setting was cut
    assert f"resnet164 ({timing['setup_s']['resnet164/compiled']:.1f} s)" in flat
    assert f"resnet164_spe ({timing['setup_s']['resnet164_spe/compiled']:.1f} s)" in flat
    _, steps, calls = _h200_profile()
    for (model, triton), label in ((('resnet164', False), '| resnet164 |'),
                                   (('resnet164_spe', True), '| resnet164_spe, Triton kernels |'),
                                   (('resnet164_spe', False), '| resnet164_spe, stock ops |')):
        row = next(line for line in bench_readme.splitlines() if line.startswith(label) and 'ms |' in line)
        wall, gpu = steps[model, triton]
        assert [c.strip() for c in row.strip('|').split('|')[1:]] == [f'{wall:.1f}', f'{gpu:.1f} ms'], row
    plain_gpu, triton_gpu = steps['resnet164', False][1], steps['resnet164_spe', True][1]
    assert f'add only {triton_gpu - plain_gpu:.1f} ms of GPU time per step ({triton_gpu / plain_gpu:.2f}x' in flat
    assert f'({steps["resnet164", False][0]:.0f} ms of wall time for {plain_gpu:.1f} ms of GPU work)' in flat
    assert f"a bare Triton launch {calls['bare triton launch _dot_kernel']:.1f} us" in flat
    assert f"the custom op around it {calls['custom op map_dot']:.1f} us" in flat
    assert f"Python body {calls['python impl']:.1f} us" in flat
    readme = ' '.join((ROOT / 'README.md').read_text().split())
    assert (f"costs {ratio['resnet164_spe/fp32']:.2f}x resnet164's eager train step in stock ops and "
            f"{ratio['resnet164_spe+triton/fp32']:.2f}x with") in readme
    assert f"SE: {ratio['resnet164_se/fp32']:.2f}x" in readme


def _fake_cuda_check(monkeypatch, tmp_path, stop_at=None, args=()):
    """Run cuda_check.py's main without a GPU: CUDA calls stubbed, every train step a fake that advances a fake clock
    by its configuration's cost (resnet164 2, resnet164_spe on the default path 3, on the stock ops 4, resnet164_se
    3; resnet83 1, resnet83_spe 1.5, on the stock ops 2), the stock configuration failing in fp32, and ``stop_at`` (a
    configuration key) raising KeyboardInterrupt, as a time limit's signal would stop the run."""
    import types

    import torch

    from benchmarks import cuda_check
    clock = [0.0]
    monkeypatch.setattr(cuda_check, 'time', types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda *a: 'a stub')
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda *a: None)
    monkeypatch.setattr(cuda_check, 'default_path', lambda cuda: 'triton')
    cost = {'resnet164': 2., 'resnet164_spe': 3., 'resnet164_spe+stock': 4., 'resnet164_se': 3., 'resnet83': 1.,
            'resnet83_spe': 1.5, 'resnet83_spe+stock': 2.}

    def fake_step(model_name, triton, setting, cuda, batch=128):
        key = cuda_check.config_key(model_name, triton, setting)
        if key == stop_at:
            raise KeyboardInterrupt
        if key == 'resnet164_spe+stock/fp32':
            raise RuntimeError('no kernel here\nsecond line')

        def step():
            clock[0] += cost[key.split('/')[0]]
        return step
    monkeypatch.setattr(cuda_check, '_timed_step', fake_step)
    out = tmp_path / 'report.json'
    monkeypatch.setattr('sys.argv', ['cuda_check.py', '--no-cases', '--settings', 'fp32,compiled', '--out', str(out),
                                     *args])
    return cuda_check.main, out


def test_cuda_check_times_each_setting_against_resnet164_and_fails_on_a_configuration_that_fails(
        monkeypatch, tmp_path):
    """cuda_check.py's timing (no GPU; fake clock): ratios are to resnet164 in the same setting, the goals' keys in
    ratio_to_resnet164 and every configuration's in ratio_to_plain; a configuration that raises is left out with its
    error's first line and makes the exit code 1, and the report says what ran."""
    main, out = _fake_cuda_check(monkeypatch, tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 1
    report = json.loads(out.read_text())
    assert report['complete'] and report['failed'] == 0 and report['cases'] == [] and not report['cases_run']
    assert report['settings'] == ['fp32', 'compiled'] and report['default_path'] == 'triton'
    assert report['compiled_models'] == ['resnet164', 'resnet164_spe', 'resnet164_spe+stock']
    timing = report['train_step_b128_channels_last']
    assert timing['errors'] == {'resnet164_spe+stock/fp32': 'RuntimeError: no kernel here'}
    goals = {'resnet164_spe/fp32': 1.5, 'resnet164_se/fp32': 1.5, 'resnet164_spe/compiled': 1.5}
    assert timing['ratio_to_resnet164'] == pytest.approx(goals)
    assert timing['ratio_to_plain'] == pytest.approx({**goals, 'resnet164_spe+stock/compiled': 2.})
    assert timing['ms']['resnet164/fp32'] == pytest.approx(2000.)
    compiled = {'resnet164/compiled', 'resnet164_spe/compiled', 'resnet164_spe+stock/compiled'}
    assert set(timing['compiled_graphs']) == compiled
    assert set(timing['setup_s']) == {'resnet164/fp32', 'resnet164_spe/fp32', 'resnet164_spe+stock/fp32',
                                      'resnet164_se/fp32', *compiled}


def test_cuda_check_small_compiles_the_resnet83_pair_and_out_dir_names_the_file_by_gpu(monkeypatch, tmp_path):
    from benchmarks.cuda_check import gpu_slug
    assert [gpu_slug(n) for n in ('NVIDIA H200', 'NVIDIA H100 80GB HBM3', 'a stub')] == ['h200', 'h100', 'a_stub']
    main, _ = _fake_cuda_check(monkeypatch, tmp_path, args=('--small', '--out-dir', str(tmp_path / 'results')))
    with pytest.raises(SystemExit):
        main()
    timing = json.loads((tmp_path / 'results' / 'cuda_check_a_stub.json').read_text())['train_step_b128_channels_last']
    assert 'resnet164_spe/compiled' not in timing['ratio_to_resnet164']
    assert timing['ratio_to_plain']['resnet83_spe/compiled'] == pytest.approx(1.5)
    assert timing['ratio_to_plain']['resnet83_spe+stock/compiled'] == pytest.approx(2.)


def test_cuda_check_keeps_what_it_measured_when_a_time_limit_stops_it(monkeypatch, tmp_path):
    """Stopped while setting up compiled resnet164_spe, the report on disk holds the fp32 setting and resnet164's
    compilation time, and says it is not complete."""
    main, out = _fake_cuda_check(monkeypatch, tmp_path, stop_at='resnet164_spe/compiled')
    with pytest.raises(KeyboardInterrupt):
        main()
    report = json.loads(out.read_text())
    assert not report['complete']
    timing = report['train_step_b128_channels_last']
    assert timing['ratio_to_resnet164'] == pytest.approx({'resnet164_spe/fp32': 1.5, 'resnet164_se/fp32': 1.5})
    assert 'resnet164/compiled' in timing['setup_s']


def test_cuda_check_stopped_while_compiling_the_stock_ops_keeps_the_compiled_goal_measured_before(
        monkeypatch, tmp_path):
    """The compiled configurations are timed, interleaved, after each compilation from the second on: stopped while
    compiling resnet164_spe on the stock ops (the last), the report holds the compiled goal's ratio."""
    main, out = _fake_cuda_check(monkeypatch, tmp_path, stop_at='resnet164_spe+stock/compiled')
    with pytest.raises(KeyboardInterrupt):
        main()
    timing = json.loads(out.read_text())['train_step_b128_channels_last']
    assert timing['ratio_to_resnet164']['resnet164_spe/compiled'] == pytest.approx(1.5)
    assert 'resnet164_spe+stock/compiled' not in timing['ms']


def test_host_overhead_quick_run_reports_every_tail_at_every_stage_and_puts_the_kernels_back(tmp_path, capsys):
    """benchmarks/host_overhead.py --quick (CPU, Triton launches stubbed): its structure, not its timings."""
    from benchmarks import host_overhead
    from timm_spe import _triton_ops
    out = tmp_path / 'host.json'
    report = host_overhead.main(['--quick', '--out', str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    names = ['plain', 'se', 'spe stock', 'spe triton, custom ops', 'spe triton, direct']
    assert list(report['stages']) == ['layer1', 'layer2', 'layer3']
    assert [row['channels'] for row in report['stages'].values()] == [64, 128, 256]
    for row in report['stages'].values():
        assert list(row['us_per_tail']) == names
        assert all(0 < t['min'] <= t['median'] <= t['max'] for t in row['us_per_tail'].values())
    assert list(report['ms_per_step_over_plain']) == names and report['ms_per_step_over_plain']['plain'] == 0
    assert report['launches_per_tail'] == 4  # forward 1, backward 3
    assert report['meta']['kernels'].startswith('no-op stubs') and report['meta']['quick']
    assert report['meta']['threads'] == 1
    assert 'Triton launches stubbed: NOT a GPU timing' in capsys.readouterr().out
    assert not any(isinstance(getattr(_triton_ops, k), host_overhead._NoLaunch) for k in host_overhead.KERNELS)
