"""The CLI speaks in one-line errors: `timm-spe COMMAND: error: <what and the fix>`, exit status 1, a traceback
only with --debug, and never a token.

Upload failures run against servers on 127.0.0.1 only: an endpoint nobody listens on (no network), and a tiny
HTTP server that answers every request with an error *echoing the request's Authorization header* (the worst
case for a token leak). No test reaches the internet.
"""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from unittest import mock

import pytest
import timm
import torch
from helpers import minimal_staged_folder
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file

import timm_spe  # noqa: F401
from timm_spe.cli import main as cli

TOKEN = 'hf_FAKEtokenDoNotPrint0123456789abcdef'
UNREACHABLE = 'http://127.0.0.1:9'  # the discard port: nothing listens there


def _fails(argv, capsys, debug=False):
    """Run the CLI in-process (``debug``: as ``timm-spe --debug ...``); it must exit with one line
    ``timm-spe COMMAND: error: ...`` and a traceback on stderr only with --debug. Returns (line, stderr)."""
    argv = (['--debug'] if debug else []) + list(argv)
    debug = '--debug' in argv
    command = next(a for a in argv if a != '--debug')
    with pytest.raises(SystemExit) as info:
        cli(argv)
    line = info.value.code
    assert isinstance(line, str), line  # a string: Python prints it on stderr and exits with status 1
    assert '\n' not in line and line.startswith(f'timm-spe {command}: error: '), line
    out, err = capsys.readouterr()
    if debug:
        assert 'Traceback (most recent call last)' in err
    else:
        assert 'Traceback' not in err
    for text in (line, out, err):
        assert TOKEN not in text and TOKEN[3:] not in text
    return line, err


@pytest.fixture()
def hub_env(monkeypatch, tmp_path):
    """No stored token, no offline mode; the Hub endpoint set per test (in-process: huggingface_hub's constants)."""
    for var in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_OIDC_RESOURCE', 'HF_HUB_OFFLINE'):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hf_constants, 'HF_TOKEN_PATH', str(tmp_path / 'no-token-here'))
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(hf_constants, 'ENDPOINT', UNREACHABLE)

    def set_endpoint(url, token=TOKEN):
        monkeypatch.setattr(hf_constants, 'ENDPOINT', url)
        if token:
            monkeypatch.setenv('HF_TOKEN', token)
    return set_endpoint


@pytest.fixture()
def echo_server():
    """Answers every request with ``status`` and an error naming the request's Authorization header."""
    state = {'status': 401, 'requests': 0}

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            state['requests'] += 1
            self.rfile.read(int(self.headers.get('Content-Length') or 0))
            said = f"bad credentials, you sent Authorization: {self.headers.get('Authorization')}"
            body = json.dumps({'error': said}).encode()
            self.send_response(state['status'])
            self.send_header('Content-Type', 'application/json')
            self.send_header('X-Error-Message', said)
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f'http://127.0.0.1:{server.server_address[1]}'
    finally:
        server.shutdown()
        server.server_close()


# --- corrupt safetensors -------------------------------------------------------------------------------------

CORRUPT_CASES = {
    'convert': lambda w, t: ['convert', str(w), '--model', 'resnet83_spe.cifar10', '--out', str(t / 'o.safetensors')],
    'eval': lambda w, t: ['eval', 'resnet83_spe', '--checkpoint', str(w), '--data-dir', str(t)],
    'inspect': lambda w, t: ['inspect', 'resnet83_spe', '--checkpoint', str(w)],
    'publish': lambda w, t: ['publish', str(w), '--model', 'resnet83_spe', '--tag', 'cifar10', '--dry-run',
                             '--out', str(t / 's')],
}


@pytest.mark.parametrize('command', list(CORRUPT_CASES))
def test_corrupt_safetensors(command, weights, tmp_path, capsys):
    argv = CORRUPT_CASES[command](weights['corrupt'], tmp_path)
    line, _ = _fails(argv, capsys)
    assert f"'{weights['corrupt']}' is not a readable safetensors file" in line
    assert 'truncated or corrupt' in line and 'download it again' in line
    _, err = _fails(argv, capsys, debug=True)
    assert 'SafetensorError' in err
    assert not (tmp_path / 'o.safetensors').exists() and not (tmp_path / 's').exists()


