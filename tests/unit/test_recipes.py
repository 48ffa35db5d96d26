"""train_recipes/: every recipe parses, names a registered model, and uses only train.py's arguments.

CI has no train.py (it lives in the pytorch-image-models repository, not on PyPI), so the argument
names are kept as data in tests/data/train_args.txt, generated from train.py of the pinned timm by
train_recipes/list_train_args.py. (The recipes were run with the real train.py: see README.)
"""
import subprocess
import sys

import pytest
import timm
import torch
import yaml
from helpers import ROOT
from timm.data import create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms

import timm_spe

RECIPES = sorted((ROOT / 'train_recipes').glob('*.yaml'))
TRAIN_ARGS = {
    line.strip() for line in (ROOT / 'tests' / 'data' / 'train_args.txt').read_text().splitlines()
    if line.strip() and not line.startswith('#')}
sys.path.insert(0, str(ROOT / 'train_recipes'))
import list_train_args  # noqa: E402
import make_recipes  # noqa: E402


def _load(path):
    return yaml.safe_load(path.read_text())


def test_recipe_set_is_complete():
    """A paper recipe per dataset for SPE and the plain model at every depth of the model list (Table 2), and for
    every other attention kind at ResNet-164 (Table 1): read from timm_spe/resnet.py, so a new depth or attention
    kind fails here until make_recipes.py has written its recipes."""
    names = {p.name for p in RECIPES}
    models = [f'resnet{depth}{suffix}' for depth in timm_spe.CIFAR_DEPTHS for suffix in ('', '_spe')]
    models += [f'resnet164_{attn}' for attn in timm_spe.resnet.CIFAR_ATTN_LAYERS if attn not in ('', 'spe')]
    for model in models:
        for dataset in ('cifar10', 'cifar100'):
            assert f'{model}-{dataset}.yaml' in names
    assert 'resnet164_spe-cifar10_cpu2h.yaml' in names


def test_recipes_are_generated():
    subprocess.run([sys.executable, str(ROOT / 'train_recipes' / 'make_recipes.py'), '--check'], check=True)


@pytest.mark.parametrize('path', RECIPES, ids=lambda p: p.name)
def test_recipe_keys_and_model(path):
    cfg = _load(path)
    unknown = sorted(set(cfg) - TRAIN_ARGS)
    assert not unknown, f'{path.name}: keys train.py would silently ignore: {unknown}'
    assert cfg['device_modules'] == ['timm_spe']
    assert timm.is_model(cfg['model']), cfg['model']
    assert cfg['num_classes'] == (100 if 'cifar100' in path.name else 10)


PAPER_RECIPES = [p for p in RECIPES if 'cpu' not in p.name and make_recipes.BUDGET_TAG not in p.name
                 and make_recipes.PAPER_RUN_TAG not in p.name]
BUDGET_RECIPES = [p for p in RECIPES if make_recipes.BUDGET_TAG in p.name]
PAPER_RUN_RECIPES = [p for p in RECIPES if make_recipes.PAPER_RUN_TAG in p.name]


@pytest.mark.parametrize('path', PAPER_RECIPES, ids=lambda p: p.name)
def test_paper_schedule(path):
    cfg = _load(path)
    assert (cfg['opt'], cfg['momentum'], cfg['lr'], cfg['weight_decay']) == ('momentum', 0.9, 0.1, 1e-4)
    assert cfg['opt_kwargs'] == {'filter_bias_and_bn': False}
    assert (cfg['batch_size'], cfg['epochs'], cfg['sched'], cfg['decay_rate']) == (128, 164, 'multistep', 0.1)
    assert cfg['warmup_epochs'] == 0 and cfg['cooldown_epochs'] == 0
    assert cfg['dataset'] in ('torch/cifar10', 'torch/cifar100') and cfg['dataset_download'] is True
    _check_shared_settings(cfg)


def _check_shared_settings(cfg):
    assert cfg['smoothing'] == 0 and cfg['mixup'] == 0 and cfg['cutmix'] == 0 and cfg['reprob'] == 0
    assert cfg['color_jitter'] is None and cfg['aa'] is None and cfg['hflip'] == 0.5
    assert cfg['train_crop_mode'] == 'pad4' and cfg['crop_pct'] == 1.0 and cfg['input_size'] == [3, 32, 32]
    assert tuple(cfg['mean']) == timm_spe.CIFAR_MEAN and tuple(cfg['std']) == timm_spe.CIFAR_STD
    assert cfg['amp'] is False and cfg['grad_accum_steps'] == 1  # the penalty hook is exact here


