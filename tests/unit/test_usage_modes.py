"""SPE models used the ways timm models are used: mixed precision, module hooks, tracing, torch.func, torch.compile
with an explicit penalty, and timm's constructor conventions."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_spe
from timm_spe import SpeModule

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def _perturb_spe(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Move every SPE parameter off its init: with ``w_exc = 0`` the loss gradient of ``p`` is exactly zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SpeModule):
                for t in m.parameters():
                    t.add_(torch.randn(t.shape, generator=gen) * std)
    return model


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def _autocast_grads(model, x, dtype):
    """Parameter gradients of a cross-entropy loss, under CPU autocast to ``dtype`` (None: float32); the RNG is
    reseeded so drop-path draws the same masks in every run."""
    model = copy.deepcopy(model).train()
    torch.manual_seed(1)
    with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = model(x)
    assert out.dtype == (dtype or torch.float32)
    F.cross_entropy(out.float(), torch.arange(x.shape[0]) % out.shape[1]).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def _flat(grads, select=lambda name: True):
    return torch.cat([g.flatten() for name, g in grads.items() if select(name)])


def _conv_spe_head():
    """SpeModule on its own between plain layers (as in any timm model built with attn_layer='spe')."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), SpeModule(16),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))


# name: (model factory, input shape, bound on the relative error of all gradients under bfloat16; float16 carries
# 3 more mantissa bits, its bound is a third). Deep nets with batch statistics of 4 samples amplify rounding in the
# early layers' gradients (timm's own ResNets as much with or without SPE): the bounds are set from measurement.
AUTOCAST_MODELS = {
    'cifar': (lambda: timm.create_model('resnet83_spe', num_classes=10), (4, 3, 32, 32), 0.1),
    'cifar_drop_path': (lambda: timm.create_model(
        'resnet83_spe', num_classes=10, drop_path_rate=0.1), (4, 3, 32, 32), 0.1),
    'cifar_paper': (lambda: timm.create_model(
        'resnet83_spe', num_classes=10, attn_kwargs=dict(formulation='paper')), (4, 3, 32, 32), 0.1),
    # zero_init_last=False: timm zeroes the BN in front of the attention layer, which leaves SPE without gradient
    'timm_resnet18': (lambda: timm.create_model(
        'resnet18', num_classes=10, zero_init_last=False, block_args=dict(attn_layer='spe')), (4, 3, 64, 64), 0.3),
    'timm_resnet26_drop_path': (lambda: timm.create_model(
        'resnet26', num_classes=10, zero_init_last=False, drop_path_rate=0.2,
        block_args=dict(attn_layer='spe')), (4, 3, 64, 64), 0.3),
    'spe_module': (_conv_spe_head, (4, 3, 16, 16), 0.03),
}
SPE_GRAD_BOUND = {torch.bfloat16: 0.03, torch.float16: 0.01}  # the SPE layers' own parameters


@pytest.mark.parametrize('dtype', AUTOCAST_DTYPES, ids=['bfloat16', 'float16'])
@pytest.mark.parametrize('kind', sorted(AUTOCAST_MODELS))
def test_training_under_autocast_gives_gradients_close_to_float32(kind, dtype):
    """GPU users train with --amp (bfloat16 or float16 autocast): forward and backward must run for every SPE
    model kind and give the float32 gradients up to the autocast dtype's rounding. CPU autocast takes the same
    device-independent route as CUDA's (the fused float32 paths step aside under any autocast)."""
    factory, shape, bound = AUTOCAST_MODELS[kind]
    torch.manual_seed(0)
    model = _perturb_spe(factory())
    x = torch.randn(shape)
    ref = _autocast_grads(model, x, None)
    grads = _autocast_grads(model, x, dtype)
    assert all(torch.isfinite(g).all() for g in grads.values())
    if dtype == torch.float16:
        bound /= 3
    assert _relative_error(_flat(grads), _flat(ref)) < bound
    is_spe = lambda name: name.rsplit('.', 1)[-1] in ('p', 'w_exc', 'b_exc', 'w_rew', 'b_rew')
    assert _relative_error(_flat(grads, is_spe), _flat(ref, is_spe)) < SPE_GRAD_BOUND[dtype]


