"""SPE models used the ways timm models are used: mixed precision, module hooks, tracing, torch.func, torch.compile
with an explicit penalty, and timm's constructor conventions."""
import copy

import pytest
import torch
import torch.nn.functional as F

import timm
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
    return float((a.double() - b.double()).norm() / b.double().norm())


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
