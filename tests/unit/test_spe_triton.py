"""The Triton block tail (the CUDA default where Triton runs), run here by Triton's interpreter on CPU tensors: it
computes what the stock-op functions compute, adds the Eq. 8 penalty as they do, and issues at most 30 ATen ops per SPE
block beyond the plain block's (the CUDA goal; SE adds 24). Eager calls launch the kernels directly and give what
the custom ops give, bit for bit; torch.compile traces the custom ops; CPU tensors take the kernels only when switched
on, CUDA tensors by default where Triton runs on the GPU (checked here with that check's parts stubbed)."""
import collections
import copy
import importlib
import sys
import types

import pytest
import timm
import torch
from torch import nn

import timm_spe
from benchmarks.count_ops import block_ops
from timm_spe import spe_triton
from timm_spe.spe import SpeModule, batch_norm_spe_add_relu

LAYOUTS = [torch.contiguous_format, torch.channels_last]


@pytest.fixture(scope='module', autouse=True)
def interpreted():
    """Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before torch imports Triton)."""
    kernels = importlib.import_module('timm_spe._triton_kernels')
    importlib.import_module('timm_spe._triton_ops')  # registered, as set_triton_kernels(True) does
    if type(kernels._tail_kernel).__name__ != 'InterpretedFunction':
        pytest.skip('TRITON_INTERPRET=0: the kernels are compiled for a GPU, these tests run CPU tensors')


def _tail_inputs(n=3, c=20, h=7, w=9, dtype=None, memory_format=torch.contiguous_format, formulation='official',
                 seed=0):
    """Block-tail inputs whose every gate term matters: random BN and SPE parameters, a BN input with mean >> 0."""
    torch.manual_seed(seed)
    x, shortcut = torch.randn(n, c, h, w) * 2 + 3, torch.randn(n, c, h, w)
    x, shortcut = (t.to(dtype or torch.float32).contiguous(memory_format=memory_format) for t in (x, shortcut))
    bn, spe = nn.BatchNorm2d(c), SpeModule(c, formulation=formulation)
    with torch.no_grad():
        for p in list(bn.parameters()) + list(spe.parameters()):
            p.copy_(torch.randn_like(p) * 0.5)
    return x, shortcut, bn, spe, torch.randn(n, c, h, w)


def _tail_step(triton, x, shortcut, bn, spe, grad, dtype=None):
    """Output, gradients of x, shortcut and every parameter, running statistics (on copies of the modules)."""
    bn, spe = copy.deepcopy(bn), copy.deepcopy(spe)
    x, shortcut = x.clone().requires_grad_(), shortcut.clone().requires_grad_()
    with timm_spe.set_triton_kernels(triton), \
            torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = batch_norm_spe_add_relu(x, shortcut, bn, spe)
    out.backward(grad.to(out.dtype))
    return [out, x.grad, shortcut.grad, *(p.grad for p in [*bn.parameters(), *spe.parameters()]),
            bn.running_mean, bn.running_var]


def _float64_reference(x, shortcut, bn, spe, grad):
    """The same tail in float64 plain autograd ops, from the same (rounded) inputs."""
    bn, spe = copy.deepcopy(bn).double(), copy.deepcopy(spe).double()
    x, shortcut = x.double().requires_grad_(), shortcut.double().requires_grad_()
    y = bn(x)
    out = torch.relu(y * spe.attn_map(y) + shortcut)
    out.backward(grad.double())
    return [out, x.grad, shortcut.grad, *(p.grad for p in [*bn.parameters(), *spe.parameters()])]


def _relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_cpu_tensors_take_the_kernels_only_where_switched_on_under_the_interpreter():
    x = torch.randn(2, 3, 4, 4)
    assert timm_spe.triton_kernels_enabled() is None and not spe_triton.applies(x)  # the default: CUDA only
    with timm_spe.set_triton_kernels(True):
        assert spe_triton.applies(x) and spe_triton.applies(x.bfloat16()) and spe_triton.applies(x.half())
        assert not spe_triton.applies(x.double())
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv('TRITON_INTERPRET')
            assert not spe_triton.applies(x)  # CPU tensors need the interpreter
    assert timm_spe.triton_kernels_enabled() is None