@pytest.mark.parametrize('grad', [False, True], ids=['no_grad', 'grad'])
@pytest.mark.parametrize('dtype', AUTOCAST_DTYPES, ids=['bfloat16', 'float16'])
def test_inference_under_autocast_is_close_to_float32(dtype, grad):
    """Evaluation under --amp: the in-place inference tail (no_grad) writes a float32 gate product into the
    block's low-precision BN output; with grad enabled the tail is out of place. Both stay close to float32."""
    torch.manual_seed(0)
    model = _perturb_spe(timm.create_model('resnet83_spe', num_classes=10)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    with torch.set_grad_enabled(grad), torch.autocast('cpu', dtype=dtype):
        out = model(x)
    assert out.dtype == dtype
    assert _relative_error(out.float(), ref) < (0.01 if dtype == torch.bfloat16 else 0.002)


# ---------------------------------------------------------------------------------------------------------------
# Module hooks: the fused block tail may only run where nothing can observe the module calls it skips

TAIL_MODULES = ('se', 'bn3', 'act3')


def _hook_models(inplace_act: bool = True):
    """A small CIFAR SPE model (blocks with and without a projection shortcut) and the same weights run by timm's
    own Bottleneck.forward, the reference. inplace_act=False: full backward hooks, which in-place activations
    reject in timm's models too."""
    from timm.models.resnet import Bottleneck
    torch.manual_seed(0)
    model = _perturb_spe(timm_spe.CifarResNet(depth=20, attn_layer='spe'))
    assert sum(isinstance(m, timm_spe.resnet.SpeBottleneck) for m in model.modules()) == 6
    if not inplace_act:
        for m in model.modules():
            if isinstance(m, torch.nn.ReLU):
                m.inplace = False
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, timm_spe.resnet.SpeBottleneck):
            m.__class__ = Bottleneck
    return model, ref


def _tail_modules(model):
    """{'layer1.0.se': module, ...} for the tail modules of every bottleneck block."""
    return {name: m for name, m in model.named_modules() if name.rsplit('.', 1)[-1] in TAIL_MODULES}


def _clone(t):
    return t.detach().clone() if isinstance(t, torch.Tensor) else None


def _run_with_forward_hooks(model, x, kind, train):
    """Run ``model`` with ``kind`` hooks on every block's se, bn3 and act3; what each hook saw, cloned when it saw it."""
    from torch.nn.modules import module as nn_module
    seen, handles = {}, []
    targets = _tail_modules(model)
    names = {id(m): name for name, m in targets.items()}

    def pre_hook(m, args):
        if id(m) in names:
            seen.setdefault(names[id(m)], []).append(('in', _clone(args[0])))

    def hook(m, args, out):
        if id(m) in names:
            seen.setdefault(names[id(m)], []).append(('in', _clone(args[0])))
            seen[names[id(m)]].append(('out', _clone(out)))

    if kind == 'global_forward':
        handles.append(nn_module.register_module_forward_hook(hook))
    elif kind == 'global_forward_pre':
        handles.append(nn_module.register_module_forward_pre_hook(pre_hook))
    else:
        for m in targets.values():
            handles.append(m.register_forward_hook(hook) if kind == 'forward' else m.register_forward_pre_hook(pre_hook))
    try:
        model.train(train)
        with torch.set_grad_enabled(train):
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, seen


@pytest.mark.parametrize('train', [True, False], ids=['train', 'eval_no_grad'])
@pytest.mark.parametrize('kind', ['forward', 'forward_pre', 'global_forward', 'global_forward_pre'])
def test_forward_hooks_on_block_tail_fire_with_the_unfused_tensors(kind, train):
    """Hooks on a block's se, bn3 and act3 (module-level or global) fire once per call and see the tensors timm's
    own Bottleneck gives them: the fused tail steps aside whenever a hook could observe the calls it skips."""
    model, ref = _hook_models()
    x = torch.randn(4, 3, 32, 32)
    out, seen = _run_with_forward_hooks(model, x, kind, train)
    out_ref, seen_ref = _run_with_forward_hooks(ref, x, kind, train)
    assert len(seen) == 3 * 6 and seen.keys() == seen_ref.keys()
    for name in seen:
        assert [k for k, _ in seen[name]] == [k for k, _ in seen_ref[name]], name
        for (_, a), (_, b) in zip(seen[name], seen_ref[name]):
            torch.testing.assert_close(a, b, msg=name)
    torch.testing.assert_close(out, out_ref)


