""" Does SPE help? The SPE model next to its plain control, both trained with the same recipe

:func:`comparison_table` reads two staged Hub folders (``hub_cards/<model>.<tag>/``, written by ``timm-spe
finish-run``) and returns a markdown table: top-1 / top-5 / loss of each ``eval.json`` (never typed in), the final
epoch, params and GMACs counted on the model, the train-step time ratio of the committed CPU benchmark
(``benchmarks/results/results.json``), and the paper's Table 1 figures in rows labelled as the paper's. Under the table:
the top-1 difference and whether it exceeds the published seed-to-seed spread of CIFAR-10 top-1
(:data:`SEED_STD_TOP1`); a difference inside it is never called a gain or a loss.

    timm-spe compare hub_cards/resnet164_spe.cifar10_e30 hub_cards/resnet164.cifar10_e30            # print it
    timm-spe compare hub_cards/resnet164_spe.cifar10_e30 hub_cards/resnet164.cifar10_e30 --write    # + docs, cards

``--write`` puts it between :data:`BEGIN` and :data:`END` in docs/results.md (:data:`RESULTS_DOC`; the placeholder of
:func:`pending_markdown` stands there until both runs are staged) and in both cards. Evidence for the spread:
docs/comparison.md.
"""
import json
import math
import re
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ._paths import REPO_ROOT
from .card import dataset_of_tag, dataset_title, model_complexity
from .train_run import device_ranges_text, epochs_by_device, resumed_epochs

__all__ = [
    'PAPER_TABLE1', 'PAPER_TABLE1_SOURCE', 'SEED_STD_TOP1', 'SEED_SPREAD_SOURCE', 'claim_threshold', 'verdict',
    'read_staged_eval', 'train_step_ratio', 'lambda_summary', 'data_order_note', 'device_note', 'comparison_table',
    'pending_markdown',
    'update_block', 'write_comparison', 'readme_block', 'BEGIN', 'END', 'DEFAULT_SPE', 'DEFAULT_PLAIN',
]

PathLike = Union[str, Path]
ROOT = REPO_ROOT  # the clone (README.md, benchmarks/, hub_cards/) for an editable install
BEGIN, END = '<!-- spe-comparison:begin -->', '<!-- spe-comparison:end -->'
RESULTS_DOC = 'docs/results.md'  # the clone's file whose markers --write rewrites (default of --readme)
# the "does SPE help?" pair: the 30-epoch budget recipes, identical but for the model line
DEFAULT_SPE, DEFAULT_PLAIN = 'hub_cards/resnet164_spe.cifar10_e30', 'hub_cards/resnet164.cifar10_e30'

# The paper's Table 1, CIFAR-10 rows (arXiv 2208.10322; its own 164-epoch schedule on the original CIFAR-10, 4 GPUs).
# The paper states no number of runs, seeds or spread for these figures.
PAPER_TABLE1_SOURCE = 'paper, Table 1'
PAPER_TABLE1: Dict[str, Dict[str, Any]] = {
    'resnet164': {'label': 'ResNet164', 'params': '1.70M', 'top1': 93.39},
    'resnet164_spe': {'label': 'ResNet164 + ours (SPE)', 'params': '1.74M', 'top1': 94.80},  # "+ ours": SPE
}

# Seed-to-seed standard deviation of CIFAR-10 top-1 (percentage points) for ResNet runs, as published: the largest
# of the CIFAR-10 spreads He et al. report (5 runs each). Details and the exact table cells: docs/comparison.md.
SEED_STD_TOP1 = 0.20
SEED_SPREAD_SOURCE = (
    'He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016 (arXiv 1603.05027), Table 4: median of 5 '
    'runs (mean±std), CIFAR-10 error ResNet-1001 4.92 (4.89±0.14), ResNet-1001 at batch 64 4.62 (4.69±0.20); and '
    'He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (arXiv 1512.03385), Table 6: ResNet-110 '
    'best of 5 runs 6.43 (mean±std 6.61±0.16)')


def claim_threshold(std: float = SEED_STD_TOP1) -> float:
    """Smallest top-1 difference of two single runs called more than seed noise: two standard deviations of the
    difference of two independent runs, ``2 * sqrt(2) * std`` (0.57 points for std 0.20)."""
    return 2 * math.sqrt(2) * std


