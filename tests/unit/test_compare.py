"""Does SPE help? `timm-spe compare`: the table of two staged folders, the seed-spread rule, the block of
docs/results.md."""
import json

import pytest
import timm
from helpers import ROOT
from safetensors.torch import save_file

import timm_spe  # noqa: F401  (registers the models)
from timm_spe import compare
from timm_spe.card import PAPER_TOP1
from timm_spe.cli import main as cli
from timm_spe.hub import sha256_file


def _eval(model, top1, top5=99.5, loss=0.25, **kw):
    return {'model': model, 'tag': 'cifar10_e30', 'top1': top1, 'top5': top5, 'loss': loss, 'num_images': 10000,
            'num_images_in_split': 10000, 'data_label': 'CIFAR-10 test split (JPEG q75 copy)', 'epoch': 30,
            'epochs_scheduled': 30, **kw}


def _stage(root, model, result, card=True):
    folder = root / 'hub_cards' / f"{model}.{result['tag']}"
    folder.mkdir(parents=True)
    (folder / 'eval.json').write_text(json.dumps(result))
    if card:
        (folder / 'README.md').write_text(f'# Model card for {model}\n\n## Results\nx\n\n## Training\n- recipe\n')
    return folder


@pytest.fixture()
def bench(tmp_path):
    """A benchmark file with made-up ratios: the table must quote these, not the committed file's."""
    path = tmp_path / 'results.json'
    path.write_text(json.dumps({'ratios': {
        'resnet164 (channels_last)': {'train_step': 1.0},
        'resnet164_spe +cpu_kernels (channels_last)': {'train_step': 1.234},
        'resnet164_spe (channels_last)': {'train_step': 9.999}}}))
    return path


@pytest.fixture()
def pair(tmp_path):
    spe = _stage(tmp_path, 'resnet164_spe', _eval('resnet164_spe', 93.123, 99.811, 0.25112))
    plain = _stage(tmp_path, 'resnet164', _eval('resnet164', 92.456, 99.702, 0.26034))
    return spe, plain


def test_the_table_quotes_both_eval_files_and_the_benchmark(pair, bench):
    table = compare.comparison_table(*pair, benchmark=bench)
    rows = {line.split('|')[1].strip(): line for line in table.splitlines() if line.startswith('|')}
    spe, plain = rows['resnet164_spe (ours)'], rows['resnet164 (ours)']
    assert '`resnet164_spe.cifar10_e30`' in spe and '| 93.12 | 99.81 | 0.2511 | 30 of 30 | 1.737M | 0.248 | 1.234 |' in spe
    assert '`resnet164.cifar10_e30`' in plain and '| 92.46 | 99.70 | 0.2603 | 30 of 30 | 1.704M | 0.248 | 1.000 |' in plain
    diff = rows['**SPE - plain (ours)**']
    assert '**+0.67**' in diff and '+0.11' in diff and '-0.0092' in diff and '+0.032M' in diff
    assert 'CIFAR-10 test split (JPEG q75 copy), 10000 images' in table
    assert '9.999' not in table  # the setting ./run.sh train trains in: channels_last with the CPU kernels


def test_the_numbers_follow_the_files(pair, bench):
    spe, plain = pair
    (plain / 'eval.json').write_text(json.dumps(_eval('resnet164', 90.0, 98.0, 0.4, epoch=29)))
    table = compare.comparison_table(spe, plain, benchmark=bench)
    assert '| 90.00 | 98.00 | 0.4000 | 29 of 30 |' in table and '**+3.12**' in table
    (plain / 'eval.json').write_text(json.dumps({k: v for k, v in _eval('resnet164', 90.0).items()
                                                 if k not in ('epoch', 'epochs_scheduled')}))
    assert '| not recorded |' in compare.comparison_table(spe, plain, benchmark=bench)
    assert '| - |' in compare.comparison_table(spe, plain, benchmark=bench.parent / 'absent.json').splitlines()[4]