def test_global_hooks_see_the_module_calls_in_timms_order():
    """A global hook that records the order of module calls (a profiler, a graph tool) sees SpeBottleneck call its
    modules in the order of timm's Bottleneck, projection shortcut after the attention layer included."""
    from torch.nn.modules import module as nn_module
    model, ref = _hook_models()
    x = torch.randn(2, 3, 32, 32)
    orders = []
    for m in (model, ref):
        names = {id(mod): name for name, mod in m.named_modules()}
        order = []
        handle = nn_module.register_module_forward_pre_hook(
            lambda mod, args, order=order, names=names: order.append(names.get(id(mod))))
        try:
            m.train()(x)
        finally:
            handle.remove()
        orders.append(order)
    assert orders[0] == orders[1]


def _backward_hook_captures(model, x, kind):
    """Run forward and backward with ``kind`` backward hooks on the tail modules: the grad_input[0] and
    grad_output[0] each hook saw."""
    from torch.nn.modules import module as nn_module
    seen, handles = {}, []
    targets = _tail_modules(model)
    names = {id(m): name for name, m in targets.items()}

    def hook(m, grad_input, grad_output):
        if id(m) in names:
            seen[names[id(m)]] = (_clone(grad_input[0]), _clone(grad_output[0]))

    def pre_hook(m, grad_output):
        if id(m) in names:
            seen[names[id(m)]] = (None, _clone(grad_output[0]))

    if kind == 'global_backward':
        handles.append(nn_module.register_module_full_backward_hook(hook))
    elif kind == 'global_backward_pre':
        handles.append(nn_module.register_module_full_backward_pre_hook(pre_hook))
    else:
        for m in targets.values():
            handles.append(
                m.register_full_backward_hook(hook) if kind == 'backward' else m.register_full_backward_pre_hook(pre_hook))
    try:
        model.train()(x).square().mean().backward()
    finally:
        for h in handles:
            h.remove()
    return seen


def _reference_gradients(ref, x):
    """The gradients of every tail module's input and output in timm's own block, from tensor hooks (hooks
    registered before timm's in-place ``x += shortcut`` see the gradient of the value they were registered on)."""
    seen, handles = {}, []
    for name, m in _tail_modules(ref).items():
        def hook(mod, args, out, name=name):
            grads = seen.setdefault(name, [None, None])
            args[0].register_hook(lambda g: grads.__setitem__(0, g.clone()))
            out.register_hook(lambda g: grads.__setitem__(1, g.clone()))
        handles.append(m.register_forward_hook(hook))
    try:
        ref.train()(x).square().mean().backward()
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize('kind', ['backward', 'backward_pre', 'global_backward', 'global_backward_pre'])
def test_full_backward_hooks_on_block_tail_fire_with_the_unfused_gradients(kind):
    """Full backward (pre-)hooks on se, bn3 and act3, module-level and global, fire with the gradients of those
    modules' inputs and outputs in timm's own block (computed there with tensor hooks)."""
    model, ref = _hook_models(inplace_act=False)
    x = torch.randn(4, 3, 32, 32)
    seen = _backward_hook_captures(model, x, kind)
    seen_ref = _reference_gradients(ref, x)
    assert len(seen) == 3 * 6 and seen.keys() == seen_ref.keys()
    for name, (grad_in, grad_out) in seen.items():
        torch.testing.assert_close(grad_out, seen_ref[name][1], msg=name)
        if kind in ('backward', 'global_backward'):
            torch.testing.assert_close(grad_in, seen_ref[name][0], msg=name)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_tensor_captured_by_bn3_hook_in_inference_is_not_overwritten():
    """In inference (eval, no_grad) the fused tail writes the block output into bn3's output buffer: with a hook on
    bn3 that keeps the tensor (as feature extractors do), the tail must leave it alone."""
    model, ref = _hook_models()
    x = torch.randn(4, 3, 32, 32)
    kept, kept_ref = {}, {}
    model.layer2[1].bn3.register_forward_hook(lambda m, args, out: kept.__setitem__('out', out))
    ref.layer2[1].bn3.register_forward_hook(lambda m, args, out: kept_ref.__setitem__('out', out.clone()))
    with torch.no_grad():
        model.eval()(x)
        ref.eval()(x)
    assert kept_ref['out'].min() < 0  # a BN output, not yet through the ReLU
    torch.testing.assert_close(kept['out'], kept_ref['out'])


