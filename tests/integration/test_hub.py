"""Pretrained weights end to end against a real (local) Hub server: publish -> serve -> load.

A small model is staged with `timm-spe publish --dry-run`, committed as a git repo and served by
olah on 127.0.0.1 with HF_ENDPOINT pointing at it and a fresh HF cache. Loading runs in
subprocesses, since huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE at import.
"""
import json
import os
import pickle
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import timm
import torch
from hub_server import add_repo, local_hub
from safetensors.torch import load_file

import timm_spe
from timm_spe.cli import main as cli
from timm_spe.hub import PretrainedWeightsNotFound, upload_hub_folder

ORG = timm_spe.HF_HUB_ORG
MARKER = 'unpickled-marker'


class _MakeDir:
    """Pickles to ``os.makedirs(path)``: if anything ever unpickled it, the folder would appear."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.makedirs, (self.path,)


@pytest.fixture(scope='module')
def hub(tmp_path_factory):
    work = tmp_path_factory.mktemp('hub')
    mirrors = work / 'mirrors'
    torch.manual_seed(0)
    model = timm.create_model('resnet83_spe.cifar10')
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # not the init: a real copy must be bit-exact
    src = work / 'trained.safetensors'
    from safetensors.torch import save_file
    save_file(model.state_dict(), str(src))
    staged = work / 'staged'
    cli(['publish', str(src), '--model', 'resnet83_spe', '--tag', 'cifar10', '--out', str(staged), '--dry-run',
         '--budget', 'test fixture'])
    good = add_repo(mirrors, f'{ORG}/resnet83_spe.cifar10', {p.name: p for p in staged.iterdir()})
    # a truncated safetensors file
    weights = (staged / 'model.safetensors').read_bytes()
    add_repo(mirrors, f'{ORG}/resnet83.cifar10', {
        'config.json': (staged / 'config.json').read_bytes(), 'model.safetensors': weights[:len(weights) // 2]})
    # a pickle-only repo whose weights would create a folder if anything unpickled them
    add_repo(mirrors, f'{ORG}/resnet83.cifar100', {
        'config.json': (staged / 'config.json').read_bytes(),
        'pytorch_model.bin': pickle.dumps(_MakeDir(str(work / MARKER)))})
    sha = timm_spe.hub.sha256_file(staged / 'model.safetensors')
    # what a maintainer records in timm_spe/registry.py after publishing (here at runtime, in every subprocess)
    published = {'resnet83_spe.cifar10': sha, 'resnet83.cifar10': sha, 'resnet83.cifar100': sha}
    with local_hub(mirrors, f'{ORG}/resnet83_spe.cifar10', work) as endpoint:
        yield {'endpoint': endpoint, 'work': work, 'repo': good, 'staged': staged, 'sha': sha, 'published': published}
    assert not (work / MARKER).exists()


def _run(hub, code, hf_home, offline=False, endpoint=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith('HF_')}
    env.update(HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY='1', HF_HUB_ETAG_TIMEOUT='5',
               HF_HUB_DOWNLOAD_TIMEOUT='10', PYTHONPATH=os.pathsep.join(sys.path))
    if endpoint:
        env['HF_ENDPOINT'] = hub['endpoint']
    if offline:
        env['HF_HUB_OFFLINE'] = '1'
    published = hub.get('published', {})
    prelude = textwrap.dedent(f'''
        import json, torch, timm, timm_spe
        from safetensors.torch import load_file
        from timm_spe.pretrained import register_pretrained
        for model_tag, sha in {published!r}.items():
            register_pretrained(model_tag, sha, num_classes=10, hf_hub_id='timm-spe/' + model_tag)
        ref = load_file({str(hub['repo'] / 'model.safetensors')!r})
        def same(model, skip=()):
            sd = model.state_dict()
            return all(torch.equal(sd[k], v) for k, v in ref.items() if k not in skip)
        def attempt(fn):
            try:
                fn()
                return 'ok'
            except Exception as e:
                cause = ' [cause: ' + type(e.__cause__).__name__ + ']' if e.__cause__ is not None else ''
                return type(e).__name__ + ': ' + str(e) + cause
    ''')
    proc = subprocess.run([sys.executable, '-c', prelude + textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_load_from_hub(hub, tmp_path):
    out = _run(hub, '''
        m1 = timm.create_model('resnet83_spe.cifar10', pretrained=True)
        m2 = timm.create_model('hf-hub:timm-spe/resnet83_spe.cifar10', pretrained=True)
        m3 = timm.create_model('resnet83_spe.cifar10', pretrained=True, num_classes=5, in_chans=1)
        conv_ok = torch.allclose(m3.conv1.weight, ref['conv1.weight'].sum(1, keepdim=True))
        print(json.dumps({'tag': same(m1), 'hf_hub': same(m2), 'hf_hub_type': type(m2).__name__,
                          'head': list(m3.fc.weight.shape), 'conv1': conv_ok,
                          'rest': same(m3, skip=('conv1.weight', 'fc.weight', 'fc.bias'))}))
    ''', tmp_path / 'hf')
    assert out == {'tag': True, 'hf_hub': True, 'hf_hub_type': 'CifarResNet', 'head': [5, 256], 'conv1': True,
                   'rest': True}
    # offline from the cache the first run filled
    out = _run(hub, '''
        m = timm.create_model('resnet83_spe.cifar10', pretrained=True)
        print(json.dumps({'offline': same(m)}))
    ''', tmp_path / 'hf', offline=True)
    assert out == {'offline': True}
    out = _run(hub, '''
        m = timm.create_model('hf-hub:timm-spe/resnet83_spe.cifar10', pretrained=True)
        print(json.dumps({'offline_hf_hub': same(m)}))
    ''', tmp_path / 'hf', offline=True)
    assert out == {'offline_hf_hub': True}


def test_local_dir_and_cache_dir(hub, tmp_path):
    pickle_dir = tmp_path / 'pickle-only'
    pickle_dir.mkdir()
    (pickle_dir / 'config.json').write_bytes((hub['staged'] / 'config.json').read_bytes())
    (pickle_dir / 'pytorch_model.bin').write_bytes(pickle.dumps(_MakeDir(str(hub['work'] / MARKER))))
    out = _run(hub, f'''
        import pathlib
        m = timm.create_model('local-dir:{hub['staged']}', pretrained=True)
        c = timm.create_model('resnet83_spe.cifar10', pretrained=True, cache_dir={str(tmp_path / 'cache')!r})
        cached = sorted(str(p.relative_to({str(tmp_path / 'cache')!r})) for p in
                        pathlib.Path({str(tmp_path / 'cache')!r}).rglob('model.safetensors'))
        print(json.dumps({{'local_dir': same(m), 'cache_dir': same(c), 'cached': cached,
                          'default_cache_used': pathlib.Path({str(tmp_path / 'hf')!r}).exists(),
                          'pickle_dir': attempt(lambda: timm.create_model('local-dir:{pickle_dir}', pretrained=True))}}))
    ''', tmp_path / 'hf')
    assert out['local_dir'] is True and out['cache_dir'] is True
    assert out['cached'] == ['models--timm-spe--resnet83_spe.cifar10/snapshots/' + out['cached'][0].split('/')[2]
                             + '/model.safetensors'] and not out['default_cache_used']
    assert out['pickle_dir'].startswith('PretrainedWeightsNotFound') and 'only safetensors' in out['pickle_dir']
    assert not (hub['work'] / MARKER).exists()


def test_unreachable_hub(hub, tmp_path):
    """Server down (not offline mode) and nothing cached: a clear message, not a connection trace."""
    from hub_server import _free_port
    out = _run({**hub, 'endpoint': f'http://127.0.0.1:{_free_port()}'}, '''
        import time, types, huggingface_hub.utils._http as http  # skip the ~25 s of retry back-off sleeps
        http.time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith('_')})
        http.time.sleep = lambda s: None
        print(json.dumps({'err': attempt(lambda: timm.create_model('resnet83_spe.cifar10', pretrained=True))}))
    ''', tmp_path / 'hf')
    assert out['err'].startswith('PretrainedWeightsNotFound') and 'cannot be reached' in out['err']


def test_a_hub_answering_http_500_is_reported_as_a_server_error_not_as_unreachable(hub, tmp_path):
    """huggingface_hub turns a 5xx answer into LocalEntryNotFoundError, as it does a dead connection: the message
    says what the server answered."""
    import http.server
    import threading

    class Answer500(http.server.BaseHTTPRequestHandler):
        def _fail(self):
            self.send_response(500)
            self.send_header('Content-Length', '0')
            self.end_headers()
        do_GET = do_HEAD = _fail

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Answer500)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = _run({**hub, 'endpoint': f'http://127.0.0.1:{server.server_address[1]}'}, '''
            import time, types, huggingface_hub.utils._http as http  # skip the retry back-off sleeps
            http.time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith('_')})
            http.time.sleep = lambda s: None
            print(json.dumps({'err': attempt(lambda: timm.create_model('resnet83_spe.cifar10', pretrained=True))}))
        ''', tmp_path / 'hf')
    finally:
        server.shutdown()
        server.server_close()
    assert out['err'].startswith('PretrainedWeightsNotFound') and 'answered HTTP 500' in out['err'], out['err']
    assert 'server error: retry later' in out['err'] and 'cannot be reached' not in out['err']


def test_offline_without_cache(hub, tmp_path):
    out = _run(hub, '''
        print(json.dumps({'err': attempt(lambda: timm.create_model('resnet83_spe.cifar10', pretrained=True))}))
    ''', tmp_path / 'empty-hf', offline=True)
    assert out['err'].startswith('PretrainedWeightsNotFound') and 'not in the Hugging Face cache' in out['err']
    assert 'HF_HUB_OFFLINE=1' in out['err'] and 'resnet83_spe.cifar10' in out['err']


def test_unpublished_corrupt_and_pickle_only(hub, tmp_path):
    out = _run(hub, '''
        print(json.dumps({
            'unpublished': attempt(lambda: timm.create_model('resnet83_spe.cifar100', pretrained=True)),
            'corrupt': attempt(lambda: timm.create_model('resnet83.cifar10', pretrained=True)),
            'corrupt_hf_hub': attempt(lambda: timm.create_model('hf-hub:timm-spe/resnet83.cifar10@main', pretrained=True)),
            'pickle_only': attempt(lambda: timm.create_model('resnet83.cifar100', pretrained=True)),
        }))
    ''', tmp_path / 'hf')
    # a tag without recorded weights is never looked up on the Hub
    assert out['unpublished'].startswith('PretrainedWeightsNotFound')
    assert "'resnet83_spe.cifar100' has no pretrained weights yet" in out['unpublished']
    assert 'timm-spe publish' in out['unpublished'] and '[cause:' not in out['unpublished']
    # a truncated download of a recorded tag: its sha256 differs, nothing is parsed or loaded
    assert out['corrupt'].startswith('PretrainedWeightsMismatch') and 'truncated' in out['corrupt']
    assert hub['sha'] in out['corrupt']
    # an hf-hub: id at another revision is not checked against the record, but still read as safetensors only
    assert out['corrupt_hf_hub'].startswith('PretrainedWeightsCorrupt') and 'truncated' in out['corrupt_hf_hub']
    assert out['pickle_only'].startswith('PretrainedWeightsNotFound')
    assert not (hub['work'] / MARKER).exists()
    # olah 0.5.4 reports a missing file like a missing repo (the real Hub: EntryNotFoundError, answered with 'only
    # safetensors', see test_download_errors_are_explained), so the message is the missing repo's
    assert "its Hub repo 'timm-spe/resnet83.cifar100' was not found" in out['pickle_only']
    assert out['pickle_only'].endswith('[cause: RepositoryNotFoundError]')


def test_hub_download_is_checked_against_the_recorded_sha256(hub, tmp_path):
    """A download that is not the recorded file (tag or hf-hub: id of the recorded repo) is refused, naming both."""
    out = _run({**hub, 'published': {'resnet83_spe.cifar10': 'f' * 64}}, '''
        print(json.dumps({
            'tag': attempt(lambda: timm.create_model('resnet83_spe.cifar10', pretrained=True)),
            'hf_hub': attempt(lambda: timm.create_model('hf-hub:timm-spe/resnet83_spe.cifar10', pretrained=True)),
        }))
    ''', tmp_path / 'hf')
    for err in out.values():
        assert err.startswith('PretrainedWeightsMismatch') and 'f' * 64 in err and hub['sha'] in err
        assert 'Nothing was loaded' in err


def test_timm_alone_would_unpickle_a_pickle_only_repo(hub, tmp_path):
    """Why the guard exists: timm's own Hub loader falls back to pytorch_model.bin (restricted torch.load)."""
    out = _run(hub, '''
        from timm.models._hub import load_state_dict_from_hf
        print(json.dumps({'timm': attempt(lambda: load_state_dict_from_hf('timm-spe/resnet83.cifar100'))}))
    ''', tmp_path / 'hf')
    # olah answers the missing model.safetensors with 404 "repo not found", which timm does not catch; on the real
    # Hub (EntryNotFoundError) timm goes on to torch.load(pytorch_model.bin, weights_only=True)
    assert out['timm'].startswith('RepositoryNotFoundError')
    assert not (hub['work'] / MARKER).exists()