def test_paper_rows_are_table_1_and_labelled_as_the_papers(pair, bench):
    assert {m: v['top1'] for m, v in compare.PAPER_TABLE1.items()} == {
        m: PAPER_TOP1[(m, 'cifar10')] for m in ('resnet164', 'resnet164_spe')} == {'resnet164': 93.39,
                                                                                  'resnet164_spe': 94.80}
    assert compare.PAPER_TABLE1['resnet164']['params'] == '1.70M' and compare.PAPER_TABLE1['resnet164_spe'][
        'params'] == '1.74M'
    table = compare.comparison_table(*pair, benchmark=bench)
    paper = [line for line in table.splitlines() if 'paper, Table 1' in line and line.startswith('|')]
    assert len(paper) == 3 and '| 94.80 |' in paper[0] and '| 93.39 |' in paper[1] and '**+1.41**' in paper[2]
    assert all('(ours)' not in line for line in paper)


def test_the_seed_spread_is_cited_and_sets_the_threshold():
    assert compare.SEED_STD_TOP1 == 0.20
    for cited in ('arXiv 1603.05027', 'Table 4', '4.69±0.20', 'arXiv 1512.03385', 'Table 6', '6.61±0.16'):
        assert cited in compare.SEED_SPREAD_SOURCE
    assert round(compare.claim_threshold(), 2) == 0.57
    doc = (ROOT / 'docs' / 'comparison.md').read_text()
    assert '0.20 points' in doc and '0.57 points' in doc and '4.69 ± 0.20' in doc and '6.61 ± 0.16' in doc


@pytest.mark.parametrize('delta', [0.0, 0.2, 0.56, -0.56])
def test_a_difference_within_the_spread_is_never_claimed(delta):
    text = compare.verdict(delta)
    assert 'within the seed-to-seed spread' in text and 'no difference is claimed' in text and 'ahead' not in text


@pytest.mark.parametrize('delta, ahead', [(0.58, 'SPE'), (1.41, 'SPE'), (-0.6, 'the plain model')])
def test_a_difference_beyond_the_spread_says_who_is_ahead_and_that_it_is_one_seed(delta, ahead):
    text = compare.verdict(delta)
    assert 'larger than the seed-to-seed spread' in text and f'{ahead} is ahead by {abs(delta):.2f}' in text
    assert 'one run per model' in text


def test_the_table_applies_the_spread_rule(pair, bench):
    spe, plain = pair
    (spe / 'eval.json').write_text(json.dumps(_eval('resnet164_spe', 92.756)))  # +0.30 over the plain 92.456
    table = compare.comparison_table(spe, plain, benchmark=bench)
    assert '**Top-1 difference, SPE - plain (ours): +0.30 points**, **within the seed-to-seed spread**' in table
    (plain / 'eval.json').write_text(json.dumps(_eval('resnet164', 93.456)))  # now the plain one is 0.70 ahead
    table = compare.comparison_table(spe, plain, benchmark=bench)
    assert 'plain (ours): -0.70 points**, **larger than the seed-to-seed spread**: `resnet164` is ahead by 0.70' in table


def test_a_missing_folder_or_eval_json_is_one_line_with_the_commands(pair, tmp_path):
    spe, plain = pair
    missing = tmp_path / 'hub_cards' / 'resnet164.cifar10_e31'
    with pytest.raises(SystemExit) as info:
        cli(['compare', str(spe), str(missing)])
    message = str(info.value)
    assert message.startswith('timm-spe compare: error: ') and '\n' not in message and str(missing) in message
    assert ('`./run.sh train train_recipes/resnet164-cifar10_e31.yaml`' in message
            and '`timm-spe finish-run --recipe train_recipes/resnet164-cifar10_e31.yaml`' in message)
    (plain / 'eval.json').unlink()
    with pytest.raises(SystemExit) as info:
        cli(['compare', str(spe), str(plain)])
    message = str(info.value)
    assert f"'{plain / 'eval.json'}' is missing" in message and '\n' not in message
    assert '`timm-spe finish-run --recipe train_recipes/resnet164-cifar10_e30.yaml`' in message


@pytest.mark.parametrize('change, message', [
    (dict(tag='cifar10_e40'), 'same recipe'),
    (dict(data_label='CIFAR-10 test split (original, torchvision)'), 'differ in data_label'),
    (dict(num_images=1000), 'the full split'),
    (dict(model='resnet83'), 'plain control'),
], ids=['other tag', 'other data', 'subset', 'other model'])
def test_refuses_two_folders_that_are_not_comparable(pair, bench, change, message):
    spe, plain = pair
    (plain / 'eval.json').write_text(json.dumps({**_eval('resnet164', 92.0), **change}))
    with pytest.raises(ValueError, match=message):
        compare.comparison_table(spe, plain, benchmark=bench)


