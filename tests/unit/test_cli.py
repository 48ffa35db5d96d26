"""timm-spe command line: eval, inspect, finish-run (the train.py -> card pipeline), errors."""
import json

import pytest
import timm
import torch
import yaml
from helpers import ROOT
from safetensors.torch import load_file

import timm_spe  # noqa: F401
import timm_spe.cli.evaluate as cli_evaluate
from timm_spe.cli import main as cli
from timm_spe.labels import CIFAR10_LABELS


def test_finish_run_stages_a_complete_card(run_dir, tmp_path):
    out = tmp_path / 'staged'
    cli(['finish-run', '--recipe', str(run_dir['recipe']), '--out', str(out)])
    names = sorted(p.name for p in out.iterdir())
    assert names == ['README.md', 'args.yaml', 'config.json', 'eval.json', 'model.safetensors', 'spe_lambda.png',
                     'summary.csv', 'training_curve.png']
    # the run's records go with the weights: summary.csv as one table (the resume's second header dropped)
    assert (out / 'summary.csv').read_text() == (
        'epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n0,2.0,1.9,20.0,60.0,0.1\n1,1.9,1.8,22.0,61.0,0.05\n'
        '2,1.8,1.85,21.0,62.0,0.0\n')
    assert (out / 'args.yaml').read_text() == 'model: resnet83_spe\n'
    result = json.loads((out / 'eval.json').read_text())
    assert result['num_images'] == 10 and result['model'] == 'resnet83_spe' and result['tag'] == 'cifar10_tiny'
    assert result['epoch'] == 3 and result['epochs_scheduled'] == 3  # of last.pth.tar, recorded for the comparison
    assert result['data_label'] == 'CIFAR-10 test split (original, torchvision)'  # the data's name as people write it
    card = (out / 'README.md').read_text()
    assert f"{result['top1']:.2f}" in card and '3 of 3 epochs of batch 128' in card
    # every difference from the paper: the recipe's own header, and where each epoch ran (GPU epochs: TF32)
    assert "Its header comment (this project's recipes list there every difference from the paper's recipe, with " \
           'sources):\n\n' \
           '> A tiny recipe for the tests.\n> Differences from the paper: 3 epochs.\n' in card
    assert "epochs 1 on cuda, 2-3 on cpu (train.py's log); on cuda train.py sets" in card and 'TF32' in card
    staged = load_file(out / 'model.safetensors')
    final = torch.load(run_dir['run'] / 'last.pth.tar', weights_only=True)['state_dict']
    assert all(torch.equal(staged[k], final[k]) for k in staged)  # the final epoch, not model_best
    assert '![training curve' in card and '(spe_lambda.png)' in card and '94.03%' in card
    # how far from the paper, from the two numbers, and where the per-epoch numbers are
    gap = 94.03 - result['top1']
    assert f"These weights measure {result['top1']:.2f}%: {gap:.2f} points below it, after 3 training epochs " \
           "against the paper's 164." in card
    assert "`args.yaml` (train.py's full arguments as of its last start: a resumed run's `resume`, `seed` and " \
           "`device` are that start's); `summary.csv` (train.py's per-epoch" in card
    # the paper's protocol next to ours: the best epoch on the test split, labelled, from the staged summary.csv
    assert "by that protocol this run reaches **22.00%**, at epoch 2 of 3 (train.py's per-epoch eval, " \
           "`summary.csv`): selected on the test split, the paper's protocol" in card
    assert "These weights and the results above are the final epoch's" in card
    with pytest.raises(SystemExit, match='not empty'):  # never silently replaced
        cli(['finish-run', '--recipe', str(run_dir['recipe']), '--out', str(out)])