@pytest.fixture()
def recorded(register_tag):
    """Record 'resnet83_spe.cifar100' as published (as timm_spe/registry.py would), undone after the test."""
    register_tag('resnet83_spe.cifar100', 'a' * 64, num_classes=100, hf_hub_id=f'{ORG}/resnet83_spe.cifar100')


@pytest.mark.parametrize('error, expected', [
    ('RemoteEntryNotFoundError', 'No published weights'),  # the real Hub: repo exists, no model.safetensors
    ('RepositoryNotFoundError', "its Hub repo 'timm-spe/resnet83_spe.cifar100' was not found"),
    ('GatedRepoError', 'No published weights'),  # a RepositoryNotFoundError, of a repo that is there
    ('RevisionNotFoundError', 'No published weights'),
    ('LocalEntryNotFoundError', 'not in the Hugging Face cache'),
    ('OfflineModeIsEnabled', 'not in the Hugging Face cache'),
    ('HfHubHTTPError', 'the Hub answered'),
])
def test_download_errors_are_explained(error, expected, monkeypatch, recorded):
    """Every huggingface_hub failure of the one download becomes a message naming the model, tag and a fix."""
    import huggingface_hub.errors as hf_errors
    cls = getattr(hf_errors, error)
    exc = cls(f'{error} raised') if error in ('LocalEntryNotFoundError', 'OfflineModeIsEnabled') else cls(
        f'{error} raised', response=mock.MagicMock())
    monkeypatch.setattr(timm_spe.hub, 'hf_hub_download', mock.MagicMock(side_effect=exc))
    with pytest.raises(PretrainedWeightsNotFound, match=expected) as info:
        timm.create_model('resnet83_spe.cifar100', pretrained=True)
    assert "'resnet83_spe.cifar100'" in str(info.value) and info.value.__cause__ is exc
    timm_spe.hub.hf_hub_download.assert_called_once_with(
        'timm-spe/resnet83_spe.cifar100', 'model.safetensors', revision=None, cache_dir=None)


