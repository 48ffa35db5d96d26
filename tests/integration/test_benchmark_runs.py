"""The benchmark scripts run as a user runs them (tiny sizes): their options, tables and committed-run readers."""
import json
import os
import subprocess
import sys

from helpers import ROOT

from benchmarks import allocator, goals, timing, workloads

RESULTS = ROOT / 'benchmarks' / 'results'  # the committed runs
RUN_SH_ALLOCATOR = {'MALLOC_MMAP_THRESHOLD_': '2147483647', 'MALLOC_TRIM_THRESHOLD_': '2147483647'}



def test_quick_run(tmp_path):
    out = tmp_path / 'r.json'
    env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}
    env.update(RUN_SH_ALLOCATOR)  # as `./run.sh bench` runs it
    proc = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'benchmark.py'), '--quick', '--out', str(out),
                           '--plot', str(tmp_path / 'r.png')], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert {k: v for k, v in r['meta']['allocator'].items() if k.startswith('MALLOC_')} == RUN_SH_ALLOCATOR
    assert 'MALLOC_MMAP_THRESHOLD_=2147483647' in r['table'].splitlines()[0]
    assert set(r['models']) == set(workloads.MODELS)
    for name in workloads.MODELS:
        for kind in ('eval_forward', 'train_step'):
            t = r['models'][name][kind]
            assert 0 < t['min_ms'] <= t['median_ms'] <= t['max_ms']
        assert r['memory'][name]['saved_for_backward_mib'] > 0
    assert r['ratios']['resnet164']['train_step'] == 1.0
    assert r['ratios']['resnet164' + workloads.CHANNELS_LAST]['train_step'] == 1.0  # its own baseline
    assert r['ratios']['resnet164']['train_step_per_round'] == {'median': 1.0, 'min': 1.0, 'max': 1.0}
    q = r['ratios']['resnet164_spe']['eval_forward_per_round']
    assert 0 < q['min'] <= q['median'] <= q['max']
    assert '| resnet164_spe | ' + timing.fmt_ratio(q) in proc.stdout
    assert r['meta']['cpu_kernels'] and 'resnet164_spe' + workloads.KERNELS in r['models']
    assert {m['module'] for m in r['modules']} == {'SpeModule', 'SpeModule +cpu_kernels', 'SEModule'}
    assert len(r['modules']) == 6
    assert len(r['reductions']) == 42 and all(row['time']['median_ms'] > 0 for row in r['reductions'])  # 21 ops x 2
    assert 'resnet164_spe +cpu_kernels vs unfused reference' in proc.stdout
    # the headroom: steps as a fraction of the GEMM peak measured in the same run
    assert r['gemm_peak_gflops'] > 0
    g = r['gflop']
    # backward of a conv net costs about twice its forward (input and weight gradients; the stem's input needs none)
    assert 2.5 < g['resnet164']['train_step'] / g['resnet164']['eval_forward'] <= 3.0
    # SPE adds no matmul / conv work: the same FLOPs to 0.1 %
    assert abs(g['resnet164_spe']['train_step'] / g['resnet164']['train_step'] - 1) < 1e-3
    assert set(r['fraction_of_gemm_peak']) == {  # resnet164 and resnet164_spe, in every layout and with the kernels
        n for n in workloads.MODELS if n.removesuffix(workloads.CHANNELS_LAST).removesuffix(workloads.KERNELS)
        in ('resnet164', 'resnet164_spe')}
    assert all(0 < q['train_step'] and 0 < q['eval_forward'] for q in r['fraction_of_gemm_peak'].values())
    assert 'train step, fraction of GEMM peak' in proc.stdout
    assert '| resnet164_spe |' in proc.stdout and (tmp_path / 'r.png').exists()


def test_primitives_alone_write_their_table(tmp_path):
    """``--primitives`` times only the primitives table (every op on every shape) and writes it with its meta."""
    out = tmp_path / 'p.json'
    proc = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'benchmark.py'), '--primitives', '--quick',
                           '--no-cpu-kernels', '--out', str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert set(r) == {'meta', 'reductions', 'table'} and not r['meta']['cpu_kernels']
    ops = {row['op'] for row in r['reductions']}
    assert {'amax + amin (SPE inference)', 'aminmax (one stock op for both)', 'aminmax, channels_last',
            'N x C gate: forward + closed-form backward', 'N x C gate: the same ops run from C++ (TorchScript)',
            'one N x C op (a multiply)'} <= ops
    assert not any('kernel' in op for op in ops) and len(r['reductions']) == 2 * len(ops)
    assert '| aminmax (one stock op for both) |' in proc.stdout


