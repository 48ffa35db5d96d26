"""Run timm's own model tests (tests/test_models.py of the timm sdist on PyPI) against our models.

The sdist matching the installed timm is downloaded once with pip (PyPI is reachable in CI) into
``$TIMM_SPE_CACHE`` (default ``~/.cache/timm-spe``). A conftest placed beside it imports timm_spe so
our models are registered before timm's tests parametrize over ``list_models()``; ``-k`` then
selects our models. Skipped by design: timm's ``*_pretrained`` tests (they download weights from
the Hub; our loading is covered against a local Hub in test_hub.py).

Every registered model and tag goes through ``test_model_default_cfgs``; the forward / backward / features /
TorchScript / FX tests run on one depth of each CIFAR attention kind (the smallest of CIFAR_DEPTHS, ResNet-83) and
two ImageNet SPE ResNets, and the two shipped models (resnet164_spe, resnet164) take the forward / backward /
features ones. The other CIFAR depths (164 / 245 / 326 of the same kinds, resnet101_spe) are the same classes with
more blocks per stage -- a number in the variant table, checked by test_resnet.py's parameter counts -- and made
this test take half an hour (ResNet-326 through TorchScript and FX); TorchScript and FX of the ResNet-164s alone took
60 of its 277 s, for nothing ResNet-83's runs do not check. The lists are read from the variant tables of
timm_spe/resnet.py (``model_names()``, ``CIFAR_DEPTHS``, ``CIFAR_ATTN_LAYERS``, ``IMAGENET_MODELS``), not typed in.
"""
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import timm

import timm_spe
from timm_spe.resnet import CIFAR_ATTN_LAYERS, CIFAR_DEPTHS, IMAGENET_MODELS, cifar_model_name

OUR_MODELS = sorted(timm_spe.model_names())  # every registered model, read from timm's registry
SHIPPED = ('resnet164', 'resnet164_spe')  # the shipped weights' models: no TorchScript / FX runs (docstring)
IMAGENET_TESTED = ('resnet18_spe', 'resnet50_spe')  # resnet101_spe: resnet50_spe's class with more blocks
# the models the forward/backward/features/TorchScript/FX tests run on (see the module docstring): every CIFAR
# attention kind at the smallest depth, the shipped models, two ImageNet SPE ResNets
MODEL_TEST_MODELS = sorted({cifar_model_name(min(CIFAR_DEPTHS), attn) for attn in CIFAR_ATTN_LAYERS}
                           | set(SHIPPED) | set(IMAGENET_TESTED))
TRACE_KINDS = ('test_model_forward_torchscript', 'test_model_forward_fx', 'test_model_backward_fx',
               'test_model_forward_fx_torchscript')
TEST_KINDS = (
    'test_model_forward', 'test_model_backward', 'test_model_default_cfgs', 'test_model_forward_torchscript',
    'test_model_forward_features', 'test_model_forward_intermediates_features', 'test_model_forward_intermediates',
    'test_model_forward_fx', 'test_model_backward_fx', 'test_model_forward_fx_torchscript',
)


def _timm_tests_dir() -> Path:
    cache = Path(os.environ.get('TIMM_SPE_CACHE', Path.home() / '.cache' / 'timm-spe'))
    target = cache / f'timm-{timm.__version__}-tests'
    if (target / 'test_models.py').exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f'timm-{timm.__version__}.tar.gz'
    if not sdist.exists():
        subprocess.run(
            [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:', '-q',
             f'timm=={timm.__version__}', '-d', str(cache)],
            check=True)
    target.mkdir(exist_ok=True)
    with tarfile.open(sdist) as tar:
        member = tar.getmember(f'timm-{timm.__version__}/tests/test_models.py')
        (target / 'test_models.py').write_bytes(tar.extractfile(member).read())
    return target


def test_the_suite_covers_every_registered_model():
    """The suite's model lists come from the variant tables of timm_spe/resnet.py (a new depth or attention kind is
    in them without a change here): every registered model takes the default-cfgs test, and every CIFAR attention
    kind the TorchScript / FX ones at one depth at least. Needs no timm sdist: runs in seconds."""
    assert set(OUR_MODELS) == {cifar_model_name(d, a) for d in CIFAR_DEPTHS for a in CIFAR_ATTN_LAYERS} | set(
        IMAGENET_MODELS)
    assert len(OUR_MODELS) == len(CIFAR_DEPTHS) * len(CIFAR_ATTN_LAYERS) + len(IMAGENET_MODELS)
    assert set(MODEL_TEST_MODELS) <= set(OUR_MODELS) and set(IMAGENET_TESTED) <= set(IMAGENET_MODELS)
    assert len(MODEL_TEST_MODELS) == len(CIFAR_ATTN_LAYERS) + len(SHIPPED) + len(IMAGENET_TESTED)  # none twice
    traced = set(MODEL_TEST_MODELS) - set(SHIPPED)
    assert all(any(cifar_model_name(d, a) in traced for d in CIFAR_DEPTHS) for a in CIFAR_ATTN_LAYERS)


@pytest.mark.timeout(3600)
def test_timm_model_suite(tmp_path):
    src = _timm_tests_dir()
    (tmp_path / 'test_models.py').write_bytes((src / 'test_models.py').read_bytes())
    (tmp_path / 'conftest.py').write_text('import timm_spe  # register SPE models before collection\n')
    expected = [(k, m) for k in TEST_KINDS if k != 'test_model_default_cfgs' for m in MODEL_TEST_MODELS
                if not (m in SHIPPED and k in TRACE_KINDS)]
    expected += [('test_model_default_cfgs', t) for t in timm.list_models(OUR_MODELS, include_tags=True)]
    pytest_args = [sys.executable, '-m', 'pytest', '-p', 'no:cacheprovider',
                   '-W', 'ignore::pytest.PytestUnknownMarkWarning']
    # timm's test ids are test_kind[<batch>-<model>]: collect them once, then run exactly the expected ones
    collected = subprocess.run(
        pytest_args + ['--collect-only', '-q', '-k', f"({' or '.join(OUR_MODELS)}) and not pretrained",
                       str(tmp_path / 'test_models.py')],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    wanted = set(expected)
    node_ids = [line for line in collected.stdout.splitlines()
                if (m := re.search(r'::(test_\w+)\[\d+-([\w.]+)\]$', line)) and (m.group(1), m.group(2)) in wanted]
    assert node_ids, collected.stdout[-3000:] + collected.stderr[-2000:]
    proc = subprocess.run(pytest_args + ['-v'] + node_ids, cwd=tmp_path, capture_output=True, text=True, timeout=3600)
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    results = {}
    for kind, name, outcome in re.findall(r'::(test_\w+)\[\d+-([\w.]+)\] (PASSED|FAILED|SKIPPED|ERROR)', proc.stdout):
        results[(kind, name)] = outcome
    not_passed = [(k, m, results.get((k, m))) for k, m in expected if results.get((k, m)) != 'PASSED']
    assert not not_passed, f'not passed: {not_passed[:20]}\n{tail}'
    assert len(results) == len(expected), sorted(set(results) - set(expected))[:10]