def test_staged_folder(hub):
    staged = hub['staged']
    assert sorted(p.name for p in staged.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((staged / 'config.json').read_text())
    assert config['architecture'] == 'resnet83_spe' and config['num_classes'] == 10 and config['num_features'] == 256
    assert config['pretrained_cfg']['mean'] == list(timm_spe.CIFAR_MEAN)
    card = (staged / 'README.md').read_text()
    assert card.startswith('---\n') and 'library_name: timm' in card and 'license: apache-2.0' in card
    assert timm_spe.hub.sha256_file(staged / 'model.safetensors') in card
    assert 'Not evaluated' in card and '94.03%' in card and "paper's number" in card
    assert 'ResNet-83 with SPE' in card and 'Params (M): 0.' in card and 'GMACs: 0.1' in card
    assert "hf-hub:timm-spe/resnet83_spe.cifar10" in card
    assert config['label_names'][0] == 'airplane' and config['label_names'][-1] == 'truck'
    assert 'pipeline_tag: image-classification' in card and 'model-index' not in card  # no eval, no results


def test_local_file_and_list_pretrained(hub):
    m = timm.create_model('resnet83_spe', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(hub['repo'] / 'model.safetensors')))
    ref = load_file(str(hub['repo'] / 'model.safetensors'))
    assert all(torch.equal(m.state_dict()[k], v) for k, v in ref.items())
    assert timm.list_pretrained('*spe*') == ['resnet164_spe.cifar10_e30']  # only tags with weights
    with pytest.raises(FileNotFoundError, match='does not exist'):
        timm.create_model('resnet83_spe', pretrained=True, pretrained_cfg_overlay=dict(file='/nonexistent.safetensors'))
    with pytest.raises(PretrainedWeightsNotFound, match="'resnet50_spe.untrained' is the architecture alone, without "
                                                      "pretrained weights"):
        timm.create_model('resnet50_spe', pretrained=True)