def test_by_default_the_cpu_path_stays_the_stock_one_under_the_interpreter(monkeypatch):
    """No Triton function runs for CPU tensors unless switched on, block tail or layer alone."""
    def refuse(*args):
        raise AssertionError('the Triton path ran by default on CPU tensors')
    monkeypatch.setattr(spe_triton, 'fused_batch_norm_spe_add_relu', refuse)
    monkeypatch.setattr(spe_triton, 'spe_scale', refuse)
    x, shortcut, bn, spe, grad = _tail_inputs()
    batch_norm_spe_add_relu(x.clone().requires_grad_(), shortcut, bn, spe).backward(grad)
    spe.train()(x.clone().requires_grad_()).backward(grad)


def _cuda_like(dtype=torch.float32, index=0):
    """What :func:`spe_triton.applies` reads of a CUDA tensor, without a GPU."""
    return types.SimpleNamespace(is_cuda=True, device=torch.device('cuda', index), dtype=dtype, shape=(2, 3, 4, 4),
                                 numel=lambda: 96, get_device=lambda: index)


@pytest.fixture()
def gpu_checks(monkeypatch):
    """The default's check per device with its parts stubbed: no answers kept, a GPU of compute capability 9.0 (the
    current device: ``current``, 0), no capture, no ROCm, no interpreter, and a probe that records the devices it ran
    on (``probes``)."""
    from timm_spe import _triton_ops
    current = [0]
    monkeypatch.setattr(spe_triton, '_current_cuda_device', lambda: current[0])
    monkeypatch.setattr(spe_triton, '_GPU_RUNS', {})
    monkeypatch.delenv('TRITON_INTERPRET')
    monkeypatch.setattr(torch.version, 'hip', None)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, 'is_current_stream_capturing', lambda: False)
    probes = []
    monkeypatch.setattr(_triton_ops, 'probe', probes.append)
    return types.SimpleNamespace(monkeypatch=monkeypatch, probes=probes, ops=_triton_ops, current=current)


def test_by_default_cuda_tensors_take_the_kernels_where_triton_runs_on_the_gpu(gpu_checks, recwarn):
    x = _cuda_like()
    assert spe_triton.applies(x) and spe_triton.applies(_cuda_like(torch.bfloat16)) and spe_triton.applies(x)
    assert gpu_checks.probes == [torch.device('cuda', 0)]  # once per device
    assert not spe_triton.applies(_cuda_like(index=1))  # not the current device: Triton would launch on the wrong one
    gpu_checks.current[0] = 1
    assert spe_triton.applies(_cuda_like(index=1)) and gpu_checks.probes[1:] == [torch.device('cuda', 1)]
    assert not spe_triton.applies(x)
    gpu_checks.current[0] = 0
    assert not spe_triton.applies(_cuda_like(torch.float64))
    with timm_spe.set_triton_kernels(False):
        assert not spe_triton.applies(x)
    assert not recwarn.list


@pytest.mark.parametrize('gpu', ['capability 7.5', 'ROCm', 'interpreter', 'no triton'])
def test_by_default_cuda_tensors_keep_the_stock_ops_where_triton_does_not_run(gpu_checks, gpu, recwarn):
    mp = gpu_checks.monkeypatch
    if gpu == 'capability 7.5':
        mp.setattr(torch.cuda, 'get_device_capability', lambda device=None: (7, 5))
    elif gpu == 'ROCm':
        mp.setattr(torch.version, 'hip', '6.2')
    elif gpu == 'interpreter':
        mp.setenv('TRITON_INTERPRET', '1')
    else:
        mp.setitem(sys.modules, 'timm_spe._triton_ops', None)  # importing it raises ImportError
    x = _cuda_like()
    assert not spe_triton.applies(x) and not spe_triton.applies(x) and not gpu_checks.probes
    assert not recwarn.list  # nothing to say: the stock ops, as without Triton
    if gpu != 'no triton':
        with timm_spe.set_triton_kernels(True):  # switched on: any CUDA GPU, the user's call
            assert spe_triton.applies(x)


def test_where_the_probe_kernel_fails_cuda_tensors_keep_the_stock_ops_and_say_why_once(gpu_checks):
    def no_compiler(device):
        raise RuntimeError('Failed to find C compiler. Please specify via CC environment variable.\nmore')
    gpu_checks.monkeypatch.setattr(gpu_checks.ops, 'probe', no_compiler)
    with pytest.warns(UserWarning, match=r'^timm_spe: Triton cannot run its kernels on cuda:0 \(RuntimeError: Failed '
                                         r'to find C compiler\. .*\); SPE trains on the stock CUDA ops there '
                                         r'\(TIMM_SPE_TRITON_KERNELS=0 skips this check\)\.$') as caught:
        assert not spe_triton.applies(_cuda_like())
        assert not spe_triton.applies(_cuda_like())
    assert len(caught) == 1