def test_profile_step_prints_where_each_model_spends_its_step():
    proc = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'profile_step.py'), '--channels-last', '--batch', '2',
                           '--steps', '1', '--warmup', '1', '--top', '5'], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith('channels_last, cpu kernels off, batch 2')
    assert lines[1].startswith('wall: resnet164 ') and ' resnet164_spe ' in lines[1]
    assert lines[2].split()[:4] == ['op', 'resnet164', 'resnet164_spe', 'diff']
    assert len(lines) == 3 + 5 + 1 + 5  # top 5, the heading of the last rows, the last 5


def test_profile_step_blocks_times_one_block_per_stage():
    proc = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'profile_step.py'), '--blocks', '--channels-last',
                           '--cpu-kernels', '--batch', '2', '--steps', '1', '--warmup', '1'],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith('channels_last, cpu kernels on, batch 2')
    assert [line.split()[:2] for line in lines[2:5]] == [['layer1', '2x64x32x32'], ['layer2', '2x128x16x16'],
                                                         ['layer3', '2x256x8x8']]
    diffs = [float(line.split()[-1]) for line in lines[2:5]]  # each stage's difference times its 18 blocks
    total = lines[5].removeprefix('all blocks: ').removesuffix(' ms per train step (forward + backward of the blocks alone)')
    assert abs(float(total) - sum(diffs)) <= 1  # printed rounded
    ops = [tuple(map(int, line.split()[-2].split('/'))) for line in lines[2:5]]  # resnet164 / resnet164_spe
    assert all(0 < plain < spe for plain, spe in ops)  # SPE's block dispatches more ops than the plain block's
    assert lines[6].startswith('difference per extra op (us): ') and len(lines[6].split(' / ')) == 3
    tiny = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'profile_step.py'), '--blocks', '--tiny',
                           '--channels-last', '--steps', '1', '--warmup', '1'], capture_output=True, text=True, timeout=600)
    assert tiny.returncode == 0, tiny.stderr[-3000:]
    assert [line.split()[1] for line in tiny.stdout.splitlines()[2:5]] == ['2x64x2x2', '2x128x2x2', '2x256x2x2']
    amp = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'profile_step.py'), '--blocks', '--tiny',
                          '--channels-last', '--cpu-kernels', '--autocast', 'bfloat16', '--steps', '1', '--warmup', '1'],
                         capture_output=True, text=True, timeout=600)
    assert amp.returncode == 0, amp.stderr[-3000:]
    assert amp.stdout.startswith('channels_last, bfloat16 autocast, cpu kernels on, batch 2')


def test_readme_pooled_goals_are_the_runs_of_2026_11_30():
    """The verdicts on the CPU speed goals in benchmarks/README.md are `--pool`'s over the three committed runs of 11-30."""
    files = [str(RESULTS / f)
             for f in ('results.json', 'results_2026-11-30-0531.json', 'results_cl_kernels_2026-11-30.json')]
    proc = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'benchmark.py'), '--pool', *files],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith('| goal | ratio goal | rounds (runs) |')
    # 15 rounds of each full run for every goal, 45 more of the pair the third run timed for its two goals
    assert proc.stdout.count(' | 30 (2) | ') == len(goals.ISSUE_17_GOALS) - 2
    assert proc.stdout.count(' | 75 (3) | ') == 2
    assert proc.stdout.strip() in (ROOT / 'benchmarks' / 'README.md').read_text(), \
        f'benchmarks/README.md pooled goals are stale; paste:\n{proc.stdout}'