def test_forward_hook_replacing_the_attention_output_takes_effect():
    """A forward hook may return a replacement output (e.g. ablating the attention): the block must use it."""
    model, ref = _hook_models()
    x = torch.randn(2, 3, 32, 32)
    for m in (model, ref):
        m.layer2[1].se.register_forward_hook(lambda mod, args, out: torch.zeros_like(out))
    for train in (True, False):
        with torch.set_grad_enabled(train):
            torch.testing.assert_close(model.train(train)(x), ref.train(train)(x))


def _count_calls(monkeypatch, name):
    from timm_spe import resnet
    calls = []
    original = getattr(resnet, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(resnet, name, spy)
    return calls


@pytest.mark.parametrize('train', [True, False], ids=['train', 'eval_no_grad'])
def test_fused_tail_runs_in_every_block_without_hooks(monkeypatch, train):
    """The fallback for hooks must not cost the fused tail's speed where no hook exists: every block takes it,
    a hook on one block's se moves only that block to module calls, and removing the hook restores it."""
    calls = _count_calls(monkeypatch, 'batch_norm_spe_add_relu' if train else 'spe_add_relu_')
    model = timm.create_model('resnet83_spe').train(train)
    x = torch.randn(2, 3, 32, 32)
    with torch.set_grad_enabled(train):
        model(x)
        assert len(calls) == 27
        handle = model.layer2[4].se.register_forward_hook(lambda *args: None)
        model(x)
        assert len(calls) == 27 + 26
        handle.remove()
        model(x)
        assert len(calls) == 27 + 26 + 27


# ---------------------------------------------------------------------------------------------------------------
# Tracing, torch.func, torch.compile with the explicit penalty

def _small_cifar(**kwargs):
    torch.manual_seed(0)
    return _perturb_spe(timm_spe.CifarResNet(depth=20, attn_layer='spe', **kwargs))


def test_jit_trace_of_eval_model_passes_its_check_and_matches_eager():
    """torch.jit.trace (as for timm's baselines) records module calls: the traced graph must be the same on every
    invocation (trace's own check, on a second input too) and give eager's outputs on new inputs."""
    model = _small_cifar().eval()
    x, x2 = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)
    traced = torch.jit.trace(model, x, check_inputs=[(x,), (x2,)])
    torch.testing.assert_close(traced(x2), model(x2))
    with torch.no_grad():
        torch.testing.assert_close(traced(x2), model(x2))


def test_jit_trace_in_train_mode_passes_its_check_and_matches_eager():
    """As timm's baselines, an SPE model traces in training mode too (trace's check retraces under no_grad, so the
    recorded ops must not depend on grad mode); the traced model's outputs and gradients, Eq. 8 penalty included,
    equal eager's."""
    model = _small_cifar().train()
    eager = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    traced = torch.jit.trace(model, x)
    out, out_ref = traced(x), eager(x)
    torch.testing.assert_close(out, out_ref)
    out.square().mean().backward()
    out_ref.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_model_traced_under_no_grad_can_be_called_with_grad():
    """A model traced for inference (under no_grad) is a graph of ordinary ops: called with grad enabled it must
    give eager's output and input gradient (an in-place out= op in the trace would refuse autograd)."""
    model = _small_cifar().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = traced(x1)
    torch.testing.assert_close(out, model(x))
    out.square().sum().backward()
    model(x2).square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def _func_grad_and_eager(model, x):
    """Parameter gradients and updated buffers from torch.func.grad over functional_call (buffers passed in, as
    training-mode BN updates them) and from eager autograd on a copy."""
    eager = copy.deepcopy(model).train()
    model.train()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    def loss(p, b):
        return torch.func.functional_call(model, (p, b), (x,)).square().mean()

    grads = torch.func.grad(loss)(params, buffers)
    eager(x).square().mean().backward()
    return grads, buffers, {k: v.grad for k, v in eager.named_parameters()}, dict(eager.named_buffers())


@pytest.mark.parametrize('kind', ['cifar', 'cifar_paper_channels_last', 'spe_module'])
def test_torch_func_grad_of_training_model_matches_autograd(kind):
    """torch.func transforms need setup_context-style autograd functions: the fused block tail (CIFAR), the SPE
    layer on its own and the penalty's gradient must give autograd's gradients and running statistics."""
    x = torch.randn(4, 3, 32, 32)
    if kind == 'spe_module':
        torch.manual_seed(0)
        model = _perturb_spe(_conv_spe_head())
    elif kind == 'cifar':
        model = _small_cifar()
    else:
        model = _small_cifar(attn_kwargs=dict(formulation='paper')).to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    grads, buffers, grads_ref, buffers_ref = _func_grad_and_eager(model, x)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], msg=name)
    for name in buffers:
        torch.testing.assert_close(buffers[name], buffers_ref[name], msg=name)


