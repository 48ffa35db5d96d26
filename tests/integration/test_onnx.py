"""ONNX: SPE models export in eval mode with both of torch's exporters (TorchScript-based, ``dynamo=False``, and
torch.export-based, ``dynamo=True``), and onnxruntime computes PyTorch's logits, at another batch size too; the
limits docs/export.md states (training mode, float16, the CPU kernels) are what these tests find; timm's own
onnx_export.py and onnx_validate.py run on our pretrained model through ``timm-spe run``.

The SPE parameters and BN statistics are random (``lambda`` away from 0 and 1, gates far from 0.25), so that an
SPE term lost or changed in the graph shows in the logits.
"""
import json
import os
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import timm_spe
from timm_spe.labels import CIFAR10_LABELS

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')

from helpers import ROOT

TIMM_SCRIPTS = ROOT / '.cache' / 'pytorch-image-models'
CIFAR_TAR = ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'
EXPORTERS = ['legacy', 'dynamo']


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, timm_spe.SpeModule):
                for t in (m.w_exc, m.b_exc, m.w_rew, m.b_rew):
                    t.copy_(torch.randn(t.shape, generator=g))
                m.p.copy_(torch.rand(m.p.shape, generator=g) * 1.3 + 0.2)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
    return model


def _spe_model(depth=20):
    """A CIFAR SPE ResNet (the class of resnet83_spe ... resnet326_spe, 2 blocks a stage) with random SPE and BN."""
    torch.manual_seed(0)
    return _randomize(timm_spe.CifarResNet(depth=depth, attn_layer='spe')).eval()


def _input(n, seed=0, dtype=torch.float32):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _export(model, x, path, exporter, **kwargs):
    """``torch.onnx.export`` with a dynamic batch axis; input 'input', output 'logits' (as docs/export.md)."""
    if exporter == 'dynamo':
        axes = dict(dynamic_shapes=({0: 'batch'},))
    else:
        axes = dict(dynamic_axes={'input': {0: 'batch'}, 'logits': {0: 'batch'}})
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the legacy exporter's deprecation warning
        torch.onnx.export(model, (x,), str(path), input_names=['input'], output_names=['logits'],
                          dynamo=exporter == 'dynamo', verbose=False, **axes, **kwargs)
    return path


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return session.run(None, {'input': x.numpy()})[0]


def _training_only(graph):
    """Nodes that only training computes: dropout, BatchNormalization with batch statistics."""
    return [n.op_type for n in graph.node if n.op_type == 'Dropout' or (
        n.op_type == 'BatchNormalization' and any(a.name == 'training_mode' and a.i for a in n.attribute))]


@pytest.mark.parametrize('exporter', EXPORTERS)
def test_an_spe_model_exported_in_eval_mode_gives_pytorchs_logits_in_onnxruntime_at_any_batch(exporter, tmp_path):
    model = _spe_model()
    path = _export(model, _input(2), tmp_path / 'spe.onnx', exporter)
    for n in (2, 3):  # exported at batch 2, run at 3 too
        with torch.no_grad():
            reference = model(_input(n, seed=n)).numpy()
        np.testing.assert_allclose(_run(path, _input(n, seed=n)), reference, rtol=1e-4, atol=1e-5)
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ['input'] and [o.name for o in graph.output] == ['logits']
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named (dynamic) batch axis
    ops = {n.op_type for n in graph.node}
    assert {'ReduceMax', 'ReduceMin', 'Sigmoid'} <= ops  # SPE's pools and gates are in the graph
    assert not _training_only(graph)
    assert not any('timm_spe' in n.domain or 'timm_spe' in n.op_type for n in graph.node)


def test_the_shipped_weights_export_and_give_their_logits_in_onnxruntime(tmp_path):
    """resnet164_spe's default weights (and the plain control's), TorchScript-based exporter: real weights, real
    logits; the torch.export-based exporter runs on them in the slow timm-script test below."""
    for name in ('resnet164_spe', 'resnet164'):
        model = timm.create_model(name, pretrained=True).eval()
        path = _export(model, _input(2), tmp_path / f'{name}.onnx', 'legacy')
        with torch.no_grad():
            reference = model(_input(4, seed=1)).numpy()
        np.testing.assert_allclose(_run(path, _input(4, seed=1)), reference, rtol=1e-4, atol=1e-4)


def test_a_float16_model_exports_and_runs_in_onnxruntime(tmp_path):
    model = _spe_model().half()
    path = _export(model, _input(2, dtype=torch.float16), tmp_path / 'fp16.onnx', 'legacy')
    x = _input(3, seed=3, dtype=torch.float16)
    with torch.no_grad():
        reference = model(x).float().numpy()
    out = _run(path, x)
    assert out.dtype == np.float16
    np.testing.assert_allclose(out.astype(np.float32), reference, rtol=1e-2, atol=2e-3)