def verdict(delta: float, std: float = SEED_STD_TOP1, spe: str = 'SPE', plain: str = 'the plain model') -> str:
    """Whether a top-1 difference (``spe - plain``, points) of one run each exceeds the seed-to-seed spread."""
    limit = claim_threshold(std)
    if abs(delta) <= limit:
        return (f'**within the seed-to-seed spread**: |{delta:+.2f}| <= {limit:.2f} points, so one run per model '
                f'cannot tell the two apart and no difference is claimed.')
    ahead = spe if delta > 0 else plain
    return (f'**larger than the seed-to-seed spread**: {ahead} is ahead by {abs(delta):.2f} > {limit:.2f} points. '
            f'With one run per model this is an indication, not a measured effect size.')


def _recipe_of(folder: Path) -> str:
    """``hub_cards/resnet164.cifar10_e30`` -> ``train_recipes/resnet164-cifar10_e30.yaml`` (./run.sh train's name)."""
    model, _, tag = folder.name.partition('.')
    return f'train_recipes/{model}-{tag}.yaml' if tag else 'train_recipes/<model>-<tag>.yaml'


def _how_to_stage(folder: Path) -> str:
    recipe = _recipe_of(folder)
    return f'train it with `./run.sh train {recipe}`, then stage it with `timm-spe finish-run --recipe {recipe}`'