def test_a_run_evaluated_on_a_validation_split_gets_no_best_epoch_figure(run_dir, tmp_path):
    """Choosing an epoch on a validation split is model selection, not the paper's test-split protocol: the card
    has no such line (train.py's args.yaml tells which split it evaluated on)."""
    (run_dir['run'] / 'args.yaml').write_text('model: resnet83_spe\nval_split: validation\n')
    cli(['finish-run', '--recipe', str(run_dir['recipe']), '--out', str(tmp_path / 'staged')])
    card = (tmp_path / 'staged' / 'README.md').read_text()
    assert 'These weights measure' in card and 'by that protocol' not in card


def test_finish_run_stages_the_plain_control_and_compare_reads_both(run_dir, tmp_path, capsys):
    """The plain model has no lambdas to plot; its folder and the SPE one's make the comparison table."""
    run = run_dir['run'].parent / 'resnet83-cifar10_tiny'
    run.mkdir()
    (run / 'summary.csv').write_text((run_dir['run'] / 'summary.csv').read_text())
    torch.save({'epoch': 2, 'arch': 'resnet83', 'state_dict': timm.create_model('resnet83').state_dict()},
               run / 'last.pth.tar')
    recipe = tmp_path / 'plain.yaml'
    recipe.write_text(yaml.safe_dump({**yaml.safe_load(run_dir['recipe'].read_text()), 'model': 'resnet83',
                                      'experiment': 'resnet83-cifar10_tiny'}))
    cli(['finish-run', '--recipe', str(recipe), '--out', str(tmp_path / 'plain')])
    assert sorted(p.name for p in (tmp_path / 'plain').iterdir()) == [
        'README.md', 'config.json', 'eval.json', 'model.safetensors', 'summary.csv', 'training_curve.png']  # no args.yaml
    card = (tmp_path / 'plain' / 'README.md').read_text()
    assert 'without attention' in card and '93.62%' in card and 'spe_lambda' not in card
    cli(['finish-run', '--recipe', str(run_dir['recipe']), '--out', str(tmp_path / 'spe')])
    capsys.readouterr()
    cli(['compare', str(tmp_path / 'spe'), str(tmp_path / 'plain')])
    table = capsys.readouterr().out
    assert '| resnet83_spe (ours) | `resnet83_spe.cifar10_tiny` |' in table and '| 3 of 3 |' in table
    assert 'of the 27 SPE blocks' in table and 'the seed-to-seed spread' in table


def _stop_after_two_epochs(run):
    """The fixture's run as it stood after epoch 2 of 3: summary rows 0-1 and epoch 1's checkpoint."""
    summary = run / 'summary.csv'
    summary.write_text('\n'.join(summary.read_text().splitlines()[:3]) + '\n')  # epochs 0-1 of 3
    torch.save({'epoch': 1, 'arch': 'resnet83_spe', 'state_dict': timm.create_model('resnet83_spe').state_dict()},
               run / 'last.pth.tar')


def test_finish_run_refuses_a_run_that_has_not_reached_its_epochs(run_dir, tmp_path):
    _stop_after_two_epochs(run_dir['run'])
    with pytest.raises(SystemExit, match=r'stopped after epoch 2 of 3: `./run.sh train .*` resumes it'):
        cli(['finish-run', '--recipe', str(run_dir['recipe']), '--out', str(tmp_path / 'staged')])
    assert not (tmp_path / 'staged').exists()
    cli(['finish-run', '--recipe', str(run_dir['recipe']), '--out', str(tmp_path / 'staged'), '--unfinished'])
    assert (tmp_path / 'staged' / 'model.safetensors').is_file()