def test_training_mode_export_with_the_legacy_exporter_is_the_train_mode_forward(tmp_path):
    """``training=TrainingMode.TRAINING``: BatchNormalization with batch statistics, PyTorch's train-mode logits
    (the Eq. 8 penalty is a gradient hook: no ONNX graph has it)."""
    model = _spe_model().train()
    x = _input(4, seed=4)
    path = _export(model, x, tmp_path / 'train.onnx', 'legacy', training=torch.onnx.TrainingMode.TRAINING,
                   do_constant_folding=False)
    assert 'BatchNormalization' in {n.op_type for n in onnx.load(str(path)).graph.node}
    with torch.no_grad():
        reference = model(x).numpy()
    np.testing.assert_allclose(_run(path, x), reference, rtol=1e-4, atol=1e-5)


# four exports, two torch.export-based: 15-30 s on 2 busy cores
def test_with_the_cpu_kernels_on_export_with_grad_enabled_or_the_legacy_exporter(cpu_kernels_on, tmp_path):
    """The kernels stay out of both exporters' graphs with grad enabled; under ``torch.no_grad()`` torch.export
    keeps them as ops (tests/unit/test_cpu_kernels.py), which the ONNX exporter cannot translate: docs/export.md."""
    model = _spe_model()
    x = _input(3, seed=5)
    with torch.no_grad():
        reference = model(x).numpy()
    for exporter in EXPORTERS:
        path = _export(model, _input(2), tmp_path / f'{exporter}.onnx', exporter)
        np.testing.assert_allclose(_run(path, x), reference, rtol=1e-4, atol=1e-5)
    with torch.no_grad(), pytest.raises(torch.onnx.OnnxExporterError, match='timm_spe.spe_add_relu_'):
        _export(model, _input(2), tmp_path / 'no_grad.onnx', 'dynamo')
    with torch.no_grad():
        _export(model, _input(2), tmp_path / 'no_grad_legacy.onnx', 'legacy')  # tracing never takes the kernels


def _timm_spe(*args, cwd):
    proc = subprocess.run([str(Path(sys.executable).with_name('timm-spe')), *map(str, args)], capture_output=True,
                          text=True, timeout=600, cwd=cwd, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def _test_images(tmp_path):
    """Two CIFAR-10 test images a class (the shared JPEG copy's first two), else one plain image a class."""
    data = tmp_path / 'images'
    if CIFAR_TAR.exists():
        with tarfile.open(CIFAR_TAR) as tar:
            members = [m for m in tar if m.isfile() and '/test/' in m.name and m.name.endswith(('/0000.jpg', '/0001.jpg'))]
            tar.extractall(tmp_path / 'tar', members=members, filter='data')
        (tmp_path / 'tar' / 'cifar10-jpeg' / 'test').rename(data)
    else:
        from PIL import Image
        for c, name in enumerate(CIFAR10_LABELS):
            (data / name).mkdir(parents=True)
            Image.new('RGB', (32, 32), (25 * c, 90, 200 - 20 * c)).save(data / name / '0.png')
    return data


# onnx_export.py takes ~80 s on 2 busy cores (timm 1.0.28: torch.export-based on torch >= 2.9)
@pytest.mark.skipif(not (TIMM_SCRIPTS / 'onnx_export.py').is_file(),
                    reason=f"needs timm's onnx_export.py and onnx_validate.py in {TIMM_SCRIPTS} (a pytorch-image-models clone)")
def test_timm_onnx_export_py_and_onnx_validate_py_run_our_pretrained_model(tmp_path):
    """As docs/export.md shows them: onnx_export.py writes resnet164_spe with its shipped weights (and checks the
    forward itself), onnxruntime gives PyTorch's logits at another batch size, and onnx_validate.py, given the CIFAR
    data config, scores the images as timm-spe's own evaluation of the PyTorch model does."""
    from timm_spe.evaluate import evaluate
    out = _timm_spe('run', TIMM_SCRIPTS / 'onnx_export.py', 'resnet164_spe.onnx', '--model', 'resnet164_spe', '-b', '2',
                    '--check-forward', cwd=tmp_path)
    assert 'Creating PyTorch resnet164_spe model' in out
    model = timm.create_model('resnet164_spe', pretrained=True).eval()
    session = ort.InferenceSession(str(tmp_path / 'resnet164_spe.onnx'), providers=['CPUExecutionProvider'])
    with torch.no_grad():
        reference = model(_input(3, seed=6)).numpy()
    logits = session.run(None, {session.get_inputs()[0].name: _input(3, seed=6).numpy()})[0]
    np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=1e-4)

    data = _test_images(tmp_path)
    cfg = model.pretrained_cfg
    out = _timm_spe('run', TIMM_SCRIPTS / 'onnx_validate.py', data, '--onnx-input', 'resnet164_spe.onnx',
                    '--img-size', '32', '--crop-pct', '1.0', '--mean', *cfg['mean'], '--std', *cfg['std'],
                    '--interpolation', 'bilinear', '-b', '10', '-j', '1', cwd=tmp_path)
    top1 = float(out.strip().splitlines()[-1].split('Prec@1')[1].split()[0])
    result = evaluate(model, data, batch_size=10, progress=False)
    assert top1 == pytest.approx(result['top1'], abs=1e-6), (out[-500:], json.dumps(result)[:500])
