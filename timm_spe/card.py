""" Model cards for the Hub: complexity, the paper's reference numbers, and rendering the template

Every number on a card comes from somewhere checkable: accuracy from the JSON ``timm-spe eval``
wrote (never typed in), params / GMACs counted on the model, the sha256 of the staged weights, the
recipe and budget from the arguments or the train.py checkpoint. The paper's number is shown
separately and labelled as the paper's.
"""

import os
import shlex
import string
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import timm
import torch
from huggingface_hub import EvalResult, ModelCardData
from torch.utils.flop_counter import FlopCounterMode

from .registry import default_hub_repo_id

__all__ = [
    'PAPER_TOP1', 'DEFAULT_TEMPLATE', 'model_complexity', 'paper_top1', 'render_card', 'registered_cfg',
    'dataset_of_tag', 'dataset_title', 'describe_model', 'card_data', 'portable_path', 'portable_command',
    'portable_eval_result', 'PROJECT_URL', 'gap_to_paper', 'TRAIN_SUMMARY_NAME', 'TRAIN_ARGS_NAME',
]

# The card template is package data (timm_spe/templates/hub_card.md): works from a wheel, not only a clone.
DEFAULT_TEMPLATE = resources.files('timm_spe') / 'templates' / 'hub_card.md'
PROJECT_URL = 'https://pypi.org/project/timm-spe/'
# the run's records that finish-run stages next to the weights (the names train.py gives them)
TRAIN_SUMMARY_NAME = 'summary.csv'
TRAIN_ARGS_NAME = 'args.yaml'
_PATH_KEYS = ('data', 'checkpoint', 'out')

# Top-1 (%) from the paper's Tables 1 and 2 (ResNet backbones, 164-epoch schedule, original CIFAR).
PAPER_TOP1: Dict[Tuple[str, str], float] = {
    ('resnet83', 'cifar10'): 93.62, ('resnet83_spe', 'cifar10'): 94.03,
    ('resnet83', 'cifar100'): 73.55, ('resnet83_spe', 'cifar100'): 73.87,
    ('resnet164', 'cifar10'): 93.39, ('resnet164_spe', 'cifar10'): 94.80,
    ('resnet164', 'cifar100'): 74.30, ('resnet164_spe', 'cifar100'): 76.31,
    ('resnet245', 'cifar10'): 94.16, ('resnet245_spe', 'cifar10'): 95.08,
    ('resnet245', 'cifar100'): 73.88, ('resnet245_spe', 'cifar100'): 76.75,
    ('resnet326', 'cifar10'): 93.45, ('resnet326_spe', 'cifar10'): 95.13,
    ('resnet326', 'cifar100'): 72.08, ('resnet326_spe', 'cifar100'): 77.54,
    ('resnet164_se', 'cifar10'): 94.24, ('resnet164_se', 'cifar100'): 75.23,
    ('resnet164_cbam', 'cifar10'): 93.88, ('resnet164_cbam', 'cifar100'): 74.68,
    ('resnet164_eca', 'cifar10'): 94.47, ('resnet164_eca', 'cifar100'): 75.81,
}


def registered_cfg(model_tag: str):
    """timm's pretrained cfg of ``<model>.<tag>`` (with or without weights), or None if that tag is not registered."""
    name, tag = timm.models.split_model_name_tag(model_tag)
    if not tag or not timm.is_model(name):
        return None
    return timm.models.get_arch_pretrained_cfgs(name).get(model_tag)


def portable_path(path: Any) -> Any:
    """A path as it may appear in a published file: relative to the working directory if under it, else
    ``.../<parent>/<name>`` (never the absolute path of the machine it ran on)."""
    if not isinstance(path, str) or not os.path.isabs(path):
        return path
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return '.../' + '/'.join(p.parts[-2:])


def portable_command(command: str) -> str:
    """A recorded command with absolute paths made portable, shlex-quoted so it can be pasted into a shell."""
    out = []
    for arg in shlex.split(command):
        flag, eq, value = arg.partition('=')
        if eq and flag.startswith('--'):
            out.append(f'{flag}={portable_path(value)}')
        else:
            out.append(portable_path(arg))
    return shlex.join(out)


def portable_eval_result(result: Dict[str, Any]) -> Dict[str, Any]:
    """The eval JSON as it is staged: same numbers, no absolute paths."""
    result = dict(result)
    for key in _PATH_KEYS:
        if key in result:
            result[key] = portable_path(result[key])
    if result.get('command'):
        result['command'] = portable_command(result['command'])
    return result