def test_cpu_budget_recipe():
    cfg = _load(ROOT / 'train_recipes' / 'resnet164_spe-cifar10_cpu2h.yaml')
    assert cfg['model'] == 'resnet164_spe' and cfg['device'] == 'cpu' and cfg['epochs'] == 3
    assert cfg['opt_kwargs'] == {'filter_bias_and_bn': False} and cfg['weight_decay'] == 1e-4
    _check_shared_settings(cfg)


def test_budget_recipe_pair_differs_in_the_model_line_only():
    """resnet164 vs resnet164_spe at the cifar10_e30 budget: the control run must be the identical recipe."""
    assert [p.name for p in BUDGET_RECIPES] == ['resnet164-cifar10_e30.yaml', 'resnet164_spe-cifar10_e30.yaml']
    plain, spe = (p.read_text().splitlines() for p in BUDGET_RECIPES)
    assert len(plain) == len(spe)
    differing = [(a, b) for a, b in zip(plain, spe) if a != b]
    assert differing == [('model: resnet164', 'model: resnet164_spe')]


def test_budget_recipe_keeps_the_paper_method():
    """What the weights issue fixes: SPE penalty exact (fp32, no grad accumulation), momentum SGD at lr 0.1,
    batch 128, pad-4 crop + flip; only schedule (30-epoch warm-up + cosine) and weight decay differ."""
    cfg = _load(ROOT / 'train_recipes' / 'resnet164_spe-cifar10_e30.yaml')
    assert (cfg['opt'], cfg['momentum'], cfg['lr'], cfg['batch_size']) == ('momentum', 0.9, 0.1, 128)
    assert (cfg['epochs'], cfg['sched'], cfg['warmup_epochs'], cfg['min_lr']) == (30, 'cosine', 2, 0.0)
    assert cfg['weight_decay'] == 5e-4 and cfg['opt_kwargs'] == {'filter_bias_and_bn': False}
    assert cfg['output'] == 'train_runs' and 'experiment' not in cfg  # run.sh names the run after the file
    assert cfg['checkpoint_hist'] == 1 and cfg['recovery_interval'] == 0  # resume state: last.pth.tar only
    assert cfg['data_dir'] == 'data/cifar10-jpeg' and cfg['val_split'] == 'test'
    _check_shared_settings(cfg)


@pytest.mark.parametrize('path', PAPER_RUN_RECIPES, ids=lambda p: p.name)
def test_the_164_epoch_run_trains_exactly_as_the_paper_recipe_only_data_and_machine_differ(path):
    """The cifar10_e164 weights are the paper's schedule: against train_recipes/<model>-cifar10.yaml only where
    the data lives and how this machine runs it may differ (the weights issue allows the data source alone to
    differ in what trains the model)."""
    model = path.name.split('-')[0]
    run, paper = _load(path), _load(ROOT / 'train_recipes' / f'{model}-cifar10.yaml')
    changed = {k for k in set(run) | set(paper) if run.get(k, '<absent>') != paper.get(k, '<absent>')}
    assert changed == {'dataset', 'dataset_download', 'data_dir', 'device', 'workers', 'pin_mem',
                       'checkpoint_hist', 'recovery_interval', 'output', 'experiment'}
    assert (run['dataset'], run['data_dir'], run['val_split']) == ('', 'data/cifar10-jpeg', 'test')
    assert run['output'] == 'train_runs' and 'experiment' not in run  # run.sh names the run after the file
    assert run['checkpoint_hist'] == 1 and run['recovery_interval'] == 0  # resume state: last.pth.tar only
    assert [p.name for p in PAPER_RUN_RECIPES] == ['resnet164-cifar10_e164.yaml', 'resnet164_spe-cifar10_e164.yaml']


def test_the_164_epoch_plain_control_differs_from_the_spe_run_in_the_model_and_its_names_only():
    """resnet164 vs resnet164_spe at the paper's schedule: the plain control trains the identical recipe; only the
    model line and the header lines naming the recipe files differ."""
    plain, spe = (p.read_text().splitlines() for p in PAPER_RUN_RECIPES)
    assert len(plain) == len(spe)
    differing = [(a, b) for a, b in zip(plain, spe) if a != b]
    assert differing[-1] == ('model: resnet164', 'model: resnet164_spe')
    assert [a for a, _ in differing[:-1]] == [b.replace('resnet164_spe-', 'resnet164-') for _, b in differing[:-1]]
    assert all(a.startswith('#') for a, _ in differing[:-1]) and len(differing) == 3


