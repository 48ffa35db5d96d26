"""An SPE model in data-parallel training (torch.distributed, gloo, 2 processes on the CPU): DDP's gradients are those of
one process on the global batch, the Eq. 8 penalty counted once; a model converted to SyncBatchNorm (timm train.py's
``--sync-bn``) trains through the module path, never the fused BatchNorm tail, with the same gradients."""
import copy

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from timm_spe import SpeModule, spe_me, spe_penalty

WORLD = 2
PER_RANK = 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model('resnet83_spe', depth=11, num_classes=10)  # 3 bottleneck blocks, each with SPE


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * PER_RANK, 3, 32, 32, generator=g), torch.randint(0, 10, (WORLD * PER_RANK,), generator=g)


def _shards():
    return [slice(r * PER_RANK, (r + 1) * PER_RANK) for r in range(WORLD)]


def _ddp_grads(rank: int, init_file: str, out: str) -> None:
    """One rank: DDP over the model, its shard of the batch, the loss as train.py computes it (no penalty term)."""
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=WORLD)
    try:
        model = DistributedDataParallel(_model())
        x, y = _batch()
        shard = _shards()[rank]
        F.cross_entropy(model(x[shard]), y[shard]).backward()
        save_file({n: p.grad for n, p in model.module.named_parameters()}, f'{out}/rank{rank}.safetensors')
    finally:
        dist.destroy_process_group()


def _one_process_grads(penalty: str) -> dict:
    """Gradients of the global batch's mean loss in one process. Without SyncBatchNorm each DDP rank normalises its own
    shard, so the reference runs each shard through the model on its own. ``penalty``: 'once' (the explicit Eq. 8
    term), 'per forward' (the automatic penalty of each of the two forwards: a rank's count, summed)."""
    model = _model()
    x, y = _batch()
    loss = sum(F.cross_entropy(model(x[s]), y[s]) for s in _shards()) / WORLD
    if penalty == 'once':
        loss = loss + spe_penalty(model)  # switches the automatic penalty off: counted exactly once
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_ddp_gradients_are_the_global_batch_gradients_with_the_penalty_counted_once(tmp_path):
    mp.start_processes(_ddp_grads, args=(str(tmp_path / 'init'), str(tmp_path)), nprocs=WORLD, start_method='spawn')
    rank0, rank1 = (load_file(str(tmp_path / f'rank{r}.safetensors')) for r in range(WORLD))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # the all-reduced mean on both ranks

    once = _one_process_grads('once')
    assert rank0.keys() == once.keys()
    for k in rank0:
        torch.testing.assert_close(rank0[k], once[k], msg=k)
    # a positive control: the Eq. 8 gradient counted per forward (as in a sum over ranks) is told apart
    twice = _one_process_grads('per forward')
    p_keys = [k for k in rank0 if k.endswith('.se.p')]
    assert len(p_keys) == 3
    for k in p_keys:
        assert not torch.allclose(rank0[k], twice[k], rtol=1e-3, atol=1e-5), k


@pytest.fixture()
def fused_calls(monkeypatch):
    """The calls to the fused BatchNorm + SPE + add + ReLU tail, counted."""
    calls = []
    fused = spe_me.fused_batch_norm_spe_add_relu

    def counting(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)
    monkeypatch.setattr(spe_me, 'fused_batch_norm_spe_add_relu', counting)
    return calls


def test_a_model_converted_to_sync_batchnorm_takes_the_module_path_with_the_same_gradients(fused_calls):
    model = _model()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_bn and sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == n_bn
    x, y = _batch()

    F.cross_entropy(model(x), y).backward()
    assert len(fused_calls) == sum(isinstance(m, SpeModule) for m in model.modules()) == 3  # the fused tail ran
    fused_calls.clear()
    F.cross_entropy(synced(x), y).backward()  # one process: SyncBatchNorm normalises as BatchNorm2d does
    assert not fused_calls  # bn3 called as a module: SyncBatchNorm's forward (and its statistics sync) runs

    grads = dict(synced.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, msg=name)
    buffers = dict(synced.named_buffers())
    for name, b in model.named_buffers():
        torch.testing.assert_close(buffers[name], b, msg=name)