def test_finish_run_stages_one_epoch_while_train_py_goes_on_writing_the_run(run_dir, tmp_path, monkeypatch):
    """--unfinished on a run still training: train.py finishes the next epoch while the eval runs (a new
    last.pth.tar, summary row and log lines). The folder staged is all of the epoch finish-run started with: its
    weights, their eval, a budget and curve that stop there, and eval.json naming the run's checkpoint."""
    run = run_dir['run']
    _stop_after_two_epochs(run)
    epoch2 = torch.load(run / 'last.pth.tar', weights_only=True)['state_dict']
    real_evaluate = cli_evaluate.evaluate

    def evaluate_while_training_goes_on(*args, **kwargs):
        result = real_evaluate(*args, **kwargs)
        torch.manual_seed(1)  # epoch 3 ends: other weights, written the way train.py writes them
        torch.save({'epoch': 2, 'arch': 'resnet83_spe', 'state_dict': timm.create_model('resnet83_spe').state_dict()},
                   run / 'next.pth.tar')
        (run / 'next.pth.tar').replace(run / 'last.pth.tar')
        with open(run / 'summary.csv', 'a') as f:
            f.write('2,1.8,1.85,25.0,62.0,0.0\n')  # a better epoch 3: not staged, so not the best here
        return result

    monkeypatch.setattr(cli_evaluate, 'evaluate', evaluate_while_training_goes_on)
    out = tmp_path / 'staged'
    cli(['finish-run', '--recipe', str(run_dir['recipe']), '--out', str(out), '--unfinished'])
    staged = load_file(out / 'model.safetensors')
    assert all(torch.equal(staged[k], epoch2[k]) for k in staged)
    assert not all(torch.equal(staged[k], v) for k, v in
                   torch.load(run / 'last.pth.tar', weights_only=True)['state_dict'].items() if k in staged)
    result = json.loads((out / 'eval.json').read_text())
    assert result['epoch'] == 2 and result['checkpoint'].endswith('resnet83_spe-cifar10_tiny/last.pth.tar')
    card = (out / 'README.md').read_text()
    assert "2 of 3 epochs of batch 128 (train.py summary.csv); epochs 1 on cuda, 2 on cpu (train.py's log)" in card
    assert 'this run reaches **22.00%**, at epoch 2 of 2' in card  # the best of the staged epochs only


def test_inspect_prints_every_block(run_dir, capsys, tmp_path):
    cli(['inspect', 'resnet83_spe', '--checkpoint', str(run_dir['run'] / 'model_best.pth.tar'),
         '--plot', str(tmp_path / 'l.png')])
    out = capsys.readouterr().out
    assert 'layer1.0' in out and 'layer3.8' in out and '27 SPE blocks' in out
    assert (tmp_path / 'l.png').exists()
    with pytest.raises(SystemExit, match='no SPE layers'):
        cli(['inspect', 'resnet83', '--checkpoint', str(_plain_checkpoint(tmp_path))])


def _plain_checkpoint(tmp_path):
    path = tmp_path / 'plain.pth.tar'
    torch.save({'state_dict': timm.create_model('resnet83').state_dict(), 'arch': 'resnet83'}, path)
    return path


def test_bad_inputs(run_dir, tmp_path):
    with pytest.raises(SystemExit, match='unknown model'):
        cli(['eval', 'resnet84_spe', '--checkpoint', 'x', '--data-dir', str(run_dir['data'] / 'test')])
    with pytest.raises(SystemExit, match='does not exist'):
        cli(['eval', 'resnet83_spe', '--checkpoint', str(tmp_path / 'missing.pth'), '--data-dir', '.'])
    with pytest.raises(SystemExit, match='not a folder'):
        cli(['eval', 'resnet83_spe', '--checkpoint', str(run_dir['run'] / 'model_best.pth.tar'),
             '--data-dir', str(tmp_path / 'nodata')])


def test_eval_records_a_class_subset_and_skipped_images(run_dir, make_image_folder, tmp_path, capsys):
    ckpt = str(run_dir['run'] / 'model_best.pth.tar')
    data = make_image_folder(['cat', 'dog', 'truck'], per_class=2)
    (data / 'dog' / '0001.jpg').write_bytes(b'')
    with pytest.raises(SystemExit, match=r"1 of 6 images in .* cannot be read: dog/0001\.jpg"):
        cli(['eval', 'resnet83_spe', '--checkpoint', ckpt, '--data-dir', str(data), '--allow-class-subset'])
    out = tmp_path / 'r.json'
    cli(['eval', 'resnet83_spe', '--checkpoint', ckpt, '--data-dir', str(data), '--allow-class-subset',
         '--skip-bad-images', '--out', str(out)])
    r = json.loads(out.read_text())
    assert r['num_images'] == 5 and r['skipped_images'] == 1 and r['skipped_image_files'] == ['dog/0001.jpg']
    assert r['class_subset'] is True and r['classes_evaluated'] == ['cat', 'dog', 'truck']
    assert r['label_names'] == list(CIFAR10_LABELS) and r['ema'] is False
    assert 'only 3 of 10 classes; 1 unreadable images skipped' in capsys.readouterr().out