def test_where_a_mode_watches_the_gpu_check_tries_no_kernel_and_keeps_no_answer(gpu_checks):
    """Under a fake tensor mode (or any dispatch mode) a probe launch would fail for the wrong reason."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        assert spe_triton.applies(_cuda_like())
    assert not gpu_checks.probes and not spe_triton._GPU_RUNS
    assert spe_triton.applies(_cuda_like()) and gpu_checks.probes == [torch.device('cuda', 0)]


def test_under_torch_compile_the_gpu_check_is_a_constant_not_a_graph_break(gpu_checks):
    """Dynamo runs the check once, on the traced tensor's device, and keeps the answer (a CPU tensor stands in)."""
    def step(t):
        return t + 1 if spe_triton._gpu_runs_triton(t.device) else t - 1
    torch._dynamo.reset()
    assert torch.compile(step, backend='eager', fullgraph=True)(torch.zeros(1)).item() == 1


def test_without_triton_the_switch_says_so_in_one_line_and_stays_off(monkeypatch):
    monkeypatch.setitem(sys.modules, 'triton', None)  # import triton raises ImportError
    with pytest.raises(RuntimeError, match=r"^the Triton kernels need the triton package \(.*\); install it"):
        timm_spe.set_triton_kernels(True)
    assert timm_spe.triton_kernels_enabled() is None


def test_the_switch_acts_at_once_restores_as_a_context_manager_and_reads_the_environment(monkeypatch):
    from timm_spe import config
    switch = timm_spe.set_triton_kernels(True)
    try:
        assert timm_spe.triton_kernels_enabled() is True and switch.previous is None
        with timm_spe.set_triton_kernels(False):
            assert timm_spe.triton_kernels_enabled() is False
            with timm_spe.set_triton_kernels(None):
                assert timm_spe.triton_kernels_enabled() is None
            assert timm_spe.triton_kernels_enabled() is False
        assert timm_spe.triton_kernels_enabled() is True
    finally:
        timm_spe.set_triton_kernels(None)
    monkeypatch.setenv('TIMM_SPE_TRITON_KERNELS', 'maybe')
    with pytest.warns(UserWarning, match='TIMM_SPE_TRITON_KERNELS=.maybe. is not understood.*Triton kernels keep '
                                         'their default'):
        config._from_env()
    assert timm_spe.triton_kernels_enabled() is None
    try:
        for value, setting in (('1', True), ('0', False), ('', False)):  # unset: as it was
            monkeypatch.setenv('TIMM_SPE_TRITON_KERNELS', value)
            config._from_env()
            assert timm_spe.triton_kernels_enabled() is setting, value
    finally:
        timm_spe.set_triton_kernels(None)


@pytest.mark.parametrize('formulation', ['official', 'paper'])
@pytest.mark.parametrize('memory_format', LAYOUTS, ids=['nchw', 'channels_last'])
def test_the_triton_tail_gives_the_stock_functions_results_in_float32(formulation, memory_format):
    x, shortcut, bn, spe, grad = _tail_inputs(memory_format=memory_format, formulation=formulation)
    stock = _tail_step(False, x, shortcut, bn, spe, grad)
    triton = _tail_step(True, x, shortcut, bn, spe, grad)
    assert triton[0].is_contiguous(memory_format=memory_format)
    assert triton[1].is_contiguous(memory_format=memory_format)
    for a, b in zip(triton, stock):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize('memory_format', LAYOUTS, ids=['nchw', 'channels_last'])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bfloat16', 'float16'])
def test_under_autocast_the_triton_tail_is_as_close_to_float64_as_the_stock_functions(dtype, memory_format):
    """Rounding differs (float32 accumulation, other summation orders), and a low-precision rounding that flips one
    ReLU mask moves a parameter gradient by a percent: over six random draws, each result's worst error against the
    float64 truth must be within 1.5 times the stock path's worst."""
    names = ['out', 'x', 'shortcut', 'bn.weight', 'bn.bias', 'p', 'w_exc', 'b_exc', 'w_rew', 'b_rew']
    worst_stock, worst_triton = [0.] * len(names), [0.] * len(names)
    for seed in range(6):
        x, shortcut, bn, spe, grad = _tail_inputs(n=4, c=24, h=8, w=8, dtype=dtype, memory_format=memory_format,
                                                  seed=seed)
        truth = _float64_reference(x, shortcut, bn, spe, grad)
        stock = _tail_step(False, x, shortcut, bn, spe, grad, dtype)
        triton = _tail_step(True, x, shortcut, bn, spe, grad, dtype)
        assert triton[0].dtype == dtype and triton[1].dtype == dtype and triton[5].dtype == torch.float32
        for i, (a, b, t) in enumerate(zip(triton, stock, truth)):
            worst_triton[i] = max(worst_triton[i], _relative(a, t))
            worst_stock[i] = max(worst_stock[i], _relative(b, t))
    for name, a, b in zip(names, worst_triton, worst_stock):
        assert a <= 1.5 * b, f'{name}: {a:.2e} against the stock path\'s {b:.2e}'