def card_data(model_name: str, tag: str, eval_result: Optional[Dict[str, Any]] = None) -> ModelCardData:
    """The card's YAML: timm library, image-classification pipeline, and a ``model-index`` from the eval JSON."""
    dataset = dataset_of_tag(tag)
    results = None
    if eval_result:
        label = eval_result.get('data_label') or dataset_title(dataset)
        common = dict(task_type='image-classification', task_name='Image Classification', dataset_type=dataset,
                      dataset_name=label, dataset_split='test' if 'test' in label.lower() else None)
        results = [EvalResult(metric_type='accuracy', metric_name='Top-1 accuracy (%)',
                              metric_value=round(float(eval_result['top1']), 2), **common),
                   EvalResult(metric_type='top_5_accuracy', metric_name='Top-5 accuracy (%)',
                              metric_value=round(float(eval_result['top5']), 2), **common)]
    return ModelCardData(
        library_name='timm', license='apache-2.0', pipeline_tag='image-classification',
        tags=['image-classification', 'timm', 'timm-spe', 'spe-attention'], datasets=[dataset], metrics=['accuracy'],
        model_name=f'{model_name}.{tag}', eval_results=results)


def dataset_of_tag(tag: str) -> str:
    """'cifar10_e30' -> 'cifar10'."""
    return tag.split('_')[0]


def dataset_title(dataset: str) -> str:
    """'cifar10' -> 'CIFAR-10'."""
    return {'cifar10': 'CIFAR-10', 'cifar100': 'CIFAR-100'}.get(dataset, dataset.upper())


_ATTN_TITLES = {
    'spe': 'SPE (Self-adaptive Pooling Enhanced) attention',
    'se': 'SE (squeeze-and-excitation) attention',
    'eca': 'ECA (efficient channel attention)',
    'cbam': 'CBAM attention',
}


def describe_model(model_name: str) -> str:
    """One line naming the architecture: 'A CIFAR bottleneck ResNet-164 with SPE ... attention'."""
    depth, _, attn = model_name[len('resnet'):].partition('_')
    what = f'A CIFAR bottleneck ResNet-{depth}' if depth.isdigit() else f'A {model_name}'
    if attn:
        return f'{what} with {_ATTN_TITLES.get(attn, attn.upper() + " attention")} in every block'
    return f'{what} without attention (the paper\'s baseline)'


def paper_top1(model_name: str, tag: str) -> Optional[float]:
    return PAPER_TOP1.get((model_name, dataset_of_tag(tag)))


def gap_to_paper(eval_result: Dict[str, Any], paper: float) -> str:
    """One sentence: how far the measured top-1 is from the paper's, after how many epochs (the reader's first
    question about budget weights, so the card answers it from the numbers instead of leaving the sum to them)."""
    diff = eval_result['top1'] - paper
    how = (f'{-diff:.2f} points below it' if diff < 0 else
           f'{diff:.2f} points above it' if diff > 0 else 'equal to it')
    epochs = eval_result.get('epoch')
    after = f', after {epochs} training epochs against the paper\'s 164' if isinstance(epochs, int) else ''
    return f"These weights measure {eval_result['top1']:.2f}%: {how}{after}."


def best_epoch_line(best: Tuple[int, float], epochs: Optional[int]) -> str:
    """The paper's own protocol, next to ours: the authors' ``run.py`` prints ``best_acc``, the maximum test top-1
    over all epochs (the earliest epoch of a tie is the one it saved as ``model_best``).
    Readers comparing with the paper need that figure from this run too, labelled for what it is (chosen on the
    test split), while the weights and every result above stay the final epoch's."""
    epoch, top1 = best
    return (f"The authors' code (github.com/Qrange-group/SPEM, `run.py`) reports `best_acc`, the best test top-1 "
            f"over all epochs; by that protocol this run "
            f"reaches **{top1:.2f}%**, at epoch {epoch}{f' of {epochs}' if epochs else ''} (train.py's per-epoch "
            f"eval, `summary.csv`): "
            f"selected on the test split, the paper's protocol, so an optimistic estimate of accuracy on unseen "
            f"images. These weights and the results above are the final epoch's; nothing else here is selected on "
            f"the test split.")


def model_complexity(model_name: str, num_classes: int = 10, img_size: int = 32) -> Dict[str, float]:
    """Parameters and GMACs (batch 1; conv/matmul MACs from torch's FlopCounterMode, FLOPs / 2).

    On real CPU tensors, not the meta device: meta kernels and initialisers run as Python decompositions, ~3x slower
    than building the model and one image of forward (the docs' models table counts every CIFAR model with this)."""
    with torch.random.fork_rng(devices=[]):  # the random init leaves the caller's RNG as it was
        model = timm.create_model(model_name, num_classes=num_classes).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, img_size, img_size))
    return {'params': sum(p.numel() for p in model.parameters()), 'gmacs': counter.get_total_flops() / 2e9}