def test_torch_func_grad_through_pooling_and_tail_functions():
    """The lean max/min pooling and the block tail (the paths taken under autocast or with a BN subclass) under
    torch.func.grad."""
    from timm_spe.spe_me import global_max_min, scale_add_relu
    torch.manual_seed(0)
    x, s, g = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5), torch.rand(2, 3, 1, 1)
    fns = {
        'global_max_min': (lambda x: sum(t.square().sum() for t in global_max_min(x)), (x,)),
        'scale_add_relu': (lambda x, s, g: scale_add_relu(x, s, g).square().sum(), (x, s, g)),
    }
    for name, (fn, args) in fns.items():
        argnums = tuple(range(len(args)))
        got = torch.func.grad(fn, argnums=argnums)(*args)
        leaves = [a.clone().requires_grad_() for a in args]
        want = torch.autograd.grad(fn(*leaves), leaves)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# Constructor contract

@pytest.mark.parametrize('act_layer', ['gelu', 'relu'])
def test_cifar_models_take_activation_names_as_timm_resnet_does(act_layer):
    """timm's ResNet resolves act_layer / norm_layer names; the CIFAR models take them the same way. 'relu' keeps
    the fused SPE block (the name and nn.ReLU build the same model)."""
    from timm.layers import get_act_layer
    torch.manual_seed(0)
    model = timm.create_model('resnet83_spe', act_layer=act_layer, norm_layer='batchnorm2d')
    torch.manual_seed(0)
    by_class = timm.create_model('resnet83_spe', act_layer=get_act_layer(act_layer))
    block = model.layer2[3]
    assert type(block.act3) is get_act_layer(act_layer) and type(block.bn3) is torch.nn.BatchNorm2d
    assert type(block) is type(by_class.layer2[3])
    assert isinstance(block, timm_spe.resnet.SpeBottleneck) == (act_layer == 'relu')
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), by_class.eval()(x))


@pytest.mark.parametrize('args,kwargs,error,match', [
    ((2.5,), {}, TypeError, r'channels must be a positive int, got 2\.5 \(float\)'),
    (('8',), {}, TypeError, r"channels must be a positive int, got '8' \(str\)"),
    ((True,), {}, TypeError, r'channels must be a positive int, got True \(bool\)'),
    ((8,), dict(eta=float('nan')), ValueError, r'eta \(penalty coefficient\) must be a finite number >= 0, got nan'),
    ((8,), dict(eta=float('inf')), ValueError, r'eta \(penalty coefficient\) must be a finite number >= 0, got inf'),
    ((8,), dict(eta='0.1'), TypeError, r"eta \(penalty coefficient\) must be a finite number >= 0, got '0\.1' \(str\)"),
], ids=['channels_float', 'channels_str', 'channels_bool', 'eta_nan', 'eta_inf', 'eta_str'])
def test_bad_spe_arguments_raise_one_line_errors_naming_the_argument(args, kwargs, error, match):
    """A float, string or bool channel count and a NaN, infinite or string eta fail at construction with one line
    naming the argument and what it accepts (a NaN eta would silently make every gradient of p NaN)."""
    with pytest.raises(error, match=match) as info:
        SpeModule(*args, **kwargs)
    assert '\n' not in str(info.value)


def test_set_auto_penalty_rejects_a_nan_eta_before_changing_any_layer():
    """A bad eta leaves every layer as it was (no half-applied switch)."""
    model = torch.nn.Sequential(SpeModule(4), SpeModule(4))
    with pytest.raises(ValueError, match='finite number >= 0'):
        timm_spe.set_auto_penalty(model, False, eta=float('nan'))
    assert all(m.auto_penalty and m.eta == 0.1 for m in model)


def test_integer_like_channel_counts_are_accepted():
    """numpy integers (e.g. from a config computed with numpy) are ints."""
    import numpy as np
    m = SpeModule(np.int64(6))
    assert m.channels == 6 and type(m.channels) is int and m.w_exc.shape == (6,)