def test_register_pretrained_lists_and_makes_default(recorded):
    assert 'resnet83_spe.cifar100' in timm.list_pretrained('resnet83_spe*')
    assert timm.models.get_pretrained_cfg('resnet83_spe.cifar100').hf_hub_id == f'{ORG}/resnet83_spe.cifar100'
    assert timm.models.get_pretrained_cfg('resnet83_spe.cifar100').label_names[-1] == 'worm'
    assert timm.models.get_pretrained_cfg('resnet83_spe').tag == 'cifar10'  # not made the default


def test_publish_refuses_non_empty_out(hub, tmp_path):
    src = hub['repo'] / 'model.safetensors'
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'keep.txt').write_text('x')
    with pytest.raises(SystemExit, match='not empty'):
        cli(['publish', str(src), '--model', 'resnet83_spe', '--tag', 'cifar10', '--out', str(out), '--dry-run'])
    assert (out / 'keep.txt').read_text() == 'x'


class TestUpload:
    """The upload is a thin call into huggingface_hub: check the arguments it gets."""

    def _api(self, has_weights):
        api = mock.MagicMock()
        api.file_exists.return_value = has_weights
        return api

    def test_new_repo(self, hub):
        api = self._api(False)
        upload_hub_folder(hub['staged'], 'org/m.t', api=api)
        api.create_repo.assert_called_once_with('org/m.t', exist_ok=True, private=None)
        assert api.upload_folder.call_args.kwargs['create_pr'] is False
        assert api.upload_folder.call_args.kwargs['folder_path'] == str(hub['staged'])

    def test_existing_weights_need_a_flag(self, hub):
        api = self._api(True)
        with pytest.raises(FileExistsError, match='--create-pr'):
            upload_hub_folder(hub['staged'], 'org/m.t', api=api)
        api.upload_folder.assert_not_called()
        upload_hub_folder(hub['staged'], 'org/m.t', api=api, create_pr=True)
        assert api.upload_folder.call_args.kwargs['create_pr'] is True
        upload_hub_folder(hub['staged'], 'org/m.t', api=api, overwrite=True)
        assert api.upload_folder.call_args.kwargs['create_pr'] is False

    def test_refuses_pickles(self, hub, tmp_path):
        folder = tmp_path / 'f'
        folder.mkdir()
        for p in hub['staged'].iterdir():
            (folder / p.name).write_bytes(p.read_bytes())
        (folder / 'pytorch_model.bin').write_bytes(b'x')
        with pytest.raises(ValueError, match='pickle'):
            upload_hub_folder(folder, 'org/m.t', api=self._api(False))

    def test_refusal_comes_before_staging(self, hub, tmp_path):
        api = self._api(True)
        with mock.patch('timm_spe.hub.HfApi', return_value=api), pytest.raises(SystemExit, match='--overwrite'):
            cli(['publish', str(hub['repo'] / 'model.safetensors'), '--model', 'resnet83_spe', '--tag', 'cifar10',
                 '--out', str(tmp_path / 'o')])
        assert not (tmp_path / 'o').exists()
        api.upload_folder.assert_not_called()
        api.file_exists.assert_called_with(f'{ORG}/resnet83_spe.cifar10', 'model.safetensors')

    def test_upload_a_staged_folder(self, hub, tmp_path):
        api = self._api(True)
        with mock.patch('timm_spe.hub.HfApi', return_value=api):
            with pytest.raises(SystemExit, match='already has model.safetensors'):
                cli(['upload', str(hub['staged'])])
            cli(['upload', str(hub['staged']), '--overwrite'])
        assert api.upload_folder.call_args.kwargs['repo_id'] == f'{ORG}/resnet83_spe.cifar10'
        assert api.upload_folder.call_args.kwargs['folder_path'] == str(hub['staged'])
        # a folder whose card is not of its weights, or that is incomplete, is never uploaded
        folder = tmp_path / 'f'
        folder.mkdir()
        for p in hub['staged'].iterdir():
            (folder / p.name).write_bytes(p.read_bytes())
        (folder / 'README.md').write_text('a card of other weights')
        with mock.patch('timm_spe.hub.HfApi', return_value=self._api(False)) as api_cls:
            with pytest.raises(SystemExit, match='does not quote the sha256'):
                cli(['upload', str(folder)])
            (folder / 'README.md').unlink()
            with pytest.raises(SystemExit, match='not a staged Hub folder'):
                cli(['upload', str(folder)])
        api_cls.return_value.upload_folder.assert_not_called()

    def test_cli_upload_path(self, hub, tmp_path):
        api = self._api(False)
        with mock.patch('timm_spe.hub.HfApi', return_value=api):
            cli(['publish', str(hub['repo'] / 'model.safetensors'), '--model', 'resnet83_spe', '--tag', 'cifar10',
                 '--out', str(tmp_path / 'o'), '--create-pr'])
        assert api.upload_folder.call_args.kwargs['repo_id'] == f'{ORG}/resnet83_spe.cifar10'
        assert api.upload_folder.call_args.kwargs['create_pr'] is True