def test_the_spe_folder_comes_first(pair, bench):
    with pytest.raises(ValueError, match='SPE first'):
        compare.comparison_table(pair[1], pair[0], benchmark=bench)


def test_lambdas_of_the_staged_weights_and_an_eval_of_other_weights(tmp_path, bench):
    model = timm.create_model('resnet83_spe')  # lambda starts at 0.5 in every block
    folder = tmp_path / 'resnet83_spe.cifar10_e30'
    folder.mkdir()
    save_file(model.state_dict(), str(folder / 'model.safetensors'))
    (folder / 'eval.json').write_text(json.dumps(_eval('resnet83_spe', 91.0, weights_sha256=sha256_file(
        folder / 'model.safetensors'))))
    plain = _stage(tmp_path, 'resnet83', _eval('resnet83', 90.0))
    table = compare.comparison_table(folder, plain, benchmark=bench)
    assert '`timm-spe inspect resnet83_spe.cifar10_e30`) of the 27 SPE blocks: mean 0.500' in table
    assert '0 blocks below 0.1 (min pooling), 0 above 0.9 (max pooling), 27 mixing both' in table
    assert 'paper, Table 1' not in table  # Table 1 has ResNet-164 only
    (folder / 'eval.json').write_text(json.dumps(_eval('resnet83_spe', 91.0, weights_sha256='0' * 64)))
    with pytest.raises(ValueError, match='measured on other weights'):
        compare.comparison_table(folder, plain, benchmark=bench)


def test_write_puts_the_table_in_the_readme_and_before_the_cards_training_section(pair, tmp_path):
    readme = tmp_path / 'README.md'
    readme.write_text(f'# x\n\n{compare.BEGIN}\n{compare.pending_markdown()}\n{compare.END}\n\n## More\n')
    cli(['compare', str(pair[0]), str(pair[1]), '--write', '--readme', str(readme)])
    table = compare.comparison_table(*pair)
    assert readme.read_text() == f'# x\n\n{compare.BEGIN}\n{table}\n{compare.END}\n\n## More\n'
    for folder in pair:
        card = (folder / 'README.md').read_text()
        assert card.index('## Does SPE help?') < card.index(compare.BEGIN) < card.index(table) < card.index(
            compare.END) < card.index('## Training')
    before = {p: (p / 'README.md').read_text() for p in pair}
    cli(['compare', str(pair[0]), str(pair[1]), '--write', '--readme', str(readme)])  # again: replaced, not added
    assert {p: (p / 'README.md').read_text() for p in pair} == before


def test_write_changes_nothing_when_a_file_lacks_its_place(pair, tmp_path):
    readme = tmp_path / 'README.md'
    readme.write_text('# no markers\n')
    cards = {p: (p / 'README.md').read_text() for p in pair}
    with pytest.raises(SystemExit, match='has no <!-- spe-comparison:begin -->'):
        cli(['compare', str(pair[0]), str(pair[1]), '--write', '--readme', str(readme)])
    assert readme.read_text() == '# no markers\n' and {p: (p / 'README.md').read_text() for p in pair} == cards
    with pytest.raises(SystemExit, match='--readme is where --write writes'):
        cli(['compare', str(pair[0]), str(pair[1]), '--readme', str(readme)])


def test_the_table_says_which_resumes_replayed_the_first_epochs_data_order(pair, bench):
    """From each run's train.log beside hub_cards/: the SPE run's early resumes replayed epoch 1's batches."""
    spe, plain = pair
    assert 'Data order' not in compare.comparison_table(spe, plain, benchmark=bench)  # no logs: nothing to say
    start = 'Training with a single process on 1 device (cpu).\n'
    runs = spe.parent.parent / 'train_runs'
    (runs / 'resnet164_spe-cifar10_e30').mkdir(parents=True)
    (runs / 'resnet164_spe-cifar10_e30' / 'train.log').write_text(
        start + 'Train: 0 [ 0/9]\nTest: [  99/99]\n'
        + start + "Loaded checkpoint 'x' (epoch 0)\nTrain: 1 [ 0/9]\nTest: [  99/99]\n"
        + 'run.sh: resuming with --seed 44\n' + start + "Loaded checkpoint 'x' (epoch 1)\nTrain: 2 [ 0/9]\n"
        'Test: [  99/99]\n')
    (runs / 'resnet164-cifar10_e30').mkdir(parents=True)
    (runs / 'resnet164-cifar10_e30' / 'train.log').write_text(start + 'Train: 0 [ 0/9]\nTest: [  99/99]\n')
    table = compare.comparison_table(spe, plain, benchmark=bench)
    assert ("`resnet164_spe.cifar10_e30` was resumed 2 times: epoch 2 repeated epoch 1's sample order; "
            "`resnet164.cifar10_e30` was resumed 0 times: no epoch repeated another's sample order") in table