def test_corrupt_weights_in_a_staged_folder(weights, tmp_path, capsys):
    folder = minimal_staged_folder(tmp_path / 'staged', weights=weights['corrupt'])
    line, _ = _fails(['upload', str(folder)], capsys)
    assert 'is not a readable safetensors file' in line and 're-download' in line


# --- DataParallel-style and non-finite weights ---------------------------------------------------------------------

def test_a_module_prefixed_safetensors_file_loads_in_every_command_as_its_pth_tar_does(tmp_path, capsys):
    """DataParallel / DDP state dicts carry a ``module.`` prefix; the .pth.tar path dropped it, the safetensors one
    blamed --model."""
    torch.manual_seed(0)
    model = timm.create_model('resnet83_spe')
    src = tmp_path / 'dp.safetensors'
    save_file({f'module.{k}': v.contiguous() for k, v in model.state_dict().items()}, str(src))
    cli(['inspect', 'resnet83_spe', '--checkpoint', str(src)])
    assert '27 SPE blocks' in capsys.readouterr().out
    cli(['convert', str(src), '--model', 'resnet83_spe.cifar10', '--out', str(tmp_path / 'plain.safetensors')])
    from safetensors.torch import load_file
    converted = load_file(str(tmp_path / 'plain.safetensors'))
    assert set(converted) == set(model.state_dict())
    assert all(torch.equal(converted[k], v) for k, v in model.state_dict().items())


def test_non_finite_weights_are_refused_by_every_command_in_one_line(weights, tmp_path, capsys):
    """A diverged run's checkpoint evaluated to `loss nan` with exit 0; now nothing is evaluated, inspected,
    converted or published from it."""
    sd = timm.create_model('resnet83_spe').state_dict()
    sd['layer1.0.conv1.weight'] = torch.full_like(sd['layer1.0.conv1.weight'], float('nan'))
    sd['fc.bias'] = torch.full_like(sd['fc.bias'], float('inf'))
    nan = tmp_path / 'nan.safetensors'
    save_file(sd, str(nan))
    torch.save({'epoch': 3, 'arch': 'resnet83_spe', 'state_dict': sd}, tmp_path / 'nan.pth.tar')
    for path in (nan, tmp_path / 'nan.pth.tar'):
        for command in CORRUPT_CASES:
            line, _ = _fails(CORRUPT_CASES[command](path, tmp_path), capsys)
            assert f"'{path}' has non-finite weights (NaN or inf) in 2 of {len(sd)} tensors" in line, line
            assert 'layer1.0.conv1.weight' in line and 'diverged' in line
        assert not (tmp_path / 'o.safetensors').exists() and not (tmp_path / 's').exists()


def test_non_finite_outputs_of_finite_weights_are_an_error_not_a_nan_result(make_image_folder, tmp_path):
    """Weights can be finite and the logits not (a dtype overflow): evaluate reports no number then."""
    from timm_spe.evaluate import evaluate
    model = timm.create_model('resnet83_spe')
    with torch.no_grad():
        model.fc.weight.fill_(3e38)  # finite, but the logits overflow float32
    data = make_image_folder(['airplane', 'automobile'], per_class=2)
    with pytest.raises(ValueError, match=r'non-finite logits \(NaN or inf\) for \d+ of the 4 images of batch 1'):
        evaluate(model, data, allow_class_subset=True, progress=False)


def test_help_shows_no_default_for_a_required_option():
    from timm_spe.cli import build_parser
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    required = []
    for name, sub in commands.items():
        text = ' '.join(sub.format_help().split())
        assert '(required) (default' not in text, name
        required += [(name, a.dest) for a in sub._actions if a.required and a.option_strings]
    assert ('eval', 'data_dir') in required  # the case the issue found


# --- upload failures: no token, bad token, no network, offline ---------------------------------------------------