def _results_section(eval_result: Optional[Dict[str, Any]], weights_sha256: str) -> str:
    if not eval_result:
        return 'Not evaluated: no `timm-spe eval` result was given (`timm-spe publish ... --eval-json FILE`).'
    subset = ''
    if eval_result['num_images'] != eval_result.get('num_images_in_split', eval_result['num_images']):
        subset = f" (a class-balanced subset of {eval_result['num_images_in_split']})"
    loss = f"{eval_result['loss']:.4f}" if eval_result.get('loss') is not None else 'n/a'
    same = eval_result.get('weights_sha256') == weights_sha256
    return '\n'.join([
        '| data | images | top-1 (%) | top-5 (%) | loss |',
        '|---|---:|---:|---:|---:|',
        f"| {eval_result.get('data_label') or eval_result['data']} | {eval_result['num_images']}{subset} "
        f"| {eval_result['top1']:.2f} | {eval_result['top5']:.2f} | {loss} |",
        '',
        f"Measured {eval_result.get('date', '(date not recorded)')} with "
        f"`{portable_command(eval_result['command']) if eval_result.get('command') else 'timm-spe eval'}`"
        + (' on exactly these weights (same sha256).' if same else '.'),
    ])


def _training_files_line(names: Optional[List[str]]) -> str:
    """The card's pointer to the run's own records staged next to it (``finish-run``: summary.csv, args.yaml)."""
    if not names:
        return ''
    what = {TRAIN_SUMMARY_NAME: "train.py's per-epoch train loss and test top-1/top-5/loss",
            TRAIN_ARGS_NAME: "train.py's full arguments as of its last start: a resumed run's `resume`, `seed` and "
                             "`device` are that start's"}
    return '- **Run records in this folder:** ' + '; '.join(
        f'`{n}` ({what[n]})' if n in what else f'`{n}`' for n in names)


def render_card(
        model_name: str,
        tag: str,
        weights_sha256: str,
        eval_result: Optional[Dict[str, Any]] = None,
        recipe: str = '',
        budget: str = '',
        figures: Optional[List[Tuple[str, str]]] = None,
        num_classes: int = 10,
        template: Union[str, Path, None] = None,
        repo_id: Optional[str] = None,
        training_files: Optional[List[str]] = None,
        best_epoch: Optional[Tuple[int, float]] = None,
) -> str:
    """Fill the card template (``$name`` placeholders; default: the package's ``templates/hub_card.md``).

    ``best_epoch``: ``(epoch, top-1)`` of the run's best epoch on the test split among the epochs of the staged
    weights (``eval_result['epoch']``; ``finish-run`` gives it when train.py evaluated on the test split): the
    paper's protocol, labelled as such."""
    template = DEFAULT_TEMPLATE if template is None else Path(template)
    if not template.is_file():
        raise FileNotFoundError(f"card template '{template}' not found (omit --template for the package's own).")
    c = model_complexity(model_name, num_classes)
    dataset = dataset_of_tag(tag)
    paper = paper_top1(model_name, tag)
    paper_line = (
        f'The paper reports **{paper:.2f}%** top-1 for this architecture on {dataset_title(dataset)} (Tables 1-2, the '
        f'authors\' 164-epoch schedule on the original CIFAR binaries). That is the paper\'s number, not a '
        f'measurement of these weights.' if paper is not None else 'The paper reports no number for this model.')
    if paper is not None and eval_result and eval_result.get('top1') is not None:
        paper_line += ' ' + gap_to_paper(eval_result, paper)
    if best_epoch is not None:
        paper_line += ' ' + best_epoch_line(best_epoch, (eval_result or {}).get('epoch'))
    figs = '\n\n'.join(f'![{caption}]({name})\n\n*{caption}*' for name, caption in (figures or [])) or '(none)'
    values = {
        'model_name': model_name,
        'tag': tag,
        'card_data': card_data(model_name, tag, eval_result).to_yaml(),
        'project_url': PROJECT_URL,
        'repo_id': repo_id or default_hub_repo_id(f'{model_name}.{tag}'),
        'dataset': dataset,
        'dataset_upper': dataset_title(dataset),
        'description': describe_model(model_name),
        'num_classes': num_classes,
        'params_m': f"{c['params'] / 1e6:.3f}",
        'gmacs': f"{c['gmacs']:.3f}",
        'results': _results_section(eval_result, weights_sha256),
        'paper_line': paper_line,
        'recipe': recipe or '(not given)',
        'budget': budget or '(not given)',
        'sha256': weights_sha256,
        'figures': figs,
        'training_files': _training_files_line(training_files),
    }
    return string.Template(template.read_text()).substitute(values)