def test_the_table_says_when_the_runs_split_their_epochs_over_devices_differently(pair, bench):
    """CUDA epochs ran in TF32, CPU epochs in fp32: a different split is a second difference between the runs."""
    spe, plain = pair
    runs = spe.parent.parent / 'train_runs'

    def log(recipe, *devices):
        (runs / recipe).mkdir(parents=True, exist_ok=True)
        (runs / recipe / 'train.log').write_text(''.join(
            f'Training with a single process on 1 device ({d}).\n'
            + (f"Loaded checkpoint 'x' (epoch {e - 1})\n" if e else '') + f'Train: {e} [ 0/9]\nTest: [  99/99]\n'
            for e, d in enumerate(devices)))

    log('resnet164_spe-cifar10_e30', 'cuda', 'cpu', 'cpu')
    log('resnet164-cifar10_e30', 'cuda', 'cpu', 'cpu')
    table = compare.comparison_table(spe, plain, benchmark=bench)
    assert 'Devices' not in table  # the same split: nothing to say
    log('resnet164-cifar10_e30', 'cuda', 'cuda', 'cpu')
    table = compare.comparison_table(spe, plain, benchmark=bench)
    assert ('`resnet164_spe.cifar10_e30` epochs 1 on cuda, 2-3 on cpu; `resnet164.cifar10_e30` epochs 1-2 on cuda, '
            '3 on cpu (train.py logs)') in table
    assert 'TF32' in table and 'one pair of runs cannot separate from the model' in table


def test_plot_draws_both_runs_from_their_staged_summaries(pair, tmp_path, capsys):
    spe, plain = pair
    out = tmp_path / 'curves' / 'pair.png'
    with pytest.raises(SystemExit, match=r"summary.csv' is missing: --plot draws the staged runs"):
        cli(['compare', str(spe), str(plain), '--plot', str(out)])
    assert not out.exists()
    readme = tmp_path / 'README.md'
    readme.write_text(f'x\n{compare.BEGIN}\nold\n{compare.END}\n')
    cards = {f: (f / 'README.md').read_text() for f in (spe, plain)}
    with pytest.raises(SystemExit, match=r"summary.csv' is missing"):  # with --write too: checked before writing
        cli(['compare', str(spe), str(plain), '--write', '--readme', str(readme), '--plot', str(out)])
    assert 'old' in readme.read_text() and {f: (f / 'README.md').read_text() for f in (spe, plain)} == cards
    for folder, top1 in ((spe, 93.1), (plain, 92.4)):
        (folder / 'summary.csv').write_text('epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n'
                                            f'0,1.5,1.4,50.0,90.0,0.1\n1,0.5,0.6,{top1},99.0,0.0\n')
    cli(['compare', str(spe), str(plain), '--plot', str(out)])
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and out.stat().st_size > 10_000
    assert f'wrote {out}' in capsys.readouterr().out


def test_update_block_replaces_only_the_block():
    text = f'a\n{compare.BEGIN}\nold\n{compare.END}\nb\n'
    assert compare.update_block(text, 'new \\1') == f'a\n{compare.BEGIN}\nnew \\1\n{compare.END}\nb\n'
    with pytest.raises(ValueError, match='has no'):
        compare.update_block('no markers', 'new')