def test_models_run_times_the_named_pairs_for_pooling(tmp_path):
    """``--models`` times only the named models and their resnet164 baselines; ``--pool`` then judges only the goals
    whose two models a run timed."""
    out = tmp_path / 'pair.json'
    proc = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'benchmark.py'), '--models',
                           'resnet164_spe (channels_last)', '--quick', '--no-cpu-kernels', '--out', str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result['models']) == ['resnet164 (channels_last)', 'resnet164_spe (channels_last)']
    assert all(len(result['models'][m][k]['times_ms']) == 2 for m in result['models']
               for k in ('eval_forward', 'train_step'))
    table = goals.pooled_goals_table([result])
    assert [row.split(' | ')[0] for row in table.splitlines()[2:]] == ['| default path, channels_last: train step']
    bad = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'benchmark.py'), '--models', 'resnet999'],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--models: unknown model(s) ['resnet999']" in bad.stderr


def test_compile_option_rejects_unknown_models():
    proc = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'benchmark.py'), '--compile', 'resnet164,resnet9000'],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown model(s) ['resnet9000']" in proc.stderr


def test_readme_shows_allocator_comparison_of_committed_runs():
    """benchmarks/README.md's allocator table is `--compare` of the committed glibc-defaults run and the run of the
    same code on the same machine with freed memory kept (results_2026-11-25.json, the main run then)."""
    default = json.loads((RESULTS / 'results_malloc_default.json').read_text())
    kept = json.loads((RESULTS / 'results_2026-11-25.json').read_text())
    assert default['meta']['allocator'] == {} and kept['meta']['allocator'] == RUN_SH_ALLOCATOR
    proc = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'benchmark.py'), '--compare',
                           str(RESULTS / 'results_malloc_default.json'),
                           str(RESULTS / 'results_2026-11-25.json')],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout.strip()
    assert table == allocator.compare_table(default, kept)
    shared = [n for n in allocator.COMPARED if n in kept['models'] and n in default['models']]
    assert len(shared) >= 4 and len(table.splitlines()) == 2 + 2 * len(shared)
    assert 'glibc malloc defaults' in table.splitlines()[0]
    assert table in (ROOT / 'benchmarks' / 'README.md').read_text(), \
        'benchmarks/README.md allocator table is stale: paste the --compare output'


def test_tail_autocast_times_the_four_tails_per_stage(tmp_path):
    out = tmp_path / 'tails.json'
    proc = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'tail_autocast.py'), '--batch', '2',
                           '--rounds', '3', '--dtype', 'float16', '--out', str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report['dtype'] == 'float16' and report['layout'] == 'channels_last' and report['rounds'] == 1
    assert list(report['stages']) == ['layer1', 'layer2', 'layer3']
    assert report['stages']['layer3']['blocks'] == 18
    assert set(report['stages']['layer1']['median_ms']) == {'plain tail', 'SPE fused', 'SPE fused +cpu_kernels',
                                                            'SPE plain ops'}
    lines = proc.stdout.splitlines()
    assert lines[0].startswith('float16 autocast, channels_last, batch 2')
    for stage in ('layer1 2x64x32x32', 'layer2 2x128x16x16', 'layer3 2x256x8x8'):
        assert any(line.startswith(stage + ': plain tail ') and 'SPE fused +cpu_kernels' in line for line in lines), \
            proc.stdout
    assert lines[-1].startswith('SPE over the plain tails, all blocks (ms per train step): SPE fused ')


def test_inference_tail_times_every_tail_per_stage(tmp_path):
    out = tmp_path / 'tail.json'
    proc = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'inference_tail.py'), '--batch', '2',
                           '--iterations', '7', '--out', str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report['meta']['dtype'] == 'bfloat16' and report['meta']['batch'] == 2
    assert list(report['ms_per_block']) == ['layer1', 'layer2', 'layer3']
    for stage, ms in report['ms_per_block'].items():
        assert list(ms) == ['plain', 'one op', 'kernel steps', 'default path', 'aminmax', 'pool reads'], stage
        assert all(t > 0 for t in ms.values())
        ops = report['aten_ops'][stage]
        assert list(ops) == list(ms), stage
        assert ops['plain'] == 2 and ops['one op'] == 1 and ops['pool reads'] == 2, ops  # add_ + relu_; one op; amax + amin
        assert ops['default path'] > ops['kernel steps'] > ops['pool reads'], ops
    bad = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'inference_tail.py'), '--iterations', '5'],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and '--iterations must be more than the 5 warm-up iterations, got 5' in bad.stderr