def test_the_penalty_gradient_is_added_where_the_switch_is_on_when_backward_runs():
    x, shortcut, bn, spe, grad = _tail_inputs()
    with_penalty = _tail_step(True, x, shortcut, bn, spe, grad)[5]
    spe_off = copy.deepcopy(spe)
    spe_off.auto_penalty = False
    without = _tail_step(True, x, shortcut, bn, spe_off, grad)[5]
    # float32 rounding of the larger gradient is all the difference may show
    atol = 2 * torch.finfo(torch.float32).eps * with_penalty.abs().max().item()
    torch.testing.assert_close(with_penalty - without, 2 * spe.eta * spe.p.detach(), rtol=0, atol=atol)
    # switched off after the forward (spe_penalty's hand-over): the backward reads the switch then
    spe_late = copy.deepcopy(spe)
    xg = x.clone().requires_grad_()
    with timm_spe.set_triton_kernels(True):
        out = batch_norm_spe_add_relu(xg, shortcut, copy.deepcopy(bn), spe_late)
    loss = (out * grad).sum() + timm_spe.spe_penalty(spe_late)
    loss.backward()
    torch.testing.assert_close(spe_late.p.grad, with_penalty, rtol=1e-5, atol=1e-6)


def test_double_backward_through_the_triton_functions_raises_instead_of_a_wrong_gradient():
    x, shortcut, bn, spe, _ = _tail_inputs()
    for run in (lambda a: batch_norm_spe_add_relu(a, shortcut, bn, spe), spe.train()):
        a = x.clone().requires_grad_()
        with timm_spe.set_triton_kernels(True):
            out = run(a)
        (g,) = torch.autograd.grad(out.square().sum(), a, create_graph=True)
        with pytest.raises(RuntimeError, match='once_differentiable'):
            g.sum().backward()


def test_a_cifar_resnet_trains_the_same_on_the_triton_tail():
    torch.manual_seed(0)
    model = timm_spe.CifarResNet(depth=11, attn_layer='spe').train()  # resnet83_spe's blocks, one a stage
    with torch.no_grad():  # SPE's initial parameters make a constant gate: make every term matter
        for m in model.modules():
            if isinstance(m, SpeModule):
                for p in m.parameters():
                    p.add_(torch.randn_like(p) * 0.5)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    grads = []
    for on in (False, True):
        m = copy.deepcopy(model)
        with timm_spe.set_triton_kernels(on):
            nn.functional.cross_entropy(m(x), y).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=name)


def test_a_compiled_train_step_on_the_triton_kernels_traces_whole_and_equals_eager():
    """Each op is opaque to torch.compile (a custom op with a fake implementation): fullgraph, same results."""
    from compile_check import assert_compiled_train_step_matches_eager
    torch.manual_seed(0)
    model = timm_spe.CifarResNet(depth=11, attn_layer='spe')
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SpeModule):
                for p in m.parameters():
                    p.add_(torch.randn_like(p) * 0.5)
    with timm_spe.set_triton_kernels(True):
        assert_compiled_train_step_matches_eager(model, torch.randn(2, 3, 32, 32))


def _spy_on_direct_launches(monkeypatch) -> collections.Counter:
    """Counts the calls of the launch functions that go past the custom ops (``_triton_ops.direct``), by op name."""
    from timm_spe import _triton_ops
    calls = collections.Counter()
    for name, fn in vars(_triton_ops.direct).items():
        def spy(*args, _fn=fn, _name=name):
            calls[_name] += 1
            return _fn(*args)
        monkeypatch.setattr(_triton_ops.direct, name, spy)
    return calls