def test_readme_block_is_the_placeholder_until_both_folders_are_staged(pair, bench, tmp_path):
    spe, plain = pair
    (plain / 'eval.json').unlink()
    block = compare.readme_block(tmp_path, benchmark=bench)
    # it says which folder is staged, and lists the commands of the one still missing only
    assert block == compare.pending_markdown(staged=['hub_cards/resnet164_spe.cifar10_e30'])
    assert block.startswith('*Pending:* `hub_cards/resnet164_spe.cifar10_e30/` is staged; '
                            '`hub_cards/resnet164.cifar10_e30/` is not yet:')
    for command in ('TRAIN_RUNS=train_runs ./run.sh train train_recipes/resnet164-cifar10_e30.yaml   # resumes the run to '
                    'its last epoch, then stages it (finish-run)',
                    'timm-spe compare hub_cards/resnet164_spe.cifar10_e30 hub_cards/resnet164.cifar10_e30 --write'):
        assert command in block
    assert 'resnet164_spe-cifar10_e30.yaml' not in block and 'timm-spe finish-run' not in block  # run.sh runs it
    (spe / 'eval.json').rename(spe / 'eval.json.bak')  # neither staged: both runs' commands
    block = compare.readme_block(tmp_path, benchmark=bench)
    assert block == compare.pending_markdown() and 'are not staged yet' in block
    for command in ('TRAIN_RUNS=train_runs ./run.sh train train_recipes/resnet164_spe-cifar10_e30.yaml',
                    'TRAIN_RUNS=train_runs ./run.sh train train_recipes/resnet164-cifar10_e30.yaml\n'):
        assert command in block
    (spe / 'eval.json.bak').rename(spe / 'eval.json')
    (plain / 'eval.json').write_text(json.dumps(_eval('resnet164', 92.0)))
    assert compare.readme_block(tmp_path, benchmark=bench) == compare.comparison_table(spe, plain, benchmark=bench)


def test_readme_comparison_is_what_the_generator_makes():
    """The block of docs/results.md (where --write writes by default): the placeholder while the e30 folders lack
    eval.json, else their generated table."""
    assert compare.RESULTS_DOC == 'docs/results.md'
    readme = (ROOT / compare.RESULTS_DOC).read_text()
    assert readme.count(compare.BEGIN) == 1 and readme.count(compare.END) == 1
    assert compare.update_block(readme, compare.readme_block(ROOT)) == readme, \
        ('docs/results.md comparison is stale: timm-spe compare hub_cards/resnet164_spe.cifar10_e30 '
         'hub_cards/resnet164.cifar10_e30 --write')


def test_the_readmes_reading_of_the_pair_quotes_both_staged_summaries():
    """The prose under the table of docs/results.md: which epochs SPE led, and how the plain model fared at lr 0.1,
    from the two committed summary.csv files (a restaged run changes them and this test names the stale sentence)."""
    from timm_spe.train_run import read_summary
    spe, plain = (read_summary(ROOT / f / 'summary.csv') for f in (compare.DEFAULT_SPE, compare.DEFAULT_PLAIN))
    readme = ' '.join((ROOT / 'docs' / 'results.md').read_text().split())
    led = [a['epoch'] + 1 for a, b in zip(spe, plain) if a['eval_top1'] > b['eval_top1']]
    behind = sum(a['eval_top1'] < b['eval_top1'] for a, b in zip(spe, plain))
    delta = spe[-1]['eval_top1'] - plain[-1]['eval_top1']
    assert delta < 0 and f'the plain model finished {-delta:.2f} points ahead' in readme
    assert f"was ahead at {behind} of the {len(spe)} per-epoch evaluations (SPE led at epochs {', '.join(map(str, led))} only)" in readme
    worst = max(plain, key=lambda r: r['eval_loss'])
    dip = min(plain[5:], key=lambda r: r['eval_top1'])
    after = plain[dip['epoch'] + 1]
    assert (f"(largest test loss {worst['eval_loss']:.2f}, after epoch {worst['epoch'] + 1}; one dip to "
            f"{dip['eval_top1']:.2f} % at epoch {dip['epoch'] + 1}, {after['eval_top1']:.2f} % the next)") in readme
    assert (ROOT / 'docs' / 'comparison_cifar10_e30.png').is_file()
    plain_top1 = json.loads((ROOT / compare.DEFAULT_PLAIN / 'eval.json').read_text())['top1']
    paper = compare.PAPER_TABLE1['resnet164']['top1']  # "Short of the goal": how much of the gap is the budget
    assert f"reached {plain_top1:.2f}, {paper - plain_top1:.2f} points below the paper's plain {paper:.2f}" in readme
