"""Supported versions, tested: `./run.sh test` (what CI runs) runs the whole suite on the lowest timm that
pyproject.toml allows (run.sh's TIMM_VERSION) and the fast tier on the newest release inside the range
(TIMM_NEWEST, in .venv-timm-newest); it fails if either tier fails.
"""
import os
import re
import subprocess
from pathlib import Path

import pytest
import timm
import torch
from packaging.requirements import Requirement
from packaging.version import Version
from PIL import Image
from timm.data import create_loader

tomllib = pytest.importorskip('tomllib')  # Python 3.11+

from helpers import ROOT

RUN_SH = (ROOT / 'run.sh').read_text()


def _run_sh_pins():
    lowest = re.search(r'^TIMM_VERSION=(\S+)', RUN_SH, re.M)
    newest = re.search(r'^TIMM_NEWEST=\$\{TIMM_NEWEST:-(\S+)\}$', RUN_SH, re.M)
    assert lowest and newest, 'run.sh pins TIMM_VERSION=x.y.z and TIMM_NEWEST=${TIMM_NEWEST:-x.y.z}'
    return Version(lowest.group(1)), Version(newest.group(1))


def test_ci_tests_the_lowest_and_newest_timm_in_range():
    deps = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['dependencies']
    timm = [r for r in map(Requirement, deps) if r.name == 'timm']
    assert len(timm) == 1
    bounds = {s.operator: Version(s.version) for s in timm[0].specifier}
    assert set(bounds) == {'>=', '<'}, f'pyproject gives timm a range >=lowest,<upper, not {timm[0].specifier}'
    lowest, newest = _run_sh_pins()
    assert lowest == bounds['>='], 'run.sh TIMM_VERSION must be the lower bound pyproject allows'
    assert lowest < newest < bounds['<'], 'run.sh TIMM_NEWEST must be a newer release inside pyproject\'s range'
    assert newest in timm[0].specifier


def _stub(path: Path, rc: int, log: Path) -> str:
    path.write_text(f'#!/bin/sh\necho "$(basename "$0") $*" >> "{log}"\n'
                    f'[ "$2" = pytest ] && exit {rc}\nexit 0\n')
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize('lowest_rc, newest_rc', [(0, 0), (1, 0), (0, 1), (2, 1)])
def test_run_sh_test_runs_both_tiers_and_fails_if_either_fails(tmp_path, lowest_rc, newest_rc):
    """run.sh's `test` branch with setup stubbed and a stand-in python per environment."""
    branch = RUN_SH.split('\n    test)', 1)[1].split(';;', 1)[0]
    functions = re.search(r'^TIERS=\(\)$.*?^tiers_summary\(\) \{$.*?^\}$', RUN_SH, re.M | re.S).group(0)
    log = tmp_path / 'calls.log'
    script = '\n'.join([
        'set -euo pipefail', 'setup() { :; }', 'setup_newest() { :; }',
        'VENV=.venv NEWEST_VENV=.venv-timm-newest TIMM_VERSION=1.0.28 TIMM_NEWEST=1.0.31',
        f'PY={_stub(tmp_path / "lowest", lowest_rc, log)}', f'NEWEST_PY={_stub(tmp_path / "newest", newest_rc, log)}',
        functions, branch])
    proc = subprocess.run(['bash', '-c', script], cwd=tmp_path, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if not k.startswith('TIMM_')})
    calls = log.read_text().splitlines()
    assert calls[0] == 'lowest -m ruff check .'
    assert calls[1] == 'lowest -m pytest -q -p no:cacheprovider --durations=15 tests'
    assert calls[2] == 'newest -m pytest -q -p no:cacheprovider --durations=15 -m not slow tests'
    assert len(calls) == 3
    assert (proc.returncode == 0) == (lowest_rc == newest_rc == 0), proc.stdout + proc.stderr
    summary = [line for line in proc.stdout.splitlines() if line.startswith('run.sh: ')]
    assert len(summary) == 2
    assert summary[0].startswith('run.sh: whole suite, timm 1.0.28 (.venv): ')
    assert summary[1].startswith('run.sh: fast tier (not slow), timm 1.0.31 (.venv-timm-newest): ')
    for line, rc in zip(summary, (lowest_rc, newest_rc)):
        assert (' passed in ' in line) == (rc == 0) and (f'FAILED (pytest exit {rc})' in line) == (rc != 0)


class _Images(torch.utils.data.Dataset):
    transform = None  # create_loader sets it

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.transform(Image.new('RGB', (32, 32))), i % 2


def _first_batch(num_workers):
    loader = create_loader(_Images(), input_size=(3, 32, 32), batch_size=2, num_workers=num_workers,
                           use_prefetcher=False, device=torch.device('cpu'))
    images, _ = next(iter(loader))
    return images


def test_timm_1_0_28_loader_needs_workers_1_or_more_as_the_readme_says():
    """timm 1.0.28's create_loader (train.py, validate.py) asks for persistent workers whatever num_workers is, so
    `--workers 0` fails there; `--workers 1` works in every supported release, 0 from timm 1.0.29 on."""
    assert _first_batch(num_workers=1).shape == (2, 3, 32, 32)
    if Version(timm.__version__) < Version('1.0.29'):
        with pytest.raises(ValueError, match='persistent_workers option needs num_workers > 0'):
            _first_batch(num_workers=0)
    else:
        assert _first_batch(num_workers=0).shape == (2, 3, 32, 32)