def test_eval_ema_without_ema_weights_is_an_error(run_dir, tmp_path):
    from safetensors.torch import save_file

    from timm_spe.hub import weights_sha256
    data = str(run_dir['data'] / 'test')
    model = timm.create_model('resnet83_spe')
    save_file(model.state_dict(), tmp_path / 'w.safetensors')
    torch.save(model.state_dict(), tmp_path / 'bare.pth')
    for ckpt, message in ((tmp_path / 'w.safetensors', 'is a safetensors file: one set of weights, no state_dict_ema'),
                          (tmp_path / 'bare.pth', 'is a bare state dict: one set of weights, no state_dict_ema'),
                          (run_dir['run'] / 'model_best.pth.tar', 'has no state_dict_ema')):
        with pytest.raises(SystemExit, match=message):
            cli(['eval', 'resnet83_spe', '--checkpoint', str(ckpt), '--ema', '--data-dir', data])
    with pytest.raises(SystemExit, match=r"--ema needs --checkpoint FILE .* 'resnet83_spe\.cifar10' have no EMA copy"):
        cli(['eval', 'resnet83_spe.cifar10', '--ema', '--data-dir', data])  # refused before any download
    ema = timm.create_model('resnet83_spe')
    torch.save({'arch': 'resnet83_spe', 'state_dict': model.state_dict(), 'state_dict_ema': ema.state_dict()},
               tmp_path / 'ema.pth.tar')
    cli(['eval', 'resnet83_spe', '--checkpoint', str(tmp_path / 'ema.pth.tar'), '--ema', '--data-dir', data,
         '--out', str(tmp_path / 'r.json')])
    r = json.loads((tmp_path / 'r.json').read_text())
    assert r['ema'] is True and r['weights_sha256'] == weights_sha256(ema) != weights_sha256(model)