@pytest.fixture(scope='module')
def evaluated(hub, tmp_path_factory):
    """`timm-spe eval` of the published weights on ten images: the eval JSON a card quotes."""
    from PIL import Image
    work = tmp_path_factory.mktemp('publish')
    from timm_spe.labels import CIFAR10_LABELS
    for c, name in enumerate(CIFAR10_LABELS):  # eval matches class folders to the model's classes by name
        (work / 'test' / name).mkdir(parents=True)
        Image.new('RGB', (32, 32), (25 * c, 100, 0)).save(work / 'test' / name / '0.png')
    src = hub['repo'] / 'model.safetensors'
    cli(['eval', 'resnet83_spe.cifar10', '--checkpoint', str(src), '--data-dir', str(work / 'test'),
         '--data-label', 'ten test images', '--out', str(work / 'eval.json')])
    return {'src': src, 'eval_json': work / 'eval.json', 'data': work / 'test'}


class TestPublish:
    """`timm-spe publish`: the card's numbers come from the eval JSON of these very weights."""

    def test_card_quotes_the_eval_json(self, evaluated, tmp_path):
        figure = tmp_path / 'spe_lambda.png'
        figure.write_bytes(b'\x89PNG fake')
        out = tmp_path / 'staged'
        with mock.patch('timm_spe.hub.HfApi') as api:
            cli(['publish', str(evaluated['src']), '--model', 'resnet83_spe', '--tag', 'cifar10', '--out', str(out),
                 '--dry-run', '--eval-json', str(evaluated['eval_json']), '--recipe', 'test recipe',
                 '--budget', '0 epochs', '--figure', f'{figure}:learned lambda'])
        api.assert_not_called()  # a dry run never talks to the Hub
        result = json.loads(evaluated['eval_json'].read_text())
        assert result['command'].startswith('timm-spe eval resnet83_spe.cifar10')
        assert result['num_images'] == 10 and result['data'] == str(evaluated['data'])
        assert result['checkpoint_sha256'] == timm_spe.hub.sha256_file(evaluated['src'])
        assert sorted(p.name for p in out.iterdir()) == [
            'README.md', 'config.json', 'eval.json', 'model.safetensors', 'spe_lambda.png']
        card = (out / 'README.md').read_text()
        sha = timm_spe.hub.sha256_file(out / 'model.safetensors')
        assert result['weights_sha256'] == sha and 'on exactly these weights (same sha256)' in card
        assert f"| ten test images | 10 | {result['top1']:.2f} | {result['top5']:.2f} | {result['loss']:.4f} |" in card
        assert '**Recipe:** test recipe' in card and '**Budget actually used:** 0 epochs' in card
        assert '![learned lambda](spe_lambda.png)' in card and 'Not evaluated' not in card

    def test_eval_json_of_other_weights_or_model_is_refused(self, evaluated, tmp_path):
        other = tmp_path / 'other.safetensors'
        from safetensors.torch import save_file
        save_file(timm.create_model('resnet83_spe').state_dict(), str(other))
        with pytest.raises(SystemExit, match='measured on other weights'):
            cli(['publish', str(other), '--model', 'resnet83_spe', '--tag', 'cifar10', '--out', str(tmp_path / 'a'),
                 '--dry-run', '--eval-json', str(evaluated['eval_json'])])
        save_file(timm.create_model('resnet83').state_dict(), str(other))
        with pytest.raises(SystemExit, match="result of 'resnet83_spe', not 'resnet83'"):
            cli(['publish', str(other), '--model', 'resnet83', '--tag', 'cifar10', '--out', str(tmp_path / 'b'),
                 '--dry-run', '--eval-json', str(evaluated['eval_json'])])
        assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()

    def test_train_py_checkpoint_recipe_budget_and_ema(self, tmp_path):
        import argparse
        torch.manual_seed(1)
        model, ema = timm.create_model('resnet83_spe', num_classes=100), timm.create_model('resnet83_spe', num_classes=100)
        ns = argparse.Namespace(model='resnet83_spe', opt='sgd', lr=0.1, weight_decay=1e-4, sched='multistep',
                                epochs=164, batch_size=128, train_crop_mode='pad4')
        ckpt = tmp_path / 'model_best.pth.tar'
        torch.save({'epoch': 99, 'arch': 'resnet83_spe', 'state_dict': model.state_dict(),
                    'state_dict_ema': ema.state_dict(), 'args': ns, 'optimizer': {}}, ckpt)
        with pytest.raises(SystemExit, match='100-class classifier but .resnet83_spe.cifar10. is a 10-class tag'):
            cli(['publish', str(ckpt), '--model', 'resnet83_spe', '--tag', 'cifar10', '--out', str(tmp_path / 'x'),
                 '--dry-run'])
        out = tmp_path / 'o'
        cli(['publish', str(ckpt), '--model', 'resnet83_spe', '--tag', 'cifar100', '--out', str(out), '--dry-run',
             '--ema'])
        card = (out / 'README.md').read_text()
        assert 'opt sgd, lr 0.1' in card and 'epochs 164, batch 128, crop pad4' in card
        assert 'checkpoint of epoch 100 of 164 scheduled, batch 128' in card and '73.87%' in card
        assert 'datasets:\n- cifar100' in card and 'Classes: 100' in card
        staged = load_file(str(out / 'model.safetensors'))
        assert all(torch.equal(staged[k], v) for k, v in ema.state_dict().items())
        assert json.loads((out / 'config.json').read_text())['num_classes'] == 100

    def test_failed_staging_leaves_nothing(self, evaluated, tmp_path):
        out = tmp_path / 'staged'
        with pytest.raises(SystemExit, match='does not exist'):
            cli(['publish', str(evaluated['src']), '--model', 'resnet83_spe', '--tag', 'cifar10', '--out', str(out),
                 '--dry-run', '--eval-json', str(tmp_path / 'missing.json')])
        with pytest.raises(SystemExit, match='template'):
            cli(['publish', str(evaluated['src']), '--model', 'resnet83_spe', '--tag', 'cifar10', '--out', str(out),
                 '--dry-run', '--template', str(tmp_path / 'no-template.md')])
        assert list(tmp_path.iterdir()) == []

    def test_new_tag_needs_a_repo_id(self, evaluated, tmp_path):
        with pytest.raises(SystemExit, match='--repo-id'):
            cli(['publish', str(evaluated['src']), '--model', 'resnet83_spe', '--tag', 'cifar10_new',
                 '--out', str(tmp_path / 'o')])
        cli(['publish', str(evaluated['src']), '--model', 'resnet83_spe', '--tag', 'cifar10_new',
             '--out', str(tmp_path / 'o'), '--dry-run'])
        config = json.loads((tmp_path / 'o' / 'config.json').read_text())
        assert config['pretrained_cfg']['tag'] == 'cifar10_new'


def test_eval_of_hub_weights_records_their_sha(hub, evaluated, tmp_path):
    out = tmp_path / 'eval.json'
    _run(hub, f'''
        from timm_spe.cli import main
        main(['eval', 'resnet83_spe.cifar10', '--data-dir', {str(evaluated['data'])!r}, '--limit', '5',
              '--out', {str(out)!r}])
        print(json.dumps({{}}))
    ''', tmp_path / 'hf')
    result = json.loads(out.read_text())
    sha = timm_spe.hub.sha256_file(hub['repo'] / 'model.safetensors')
    assert result['checkpoint'] is None and result['checkpoint_sha256'] == sha == result['weights_sha256']
    assert result['tag'] == 'cifar10' and result['num_images'] == 5 and result['num_images_in_split'] == 10
    assert result['command'] == f"timm-spe eval resnet83_spe.cifar10 --data-dir {evaluated['data']} --limit 5 --out {out}"
