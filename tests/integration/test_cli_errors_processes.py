"""The CLI's one-line errors as a user sees them: a subprocess's exit status and stderr, without a traceback or a stray warning."""
import os
import subprocess
import sys

import pytest
import torch
from helpers import minimal_staged_folder

import timm_spe  # noqa: F401

TOKEN = 'hf_FAKEtokenDoNotPrint0123456789abcdef'
UNREACHABLE = 'http://127.0.0.1:9'  # the discard port: nothing listens there


def _subprocess(argv, tmp_path, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGING_FACE'))}
    full.update(HF_HOME=str(tmp_path / 'hf-home'), HF_HUB_DISABLE_TELEMETRY='1', OMP_NUM_THREADS='1',
                PYTHONPATH=os.pathsep.join(sys.path), **env)
    return subprocess.run([sys.executable, '-m', 'timm_spe.cli', *argv], capture_output=True, text=True, cwd=tmp_path,
                          env=full, timeout=300)


def test_corrupt_safetensors_exit_status_and_stderr(weights, tmp_path):
    """The real thing: a subprocess exits 1 and its stderr is the one line."""
    proc = _subprocess(['convert', str(weights['corrupt']), '--model', 'resnet83_spe.cifar10', '--out', 'o.safetensors'],
                       tmp_path)
    assert proc.returncode == 1 and proc.stdout == ''
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith('timm-spe convert: error: ') and 'not a readable safetensors file' in proc.stderr


def test_a_plain_pickle_is_refused_in_our_words_without_torchs_advice_or_a_stray_warning(tmp_path):
    """torch's refusal says 'Please file an issue' (a plain pickle) or advises allow-listing the object, and warns
    about the pickle protocol on stderr: none of it is the fix for an untrusted file."""
    import pickle
    plain = tmp_path / 'plain.pth.tar'
    plain.write_bytes(pickle.dumps({'state_dict': NotAllowed()}))
    obj = tmp_path / 'object.pth.tar'
    torch.save({'state_dict': {}, 'args': NotAllowed()}, obj)
    for path, says in ((plain, 'its pickle holds something other than tensors and plain containers'),
                       (obj, 'it holds a pickled Python object (test_cli_errors_processes.NotAllowed), not only tensors')):
        proc = _subprocess(['inspect', 'resnet83_spe', '--checkpoint', str(path)], tmp_path)
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        line = proc.stderr.strip()
        assert f"'{path}' cannot be loaded safely: {says}." in line and 're-save the weights as safetensors' in line
        for torch_advice in ('file an issue', 'add_safe_globals', 'UserWarning', '..'):
            assert torch_advice not in line


class NotAllowed:
    """Any object outside the allow-list (importable, so a pickle of it names it)."""


@pytest.mark.parametrize('debug', [False, True])
def test_upload_without_network_subprocess(debug, tmp_path):
    """HF_ENDPOINT / HF_TOKEN from the environment, as a user sets them: exit 1, the token nowhere."""
    folder = minimal_staged_folder(tmp_path / 'staged')
    proc = _subprocess((['--debug'] if debug else []) + ['upload', str(folder), '--repo-id', 'org/m.t'], tmp_path,
                       HF_ENDPOINT=UNREACHABLE, HF_TOKEN=TOKEN)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith('timm-spe upload: error: cannot reach the Hugging Face Hub'), proc.stderr
    assert ('Traceback (most recent call last)' in proc.stderr) == debug and (len(lines) == 1) != debug
    assert TOKEN not in proc.stdout + proc.stderr and TOKEN[3:] not in proc.stdout + proc.stderr