@pytest.mark.skipif(not (ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz').exists(),
                    reason='needs ../shared/data/cifar10-jpeg.tar.gz (the CIFAR-10 JPEG copy)')
def test_eval_on_real_cifar10_subset(tmp_path):
    import tarfile
    with tarfile.open(ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz') as tar:
        members = [m for m in tar if m.isfile() and '/test/' in m.name and m.name.endswith(('/0000.jpg', '/0001.jpg'))]
        tar.extractall(tmp_path, members=members, filter='data')
    test_dir = tmp_path / 'cifar10-jpeg' / 'test'
    assert len(list(test_dir.glob('*/*.jpg'))) == 20
    out = tmp_path / 'r.json'
    cli(['eval', 'resnet83_spe', '--checkpoint', str(_plain_spe(tmp_path)), '--data-dir', str(test_dir),
         '--limit', '10', '--out', str(out)])
    r = json.loads(out.read_text())
    assert r['num_images'] == 10 and 0 <= r['top1'] <= 100 and r['top1'] <= r['top5']


def _plain_spe(tmp_path):
    path = tmp_path / 'spe.pth.tar'
    torch.save({'state_dict': timm.create_model('resnet83_spe').state_dict(), 'arch': 'resnet83_spe'}, path)
    return path


# --- CLI conventions, timm's scripts through `timm-spe run`, optional extras ---

TIMM_VALIDATE = ROOT / '.cache' / 'pytorch-image-models' / 'validate.py'


def test_version_and_every_option_has_help_with_its_default(capsys):
    with pytest.raises(SystemExit) as info:
        cli(['--version'])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f'timm-spe {timm_spe.__version__}'
    from timm_spe.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == '_SubParsersAction')
    for name, p in sub.choices.items():
        assert 'example:\n  timm-spe ' + name in p.format_help().replace('\n  timm-spe ' + name, '\n  timm-spe ' + name)
        for action in p._actions:
            if action.option_strings and action.dest != 'help':
                text = p.formatter_class('x')._get_help_string(action)
                assert action.help and ('default' in text or 'required' in text), (name, action.option_strings)


def test_upload_revision_and_commit_message(tmp_path):
    from unittest import mock
    src = tmp_path / 'w.safetensors'
    from safetensors.torch import save_file
    save_file(timm.create_model('resnet83_spe').state_dict(), str(src))
    cli(['publish', str(src), '--model', 'resnet83_spe', '--tag', 'cifar10', '--out', str(tmp_path / 's'), '--dry-run'])
    api = mock.MagicMock()
    api.file_exists.return_value = False
    with mock.patch('timm_spe.hub.HfApi', return_value=api):
        cli(['upload', str(tmp_path / 's'), '--revision', 'e30', '--commit-message', 'New weights'])
    api.create_branch.assert_called_once_with('timm-spe/resnet83_spe.cifar10', branch='e30', exist_ok=True)
    api.file_exists.assert_called_once_with('timm-spe/resnet83_spe.cifar10', 'model.safetensors', revision='e30')
    kw = api.upload_folder.call_args.kwargs
    assert kw['revision'] == 'e30' and kw['commit_message'] == 'New weights' and kw['create_pr'] is False


def test_eval_device_amp_channels_last_and_json(run_dir, tmp_path, capsys):
    cli(['eval', 'resnet83_spe', '--checkpoint', str(run_dir['run'] / 'last.pth.tar'), '--data-dir',
         str(run_dir['data'] / 'test'), '--device', 'cpu', '--amp', '--channels-last', '--json', '--batch-size', '4',
         '--workers', '0', '--limit', '4'])
    result = json.loads(capsys.readouterr().out)  # stdout is the JSON alone
    assert result['device'] == 'cpu' and result['amp'] == 'bfloat16' and result['channels_last'] is True
    assert result['num_images'] == 4 and result['command'].endswith('--workers 0 --limit 4')


def test_recorded_command_is_shell_quoted(run_dir, tmp_path):
    out = tmp_path / 'r.json'
    cli(['eval', 'resnet83_spe', '--checkpoint', str(run_dir['run'] / 'last.pth.tar'), '--data-dir',
         str(run_dir['data'] / 'test'), '--data-label', 'ten images (tiny)', '--limit', '2', '--out', str(out)])
    import shlex
    argv = shlex.split(json.loads(out.read_text())['command'])
    assert argv[argv.index('--data-label') + 1] == 'ten images (tiny)'


@pytest.mark.parametrize('argv', [['inspect', 'resnet83_spe', '--plot', 'x.png'], ['finish-run', '--recipe', 'r.yaml']])
def test_missing_matplotlib_is_a_one_line_error(argv, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'matplotlib' else real(name, *a))
    with pytest.raises(SystemExit, match=r"pip install 'timm-spe\[plot\]'") as info:
        cli(argv)
    assert '\n' not in str(info.value)


def test_run_a_missing_script_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match='does not exist'):
        cli(['run', str(tmp_path / 'validate.py'), '--model', 'resnet164_spe'])


TIMM_INFERENCE = ROOT / '.cache' / 'pytorch-image-models' / 'inference.py'


def test_eval_of_torchvision_cifar_without_its_files_names_download(tmp_path):
    """`--dataset torch/cifar10` on a folder without torchvision's files: a one-line error naming --download, and
    nothing is fetched unless asked."""
    with pytest.raises(SystemExit, match=r'no cifar-10-batches-py in .*: pass --download'):
        cli(['eval', 'resnet164_spe', '--dataset', 'torch/cifar10', '--data-dir', str(tmp_path / 'cifar10')])
    assert not (tmp_path / 'cifar10').exists()