@pytest.mark.parametrize('dtype', [None, torch.bfloat16], ids=['float32', 'bfloat16_autocast'])
@pytest.mark.parametrize('memory_format', LAYOUTS, ids=['nchw', 'channels_last'])
def test_eager_calls_launch_the_kernels_directly_and_give_the_custom_ops_results_bit_for_bit(
        dtype, memory_format, monkeypatch):
    x, shortcut, bn, spe, grad = _tail_inputs(memory_format=memory_format, formulation='paper')
    calls = _spy_on_direct_launches(monkeypatch)
    direct = _tail_step(True, x, shortcut, bn, spe, grad, dtype) + _layer_step(True, x, spe, grad, dtype)
    assert calls == {'bn_spe_tail_': 1, 'relu_map_sums': 1, 'bn_gate_backward': 1, 'bn_input_grad': 1,
                     'spe_scale': 1, 'map_dot': 1, 'gate_backward': 1, 'scale_input_grad': 1}
    monkeypatch.setattr(spe_triton, '_DIRECT_LAUNCHES', False)
    calls.clear()
    ops = _tail_step(True, x, shortcut, bn, spe, grad, dtype) + _layer_step(True, x, spe, grad, dtype)
    assert not calls
    for a, b in zip(direct, ops):
        assert a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(a, b)


def test_without_an_input_gradient_p_still_gets_its_gradient_the_same_way(monkeypatch):
    """The mix_backward op: where BN's input needs no gradient, p's gradient comes from its own kernel."""
    x, shortcut, bn, spe, grad = _tail_inputs()
    grads = []
    for direct in (True, False):
        monkeypatch.setattr(spe_triton, '_DIRECT_LAUNCHES', direct)
        for run in (lambda m: batch_norm_spe_add_relu(x, shortcut, copy.deepcopy(bn), m), lambda m: m.train()(x)):
            m = copy.deepcopy(spe)
            with timm_spe.set_triton_kernels(True):
                run(m).backward(grad)
            grads.append(m.p.grad)
    stock = _tail_step(False, x, shortcut, bn, spe, grad)[5]
    torch.testing.assert_close(grads[0], stock, rtol=1e-5, atol=1e-5 * stock.abs().max().item())
    assert torch.equal(grads[0], grads[2]) and torch.equal(grads[1], grads[3])


def test_what_watches_the_ops_sees_the_custom_ops_and_no_direct_launch(monkeypatch):
    from benchmarks.profile_step import aten_ops
    x, shortcut, bn, spe, grad = _tail_inputs()
    calls = _spy_on_direct_launches(monkeypatch)
    xg = x.clone().requires_grad_()

    def step():
        with timm_spe.set_triton_kernels(True):
            batch_norm_spe_add_relu(xg, shortcut, bn, spe).backward(grad)
    assert aten_ops(step) > 0 and not calls  # a TorchDispatchMode counts: every op through the dispatcher


@pytest.mark.parametrize('memory_format', LAYOUTS, ids=['nchw', 'channels_last'])
def test_a_shortcut_or_gradient_in_another_layout_gives_the_stock_results(memory_format):
    """The kernels address the shortcut as the block input and read the output gradient by its own strides."""
    x, shortcut, bn, spe, grad = _tail_inputs(memory_format=memory_format)
    other = torch.channels_last if memory_format == torch.contiguous_format else torch.contiguous_format
    shortcut = shortcut.contiguous(memory_format=other)
    for g in (grad.contiguous(memory_format=other), grad[:1, :1, :1, :1].expand_as(grad),
              grad.transpose(2, 3).contiguous().transpose(2, 3)):  # the last: H and W do not merge
        stock = _tail_step(False, x, shortcut, bn, spe, g)
        triton = _tail_step(True, x, shortcut, bn, spe, g)
        for a, b in zip(triton, stock):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
        stock, triton = _layer_step(False, x, spe, g), _layer_step(True, x, spe, g)
        for a, b in zip(triton, stock):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_under_torch_compile_each_kernel_is_one_custom_op_call_and_none_is_launched_directly(monkeypatch):
    """Dynamo's graph (fullgraph) holds the custom ops, forward and backward, and the compiled step launches nothing
    past them."""
    graph_ops = []

    def backend(gm, example_inputs):
        for m in gm.modules():
            if isinstance(m, torch.fx.GraphModule):
                graph_ops.extend(str(n.target) for n in m.graph.nodes if n.op == 'call_function')
        return torch._dynamo.lookup_backend('aot_eager')(gm, example_inputs)
    torch._dynamo.reset()
    calls = _spy_on_direct_launches(monkeypatch)
    x, shortcut, bn, spe, grad = _tail_inputs()
    xg = x.clone().requires_grad_()
    with timm_spe.set_triton_kernels(True):
        tail = torch.compile(lambda a, s: batch_norm_spe_add_relu(a, s, bn, spe), backend=backend, fullgraph=True)
        tail(xg, shortcut).backward(grad)
    ours = sorted({t.removesuffix('.default') for t in graph_ops if t.startswith('timm_spe.')})
    assert ours == ['timm_spe.bn_gate_backward', 'timm_spe.bn_input_grad', 'timm_spe.bn_spe_tail_',
                    'timm_spe.relu_map_sums'], graph_ops
    assert not calls and xg.grad is not None