def test_upload_without_a_token(hub_env, tmp_path, capsys):
    """Refused before any network call (the endpoint is unreachable: a call would say so instead)."""
    folder = minimal_staged_folder(tmp_path / 'staged')
    line, _ = _fails(['upload', str(folder), '--repo-id', 'org/m.t'], capsys)
    assert 'no Hugging Face token' in line and '`hf auth login`' in line and 'HF_TOKEN' in line
    _fails(['upload', str(folder), '--repo-id', 'org/m.t'], capsys, debug=True)


def test_publish_without_a_token_stages_nothing(hub_env, weights, tmp_path, capsys):
    out = tmp_path / 'staged'
    line, _ = _fails(['publish', str(weights['good']), '--model', 'resnet83_spe', '--tag', 'cifar10', '--out', str(out),
                      '--create-pr'], capsys)
    assert '`hf auth login`' in line and not out.exists()


def test_a_dry_run_of_an_unregistered_tag_says_the_upload_needs_a_repo_id(hub_env, weights, tmp_path, capsys):
    """It ended 'Upload with the same command without --dry-run (repo None)'; that command fails asking for
    --repo-id ORG/NAME (and, the folder now staged, for --force)."""
    staged = tmp_path / 'staged'
    cli(['publish', str(weights['good']), '--model', 'resnet83_spe', '--tag', 'mytag', '--dry-run', '--out',
         str(staged)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert 'None' not in last and "'resnet83_spe.mytag' is not a registered tag" in last
    assert 'uploading needs --repo-id ORG/NAME' in last
    assert f'`timm-spe upload {staged} --repo-id timm-spe/resnet83_spe.mytag`' in last
    assert 'hf-hub:timm-spe/resnet83_spe.mytag' in (staged / 'README.md').read_text()  # "the repo its card names"
    # the upload it names gets as far as the token (none here); without --repo-id it is refused
    line, _ = _fails(['upload', str(staged), '--repo-id', 'timm-spe/resnet83_spe.mytag'], capsys)
    assert 'no Hugging Face token' in line
    line, _ = _fails(['upload', str(staged)], capsys)
    assert 'pass --repo-id ORG/NAME' in line
    # a registered tag: the staged folder uploads as it is
    staged = tmp_path / 'registered'
    cli(['publish', str(weights['good']), '--model', 'resnet83_spe', '--tag', 'cifar10', '--dry-run', '--out',
         str(staged)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == (f'dry run: nothing uploaded. Upload the staged folder to timm-spe/resnet83_spe.cifar10 with '
                    f'`timm-spe upload {staged}`.')


@pytest.mark.parametrize('status, expected', [(401, 'HTTP 401'), (403, 'HTTP 403'), (400, 'HTTP 400')])
def test_upload_with_a_refused_token(status, expected, hub_env, echo_server, tmp_path, capsys):
    state, url = echo_server
    state['status'] = status
    hub_env(url)
    folder = minimal_staged_folder(tmp_path / 'staged')
    line, _ = _fails(['upload', str(folder), '--repo-id', 'org/m.t'], capsys)
    assert expected in line and '`hf auth login`' in line and 'HF_TOKEN' in line
    assert state['requests'] >= 1  # the server did see (and echo) the token
    _fails(['upload', str(folder), '--repo-id', 'org/m.t'], capsys, debug=True)  # the traceback is scrubbed too


def test_upload_without_network(hub_env, tmp_path, capsys):
    hub_env(UNREACHABLE)
    folder = minimal_staged_folder(tmp_path / 'staged')
    line, _ = _fails(['upload', str(folder), '--repo-id', 'org/m.t'], capsys)
    assert 'cannot reach the Hugging Face Hub at http://127.0.0.1:9' in line and 'HF_ENDPOINT' in line
    _fails(['upload', str(folder), '--repo-id', 'org/m.t'], capsys, debug=True)


def test_upload_offline(hub_env, monkeypatch, tmp_path, capsys):
    hub_env(UNREACHABLE)
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    folder = minimal_staged_folder(tmp_path / 'staged')
    line, _ = _fails(['upload', str(folder), '--repo-id', 'org/m.t'], capsys)
    assert 'offline mode (HF_HUB_OFFLINE=1)' in line and 'unset HF_HUB_OFFLINE' in line
    _fails(['upload', str(folder), '--repo-id', 'org/m.t'], capsys, debug=True)


def test_no_token_like_text_is_ever_printed(monkeypatch):
    from timm_spe.cli.errors import _scrub
    monkeypatch.setenv('HF_TOKEN', 'sk-anything-at-all')
    text = _scrub(f'a sk-anything-at-all b {TOKEN} c Authorization: Bearer abc.def {{"authorization": "Bearer xyz"}} '
                  f'hf_hub_id stays')
    assert 'sk-anything' not in text and TOKEN not in text and 'abc.def' not in text and 'xyz' not in text
    assert 'hf_hub_id stays' in text


# --- the upload check: only published kinds of files, at any depth ------------------------------------------------

@pytest.mark.parametrize('name', ['pytorch_model.bin', 'w.pt', 'w.pth', 'w.pkl', 'w.pickle', 'w.pt2', 'w.ckpt',
                                  'last.pth.tar', 'notes.txt', 'run.py', '.gitattributes', 'W.PTH',
                                  '.hidden/x.json'])
def test_upload_refuses_other_files_at_any_depth(name, tmp_path, capsys):
    folder = minimal_staged_folder(tmp_path / 'staged')
    (folder / 'a' / 'b' / name).parent.mkdir(parents=True)
    (folder / 'a' / 'b' / name).write_bytes(b'x')
    api = mock.MagicMock()
    api.file_exists.return_value = False
    with mock.patch('timm_spe.hub.HfApi', return_value=api):
        line, _ = _fails(['upload', str(folder), '--repo-id', 'org/m.t'], capsys)
    assert f'a/b/{name}' in line and 'never uploaded' in line and '--dry-run' in line
    assert not api.method_calls  # refused before any call to the Hub


def test_upload_check_names_the_first_files_and_links(tmp_path):
    from timm_spe.hub import check_upload_files
    folder = minimal_staged_folder(tmp_path / 'staged')
    for i in range(7):
        (folder / f'w{i}.bin').write_bytes(b'x')
    (folder / 'card.json').symlink_to(folder / 'w0.bin')
    with pytest.raises(ValueError, match=r"card\.json, w0\.bin, w1\.bin, w2\.bin, w3\.bin and 3 more"):
        check_upload_files(folder)
    for p in folder.glob('w*.bin'):
        p.unlink()
    (folder / 'card.json').unlink()
    (folder / 'figs').mkdir()
    for name in ('curve.png', 'eval.csv', 'r.yaml', 'r.yml', 'x.json', 'notes.md', 'more.safetensors'):
        (folder / 'figs' / name).write_bytes(b'x')
    check_upload_files(folder)  # the published kinds, at any depth


# --- tags ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('tag', ['../../x', 'a/b', 'a\\b', '..', '.hidden', 'x..y', ''])
def test_publish_refuses_a_tag_that_is_a_path(tag, weights, tmp_path, capsys):
    out = tmp_path / 'out'
    line, _ = _fails(['publish', str(weights['good']), '--model', 'resnet83_spe', '--tag', tag, '--dry-run',
                      '--out', str(out)], capsys)
    assert 'is not a valid tag' in line and 'e.g. cifar10_e30' in line and not out.exists()
    _fails(['publish', str(weights['good']), '--model', 'resnet83_spe', '--tag', tag, '--dry-run', '--out', str(out)],
           capsys, debug=True)


@pytest.mark.parametrize('argv', [
    lambda w, t: ['finish-run', '--recipe', str(t / 'r.yaml'), '--tag', '../x'],
    lambda w, t: ['convert', str(w), '--model', 'resnet83_spe.../x', '--out', str(t / 'o')],
    lambda w, t: ['eval', 'resnet83_spe../../x', '--checkpoint', str(w), '--data-dir', str(t)],
    lambda w, t: ['inspect', 'resnet83_spe.a/b', '--checkpoint', str(w)],
], ids=['finish-run', 'convert', 'eval', 'inspect'])
def test_every_command_refuses_a_tag_that_is_a_path(argv, weights, tmp_path, capsys):
    line, _ = _fails(argv(weights['good'], tmp_path), capsys)
    assert 'is not a valid tag' in line
    assert not (tmp_path / 'o').exists()


def test_upload_refuses_a_config_tag_that_is_a_path(tmp_path, capsys):
    folder = minimal_staged_folder(tmp_path / 'staged', tag='../../x')
    with mock.patch('timm_spe.hub.HfApi') as api_cls:
        line, _ = _fails(['upload', str(folder)], capsys)
    assert "pretrained_cfg.tag) '../../x' is not a valid tag" in line
    api_cls.return_value.upload_folder.assert_not_called()


def test_valid_tags():
    from timm_spe.hub import validate_tag
    for tag in ('cifar10', 'cifar10_e30', 'cifar10_cpu2h', 'in1k', 'a.b-c_d', '-x', 'x' * 64):
        assert validate_tag(tag) == tag
    with pytest.raises(ValueError):
        validate_tag('x' * 65)


# --- convert --out ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name, suggested', [('x.pth', 'x.safetensors'), ('x.pth.tar', 'x.safetensors'),
                                             ('x.bin', 'x.safetensors'), ('x.PT', 'x.safetensors')])
def test_convert_refuses_a_pickle_file_name(name, suggested, weights, tmp_path, capsys):
    out = tmp_path / name
    line, _ = _fails(['convert', str(weights['good']), '--model', 'resnet83_spe.cifar10', '--out', str(out)], capsys)
    assert f"give --out {tmp_path / suggested}" in line and 'a folder path' in line
    assert not out.exists()  # neither a file nor a folder named x.pth


def test_convert_refuses_an_existing_file_as_a_folder(weights, tmp_path, capsys):
    out = tmp_path / 'weights'
    out.write_text('keep')
    line, _ = _fails(['convert', str(weights['good']), '--model', 'resnet83_spe.cifar10', '--out', str(out)], capsys)
    assert 'safetensors only' in line and out.read_text() == 'keep'


def test_convert_still_writes_files_and_folders(weights, tmp_path):
    cli(['convert', str(weights['good']), '--model', 'resnet83_spe.cifar10', '--out', str(tmp_path / 'o.safetensors')])
    assert (tmp_path / 'o.safetensors').is_file()
    cli(['convert', str(weights['good']), '--model', 'resnet83_spe.cifar10', '--out', str(tmp_path / 'resnet83_spe.t')])
    assert sorted(p.name for p in (tmp_path / 'resnet83_spe.t').iterdir()) == ['config.json', 'model.safetensors']


# --- missing matplotlib, anything unexpected ------------------------------------------------------------------------

@pytest.mark.parametrize('argv', [['inspect', 'resnet83_spe', '--plot', 'x.png'], ['finish-run', '--recipe', 'r.yaml'],
                                  ['run-status', 'train_runs/x', '--plot', 'x.png']])
def test_missing_matplotlib(argv, monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'matplotlib' else real(name, *a))
    line, _ = _fails(argv, capsys)
    assert line.endswith("plotting needs matplotlib: pip install 'timm-spe[plot]'")
    _fails(argv, capsys, debug=True)


def test_run_status_plot_of_a_run_without_a_completed_epoch(tmp_path, capsys):
    line, _ = _fails(['run-status', str(tmp_path), '--plot', str(tmp_path / 'c.png')], capsys)
    assert line.endswith(f"--plot: '{tmp_path}' has no completed epoch yet (no summary.csv row); plot after its "
                         "first epoch.")
    assert not (tmp_path / 'c.png').exists()


def test_an_unexpected_error_is_one_line_too(monkeypatch, capsys):
    def broken(args):
        raise TypeError('something\nbroke')
    monkeypatch.setattr('timm_spe.cli.evaluate.cmd_inspect', broken)
    line, _ = _fails(['inspect', 'resnet83_spe'], capsys)
    assert 'unexpected TypeError: something broke' in line and 'rerun with --debug' in line
    _, err = _fails(['inspect', 'resnet83_spe', '--debug'], capsys)  # --debug after the command works too
    assert 'TypeError: something' in err