def read_staged_eval(folder: PathLike) -> Dict[str, Any]:
    """The ``eval.json`` of a staged folder, checked: a ``timm-spe eval`` result of the full split, and of exactly
    the folder's ``model.safetensors`` when the folder has one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"'{folder}' does not exist: {_how_to_stage(folder)}.")
    path = folder / 'eval.json'
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' is missing: {_how_to_stage(folder)} (it evaluates the final epoch and "
                                f"writes eval.json).")
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"'{path}' is not JSON ({e}): stage the folder again with `timm-spe finish-run`.") from e
    missing = [k for k in ('model', 'tag', 'top1', 'top5', 'num_images') if k not in result]
    if missing:
        raise ValueError(f"'{path}' is not a `timm-spe eval` result (missing {', '.join(missing)}).")
    if result['num_images'] != result.get('num_images_in_split', result['num_images']):
        raise ValueError(f"'{path}' scores {result['num_images']} of {result['num_images_in_split']} test images: the "
                         f"comparison needs the full split (stage without --limit).")
    weights = folder / 'model.safetensors'
    if weights.is_file() and result.get('weights_sha256'):
        from .registry import sha256_file
        if sha256_file(weights) != result['weights_sha256']:
            raise ValueError(f"'{path}' was measured on other weights than '{weights}': stage the folder again "
                             f"with `timm-spe finish-run`.")
    return result


def train_step_ratio(model: str, benchmark: Optional[PathLike] = None) -> Optional[float]:
    """Train-step time of ``model`` over plain resnet164's in the committed CPU benchmark, in the setting
    ``./run.sh train`` trains in (channels_last, SPE's CPU kernels on); None if the file or the row is absent."""
    path = Path(benchmark) if benchmark is not None else ROOT / 'benchmarks' / 'results' / 'results.json'
    if not path.is_file():
        return None
    ratios = json.loads(path.read_text()).get('ratios', {})
    key = f'{model} +cpu_kernels (channels_last)' if model.endswith('_spe') else f'{model} (channels_last)'
    return float(ratios[key]['train_step']) if key in ratios else None


def lambda_summary(folder: PathLike, result: Dict[str, Any]) -> Optional[str]:
    """One line on the learned lambda of every SPE block of the folder's weights (None without weights/SPE)."""
    folder = Path(folder)
    weights = folder / 'model.safetensors'
    if not weights.is_file():
        return None
    import timm
    from safetensors.torch import load_file

    from .plots import spe_lambdas
    state = load_file(str(weights))
    model = timm.create_model(result['model'], num_classes=state['fc.weight'].shape[0])
    model.load_state_dict(state)
    lams = [float(r['lambda']) for r in spe_lambdas(model)]
    if not lams:
        return None
    low, high = sum(v < 0.1 for v in lams), sum(v > 0.9 for v in lams)
    return (f"Learned lambda (weight of max pooling; `timm-spe inspect {result['model']}.{result['tag']}`) of the "
            f"{len(lams)} SPE blocks: mean {statistics.mean(lams):.3f}, "
            f"median {statistics.median(lams):.3f}, min {min(lams):.3f}, max {max(lams):.3f}; {low} blocks below 0.1 "
            f"(min pooling), {high} above 0.9 (max pooling), {len(lams) - low - high} mixing both.")


def _train_log(folder: Path) -> Path:
    """The train.py log of a staged folder's run: ``train_runs/<recipe>/train.log`` beside ``hub_cards/``."""
    return folder.parent.parent / 'train_runs' / Path(_recipe_of(folder)).stem / 'train.log'


def data_order_note(spe_folder: PathLike, plain_folder: PathLike) -> Optional[str]:
    """What differed in the two runs' data beyond the recipe: the resumes that replayed the first epoch's sample
    order (``train_run.resumed_epochs``), from each run's ``train_runs/<recipe>/train.log`` beside ``hub_cards/``.
    None unless both logs are there."""
    parts = []
    for folder in (Path(spe_folder), Path(plain_folder)):
        log = _train_log(folder)
        if not log.is_file():
            return None
        resumes = resumed_epochs(log)
        replayed = [e for e, reseeded in resumes if not reseeded]
        what = (f"epoch{'s' if len(replayed) > 1 else ''} {', '.join(map(str, replayed))} repeated epoch 1's "
                f"sample order" if replayed else
                "no epoch repeated another's sample order")
        parts.append(f"`{folder.name}` was resumed {len(resumes)} time{'' if len(resumes) == 1 else 's'}: {what}")
    return ("Data order: the recipe is the same, the draws are not (each train.py process draws its own batches; "
            "before `./run.sh train` reseeded resumes, a resume drew epoch 1's again, see docs/training.md). "
            + '; '.join(parts) + ' (train.py logs).')


def device_note(spe_folder: PathLike, plain_folder: PathLike) -> Optional[str]:
    """Which device trained which epochs of each run (``train_run.epochs_by_device`` on each run's train.log), when
    the two differ: CUDA epochs ran in TF32, CPU epochs in fp32, so a different split is a difference between the two
    runs that the recipe does not record. None unless both logs are there, or when the splits are the same."""
    splits = []
    for folder in (Path(spe_folder), Path(plain_folder)):
        log = _train_log(folder)
        if not log.is_file():
            return None
        splits.append((folder.name, epochs_by_device(log)))
    if splits[0][1] == splits[1][1]:
        return None
    parts = [f"`{name}` epochs {device_ranges_text(ranges)}" for name, ranges in splits]
    return ("Devices: the runs were relayed between machines, and not at the same epochs: " + '; '.join(parts)
            + " (train.py logs). On cuda train.py enables TF32 for convolutions and matmuls; on cpu they ran in "
            "fp32. Both are one recipe, but this is a second difference between the two runs besides the model.")


def _num_classes(folder: Path, result: Dict[str, Any]) -> int:
    config = folder / 'config.json'
    if config.is_file():
        return int(json.loads(config.read_text()).get('num_classes', 10))
    if result.get('label_names'):
        return len(result['label_names'])
    return 100 if dataset_of_tag(str(result['tag'])) == 'cifar100' else 10


def _epoch(result: Dict[str, Any]) -> str:
    if result.get('epoch') is None:
        return 'not recorded'
    return f"{result['epoch']} of {result['epochs_scheduled']}" if result.get('epochs_scheduled') else str(
        result['epoch'])


def _fmt(v: Optional[float], spec: str) -> str:
    return '-' if v is None else format(v, spec)


def comparison_table(spe_folder: PathLike, plain_folder: PathLike, benchmark: Optional[PathLike] = None,
                     std: float = SEED_STD_TOP1) -> str:
    """The markdown comparison of two staged folders: the SPE model first, its plain control second."""
    spe_folder, plain_folder = Path(spe_folder), Path(plain_folder)
    spe, plain = read_staged_eval(spe_folder), read_staged_eval(plain_folder)
    if not spe['model'].endswith('_spe') or plain['model'] != spe['model'][:-len('_spe')]:
        raise ValueError(f"compare an SPE model with its plain control, SPE first: got '{spe['model']}' "
                         f"({spe_folder}) and '{plain['model']}' ({plain_folder}).")
    if spe['tag'] != plain['tag']:
        raise ValueError(f"'{spe_folder}' is tag '{spe['tag']}' and '{plain_folder}' is tag '{plain['tag']}': the "
                         f"comparison needs both trained with the same recipe (the same tag).")
    for key in ('data_label', 'num_images'):
        if spe.get(key) != plain.get(key):
            raise ValueError(f"the two eval.json files differ in {key} ({spe.get(key)!r} vs {plain.get(key)!r}): "
                             f"evaluate both on the same test split.")
    rows: List[Tuple[str, Dict[str, Any], Dict[str, float], Optional[float]]] = []
    for folder, r in ((spe_folder, spe), (plain_folder, plain)):
        c = model_complexity(r['model'], _num_classes(folder, r))
        rows.append((f"{r['model']}.{r['tag']}", r, c, train_step_ratio(r['model'], benchmark)))
    delta = {k: (spe[k] - plain[k]) if spe.get(k) is not None and plain.get(k) is not None else None
             for k in ('top1', 'top5', 'loss')}
    dataset = dataset_title(dataset_of_tag(str(spe['tag'])))
    lines = [
        f"Ours: `timm-spe eval` of the final epoch's staged weights on the {spe.get('data_label') or spe.get('data')}, "
        f"{spe['num_images']} images (each folder's `eval.json`); one training run (one seed) per model. "
        f"Paper: its Table 1, its 164-epoch schedule on the original {dataset}.",
        '',
        '| model | weights / source | top-1 (%) | top-5 (%) | loss | final epoch | params | GMACs '
        '| train step / resnet164 |',
        '|---|---|---:|---:|---:|---|---:|---:|---:|',
    ]
    for name, r, c, ratio in rows:
        lines.append(
            f"| {r['model']} (ours) | `{name}` | {r['top1']:.2f} | {r['top5']:.2f} "
            f"| {_fmt(r.get('loss'), '.4f')} | {_epoch(r)} | {c['params'] / 1e6:.3f}M | {c['gmacs']:.3f} "
            f"| {_fmt(ratio, '.3f')} |")
    lines.append(f"| **SPE - plain (ours)** | | **{delta['top1']:+.2f}** | {delta['top5']:+.2f} "
                 f"| {_fmt(delta['loss'], '+.4f')} | | {(rows[0][2]['params'] - rows[1][2]['params']) / 1e6:+.3f}M "
                 f"| {rows[0][2]['gmacs'] - rows[1][2]['gmacs']:+.3f} | |")
    paper = [PAPER_TABLE1.get(spe['model']), PAPER_TABLE1.get(plain['model'])]
    if dataset_of_tag(str(spe['tag'])) == 'cifar10' and all(paper):
        for p in paper:
            lines.append(f"| {p['label']} | **{PAPER_TABLE1_SOURCE}** | {p['top1']:.2f} | - | - "
                         f"| 164 (schedule) | {p['params']} | - | - |")
        lines.append(f"| **SPE - plain ({PAPER_TABLE1_SOURCE})** | | **{paper[0]['top1'] - paper[1]['top1']:+.2f}** "
                     f"| | | | | | |")
    ratio = rows[0][3]
    notes = [n for n in (data_order_note(spe_folder, plain_folder), device_note(spe_folder, plain_folder)) if n]
    lines += [
        '',
        f"**Top-1 difference, SPE - plain (ours): {delta['top1']:+.2f} points**, "
        + verdict(delta['top1'], std, spe=f"`{spe['model']}`", plain=f"`{plain['model']}`")
        + (' The two runs also differed in what the notes below list, which one pair of runs cannot separate from '
           'the model.' if notes else ''),
        '',
        f"Seed-to-seed spread: CIFAR-10 top-1 of one ResNet recipe varies by a standard deviation of about {std:.2f} "
        f"points from run to run ({SEED_SPREAD_SOURCE}). The difference of two single runs then has a standard "
        f"deviation of {math.sqrt(2) * std:.2f}; a difference is called larger than the spread only beyond twice "
        f"that, {claim_threshold(std):.2f} points. Those spreads were measured on full schedules; the spread of these "
        f"runs was not measured (one seed each). The paper's own difference comes with no number of runs or spread.",
        '',
        'Train step / resnet164: median train-step time (batch 128, 32x32) over plain resnet164\'s in the committed '
        '2-core CPU benchmark `benchmarks/results/results.json`, in the setting `./run.sh train` trains in '
        '(channels_last, SPE\'s CPU kernels on)'
        + ('.' if ratio is not None else '; not available (no benchmarks/results/results.json row).'),
    ]
    for note in notes:
        lines += ['', note]
    lam = lambda_summary(spe_folder, spe)
    if lam:
        lines += ['', lam]
    return '\n'.join(lines)


def pending_markdown(spe_folder: PathLike = DEFAULT_SPE, plain_folder: PathLike = DEFAULT_PLAIN,
                     staged: Sequence[PathLike] = ()) -> str:
    """What stands between the markers of docs/results.md until both runs are staged: which folder is still missing, and
    the commands that make it and the table (``staged``: the folders already staged)."""
    staged = {Path(f).as_posix() for f in staged}
    folders = [Path(spe_folder), Path(plain_folder)]
    done = [f for f in folders if f.as_posix() in staged]
    todo = [f for f in folders if f.as_posix() not in staged]
    if done:
        head = [f'*Pending:* `{done[0].as_posix()}/` is staged; `{todo[0].as_posix()}/` is not yet:',
                'its training run has not finished. Once it has, these commands stage it and write the',
                'comparison here and on both cards, generated from the two `eval.json` files:']
    else:
        head = [f'*Pending:* `{folders[0].as_posix()}/` and `{folders[1].as_posix()}/` are not staged yet:',
                'their training runs have not finished. Once they have, these commands stage both folders and write the',
                'comparison here and on both cards, generated from the two `eval.json` files:']
    # run.sh runs finish-run itself after train.py's last epoch (a second finish-run would meet a staged folder); the
    # runs are the committed records in train_runs/ (./run.sh train alone would start anew in runs/)
    trains = [f'TRAIN_RUNS=train_runs ./run.sh train {_recipe_of(f)}'
              + ('   # resumes the run to its last epoch, then stages it (finish-run)' if i == 0 else '')
              for i, f in enumerate(todo)]
    return '\n'.join([
        *head,
        '',
        '```bash',
        *trains,
        f'timm-spe compare {folders[0].as_posix()} {folders[1].as_posix()} --write',
        '```',
    ])


def update_block(text: str, block: str, where: str = RESULTS_DOC) -> str:
    """``text`` with what stands between :data:`BEGIN` and :data:`END` replaced by ``block``."""
    pattern = re.compile(re.escape(BEGIN) + '.*?' + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f'{where} has no {BEGIN} ... {END} block: add the two markers where the comparison goes.')
    return pattern.sub(lambda _: f'{BEGIN}\n{block}\n{END}', text, count=1)


def _card_with(card: str, block: str, where: str) -> str:
    """A card with the comparison: replaced between the markers, else a new section before '## Training'."""
    if BEGIN in card:
        return update_block(card, block, where)
    section = f'## Does SPE help? Next to the plain model, same recipe\n{BEGIN}\n{block}\n{END}\n\n'
    at = card.find('\n## Training')
    return card.rstrip('\n') + '\n\n' + section if at < 0 else card[:at + 1] + section + card[at + 1:]


def write_comparison(spe_folder: PathLike, plain_folder: PathLike, readme: Optional[PathLike] = None,
                     benchmark: Optional[PathLike] = None) -> Tuple[str, List[Path]]:
    """Write the table into ``readme`` (default: the clone's docs/results.md) and both folders' cards. Everything is
    generated and checked before the first file is written."""
    table = comparison_table(spe_folder, plain_folder, benchmark=benchmark)
    readme = Path(readme) if readme is not None else ROOT / RESULTS_DOC
    if not readme.is_file():
        raise FileNotFoundError(f"'{readme}' does not exist: give the file to write into with --readme.")
    texts = {readme: update_block(readme.read_text(), table, str(readme))}
    for folder in (Path(spe_folder), Path(plain_folder)):
        card = folder / 'README.md'
        if not card.is_file():
            raise FileNotFoundError(f"'{card}' is missing: {_how_to_stage(folder)}.")
        texts[card] = _card_with(card.read_text(), table, str(card))
    for path, text in texts.items():
        path.write_text(text)
    return table, list(texts)


def readme_block(root: PathLike = ROOT, spe_folder: str = DEFAULT_SPE, plain_folder: str = DEFAULT_PLAIN,
                 benchmark: Optional[PathLike] = None) -> str:
    """What the block of docs/results.md must be: the table of the committed folders once both have an eval.json,
    else the placeholder."""
    root = Path(root)
    if not all((root / f / 'eval.json').is_file() for f in (spe_folder, plain_folder)):
        return pending_markdown(spe_folder, plain_folder,
                                staged=[f for f in (spe_folder, plain_folder) if (root / f / 'eval.json').is_file()])
    if benchmark is None:
        benchmark = root / 'benchmarks' / 'results' / 'results.json'
    return comparison_table(root / spe_folder, root / plain_folder, benchmark=benchmark)