@pytest.mark.parametrize('dtype', [None, torch.bfloat16], ids=['float32', 'bfloat16_autocast'])
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
def test_an_spe_block_on_the_triton_tail_adds_at_most_30_aten_ops_over_the_plain_block(dtype, channels_last):
    """The op counter of benchmarks/count_ops.py over resnet164's layer3 block: each custom op is one Triton launch."""
    plain = block_ops('resnet164', 'layer3', 8, dtype, channels_last)
    with timm_spe.set_triton_kernels(True):
        spe = block_ops('resnet164_spe', 'layer3', 8, dtype, channels_last)
    stock = block_ops('resnet164_spe', 'layer3', 8, dtype, channels_last)
    assert spe - plain <= 30 < stock - plain


def _layer_step(triton, x, spe, grad, dtype=None):
    """The SPE layer alone (``x * gate``): output, gradients of x and of every parameter."""
    spe = copy.deepcopy(spe).train()
    x = x.clone().requires_grad_()
    with timm_spe.set_triton_kernels(triton), \
            torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = spe(x)
    out.backward(grad.to(out.dtype))
    return [out, x.grad, *(p.grad for p in spe.parameters())]


@pytest.mark.parametrize('formulation', ['official', 'paper'])
@pytest.mark.parametrize('memory_format', LAYOUTS, ids=['nchw', 'channels_last'])
def test_the_spe_layer_alone_on_the_triton_kernels_gives_the_stock_results_in_float32(formulation, memory_format):
    x, _, _, spe, grad = _tail_inputs(memory_format=memory_format, formulation=formulation)
    stock = _layer_step(False, x, spe, grad)
    triton = _layer_step(True, x, spe, grad)
    assert triton[0].is_contiguous(memory_format=memory_format)
    for a, b in zip(triton, stock):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bfloat16', 'float16'])
def test_the_spe_layer_alone_under_autocast_is_as_close_to_float64_as_the_stock_function(dtype):
    worst_stock, worst_triton = [0.] * 7, [0.] * 7
    for seed in range(6):
        x, _, _, spe, grad = _tail_inputs(n=4, c=24, h=8, w=8, dtype=dtype, seed=seed)
        truth = _layer_step(False, x.double(), copy.deepcopy(spe).double(), grad.double())
        stock = _layer_step(False, x, spe, grad, dtype)
        triton = _layer_step(True, x, spe, grad, dtype)
        assert triton[0].dtype == dtype and triton[1].dtype == dtype and triton[2].dtype == torch.float32
        for i, (a, b, t) in enumerate(zip(triton, stock, truth)):
            worst_triton[i] = max(worst_triton[i], _relative(a, t))
            worst_stock[i] = max(worst_stock[i], _relative(b, t))
    for name, a, b in zip(['out', 'x', 'p', 'w_exc', 'b_exc', 'w_rew', 'b_rew'], worst_triton, worst_stock):
        assert a <= 1.5 * b, f'{name}: {a:.2e} against the stock path\'s {b:.2e}'


def test_in_timms_resnet_an_spe_block_on_the_triton_kernels_adds_at_most_30_aten_ops():
    """timm's Bottleneck with attn_layer='spe' (the layer alone): counted as count_ops counts, layer2's middle block."""
    from benchmarks.profile_step import aten_ops

    def ops(attn_layer, triton):
        torch.manual_seed(0)
        model = timm.create_model('resnet26', block_args=dict(attn_layer=attn_layer)).train()
        block = model.layer2[1]
        x = torch.randn(2, block.conv1.in_channels, 8, 8, requires_grad=True)

        def step():
            out = block(x)
            out.backward(torch.ones_like(out))
        with timm_spe.set_triton_kernels(triton):
            step()
            return aten_ops(step)
    plain = ops(None, False)
    assert ops('spe', True) - plain <= 30 < ops('spe', False) - plain