def test_milestones_match_authors_drops():
    """timm's MultiStepLRScheduler applies milestone m from 0-based epoch m - 1 on: [82, 123] drops
    the lr before 0-based epochs 81 and 122, as the authors' `--schedule 81 122` does."""
    from timm.scheduler import MultiStepLRScheduler
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = MultiStepLRScheduler(opt, decay_t=[82, 123], decay_rate=0.1)
    lrs = []
    for epoch in range(164):
        sched.step(epoch)
        lrs.append(opt.param_groups[0]['lr'])
    authors = [0.1 * 0.1 ** sum(epoch >= m for m in (81, 122)) for epoch in range(164)]
    assert lrs == pytest.approx(authors)


def test_pad4_crop_mode():
    tf = create_transform((3, 32, 32), is_training=True, train_crop_mode='pad4', hflip=0.5, color_jitter=None,
                          mean=timm_spe.CIFAR_MEAN, std=timm_spe.CIFAR_STD)
    crop = tf.transforms[0]
    assert isinstance(crop, transforms.RandomCrop) and crop.padding == 4 and crop.size == (32, 32)
    assert isinstance(tf.transforms[1], transforms.RandomHorizontalFlip)
    # with the prefetcher (train.py's default) only the conversion differs
    tf_pf = create_transform((3, 32, 32), is_training=True, train_crop_mode='pad4', use_prefetcher=True)
    assert isinstance(tf_pf.transforms[0], transforms.RandomCrop)
    # other modes are timm's own, untouched
    rrc = create_transform((3, 32, 32), is_training=True, scale=(0.765625, 1.), ratio=(1., 1.))
    assert isinstance(rrc.transforms[0], RandomResizedCropAndInterpolation)
    with pytest.raises(AssertionError):
        create_transform((3, 32, 32), is_training=True, train_crop_mode='bogus')


def test_pad4_is_a_true_pad_and_crop():
    from PIL import Image
    tf = create_transform((3, 32, 32), is_training=True, train_crop_mode='pad4', hflip=0., color_jitter=None,
                          mean=(0., 0., 0.), std=(1., 1., 1.))
    img = Image.new('RGB', (32, 32), (255, 255, 255))
    torch.manual_seed(0)
    outs = [tf(img) for _ in range(20)]
    for out in outs:
        assert out.shape == (3, 32, 32)
        assert set(out.unique().tolist()) <= {0., 1.}  # no resampling: only image pixels and zero padding
    assert any((o == 0).any() for o in outs)


def test_pad4_hook_fails_loudly_if_timm_changes(monkeypatch):
    """If a timm upgrade stops building its pipeline with RandomResizedCropAndInterpolation first,
    the pad4 mode must raise instead of silently training with another crop."""
    from timm_spe import transforms as spe_transforms
    original = spe_transforms.timm_transforms_factory.transforms_imagenet_train._timm_spe_original

    def changed(*args, **kwargs):
        out = original(*args, **kwargs)
        out.transforms.insert(0, transforms.Lambda(lambda x: x))
        return out

    monkeypatch.setattr(spe_transforms.timm_transforms_factory, 'transforms_imagenet_train',
                        spe_transforms._wrap(changed))
    with pytest.raises(RuntimeError, match='timm version changed'):
        create_transform((3, 32, 32), is_training=True, train_crop_mode='pad4')


def test_train_loader_uses_hook():
    """create_loader -> create_transform -> our hook: the path train.py takes."""
    from PIL import Image
    from timm.data import create_loader

    class Images(torch.utils.data.Dataset):
        transform = None

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return self.transform(Image.new('RGB', (32, 32))), 0

    ds = Images()
    loader = create_loader(ds, (3, 32, 32), batch_size=2, is_training=True, train_crop_mode='pad4',
                           use_prefetcher=False, num_workers=0, persistent_workers=False, device=torch.device('cpu'))
    assert isinstance(ds.transform.transforms[0], transforms.RandomCrop)
    x, _ = next(iter(loader))
    assert x.shape == (2, 3, 32, 32)


def test_list_train_args_parser():
    src = '''
p.add_argument('--foo-bar', type=int)
g.add_argument('-x', '--lr-base', dest='lr_base_custom')
g.add_argument('data', nargs='?')
config_parser.add_argument('-c', '--config')
'''
    assert list_train_args.train_args(src) == ['config', 'data', 'foo_bar', 'lr_base_custom']
