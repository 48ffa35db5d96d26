""" The commands on ``./run.sh train`` runs: ``run-status`` (where one stands), ``finish-run`` (eval + plots +
staged Hub folder) and ``compare`` (an SPE run's staged folder next to its plain control's) """
import argparse
import json
import shutil
import tempfile
from functools import partial
from pathlib import Path
from typing import List, Optional

import timm
import torch
import yaml

import timm_spe

from ..card import TRAIN_ARGS_NAME, TRAIN_SUMMARY_NAME, dataset_of_tag, dataset_title
from ..compare import comparison_table, write_comparison
from ..convert import load_checkpoint_file
from ..plots import plot_training_curve
from ..train_run import (
    best_epoch,
    completed_epochs,
    describe_devices,
    describe_resumes,
    epochs_by_device,
    expected_time,
    read_summary,
    recipe_header,
    resumed_epochs,
    run_status,
    summary_csv_text,
)
from ._common import add_command
from .evaluate import cmd_eval, cmd_inspect
from .publish import cmd_publish


def cmd_finish_run(args) -> Path:
    """After a train.py run of a recipe: eval the final epoch's weights, plot, and stage the Hub folder.

    The final epoch, never the best one: train.py's ``model_best.pth.tar`` is chosen on its eval split, which for
    these recipes is the test split that the card reports. Works on a copy of ``last.pth.tar`` taken first, and on
    the epochs up to its own: with ``--unfinished`` train.py may still be running and write the next epoch meanwhile,
    and the eval, the lambdas, the staged weights, the curve and the budget must all be of the same epoch.
    """
    recipe = yaml.safe_load(Path(args.recipe).read_text())
    stem = Path(args.recipe).stem
    run_dir = Path(args.run_dir) if args.run_dir else (
        Path(recipe.get('output') or 'output/train') / recipe.get('experiment', stem))
    checkpoint = run_dir / 'last.pth.tar'
    if not checkpoint.is_file():
        raise SystemExit(f"no {checkpoint}: run `./run.sh train {args.recipe}` first (it writes the run there).")
    with tempfile.TemporaryDirectory(prefix='timm-spe-finish-run-') as tmp:
        # train.py replaces last.pth.tar atomically (a new file renamed over it), so this copy is one whole epoch
        snapshot = Path(shutil.copyfile(checkpoint, Path(tmp) / checkpoint.name))
        return _finish_run(args, recipe, stem, run_dir, checkpoint, snapshot)


def _finish_run(args, recipe: dict, stem: str, run_dir: Path, checkpoint: Path, snapshot: Path) -> Path:
    _, info = load_checkpoint_file(str(snapshot))
    rows = read_summary(run_dir / 'summary.csv')
    epoch = info['epoch'] + 1 if isinstance(info.get('epoch'), int) else len(rows)  # train.py counts from 0
    rows = [r for r in rows if r['epoch'] < epoch]  # a row of a later epoch: written since the copy was taken
    if epoch < recipe['epochs'] and not args.unfinished:
        raise SystemExit(f"{run_dir} stopped after epoch {epoch} of {recipe['epochs']}: `./run.sh train "
                         f"{args.recipe}` resumes it (or pass --unfinished to stage these weights anyway).")
    args.log = args.log or (str(run_dir / 'train.log') if (run_dir / 'train.log').is_file() else None)
    args.tag = args.tag or (recipe['experiment'] if 'experiment' in recipe else stem).split('-', 1)[1]
    model_name = recipe['model']
    tag = args.tag
    data_dir = args.data_dir or str(Path(recipe['data_dir']) / recipe.get('val_split', 'test'))
    source = run_dir / 'data_source'  # run.sh's choice for the budget recipes: jpeg or torchvision
    if not args.data_dir and source.is_file() and source.read_text().strip() == 'torchvision':
        data_dir = 'data/cifar10'  # holds torchvision's cifar-10-batches-py
    work = run_dir / 'publish'
    work.mkdir(exist_ok=True)
    eval_json = work / 'eval.json'
    label = args.data_label or (f"{dataset_title(dataset_of_tag(tag))} test split (JPEG q75 copy)"
                                if 'jpeg' in data_dir.lower() else
                                f'{dataset_title(dataset_of_tag(tag))} test split (original, torchvision)')
    result = cmd_eval(argparse.Namespace(model=f'{model_name}.{tag}', checkpoint=str(snapshot), ema=False,
                                         data_dir=data_dir, batch_size=100, limit=None, workers=args.workers,
                                         out=None, data_label=label, argv=getattr(args, 'argv', None),
                                         epoch=epoch, epochs_scheduled=recipe['epochs']))
    result['checkpoint'] = str(checkpoint)  # the run's file these bytes were copied from (checkpoint_sha256)
    eval_json.write_text(json.dumps(result, indent=2))
    print(f'wrote {eval_json}')
    curve = plot_training_curve(run_dir / 'summary.csv', work / 'training_curve.png', log=args.log, until_epoch=epoch,
                                title=f'{model_name}.{tag} (timm train.py, {args.recipe})')
    figures = [f'{curve}:training curve (train.py summary.csv and log)']
    if _has_spe(model_name):  # the plain control has no lambdas to plot
        lambdas = work / 'spe_lambda.png'
        cmd_inspect(argparse.Namespace(model=f'{model_name}.{tag}', checkpoint=str(snapshot), ema=False,
                                       plot=str(lambdas)))
        figures.append(f'{lambdas}:learned lambda of every SPE block')
    budget = args.budget or _budget_from_run(rows, recipe, args.log, epoch)
    # the run's own records go with the weights: the per-epoch numbers behind the curve, and every train.py argument
    records = {TRAIN_SUMMARY_NAME: summary_csv_text(run_dir / 'summary.csv', until_epoch=epoch)}
    if (run_dir / 'args.yaml').is_file():
        records[TRAIN_ARGS_NAME] = (run_dir / 'args.yaml').read_text()
    # the paper reports its best epoch on the test split: the card gives this run's too, labelled, when train.py's
    # per-epoch eval was on the test split (as in these recipes); a validation split's best is no such number
    on_test = _train_eval_split(records.get(TRAIN_ARGS_NAME), recipe) == 'test'
    return cmd_publish(argparse.Namespace(
        best_epoch=best_epoch(rows) if on_test else None,
        src=str(snapshot), model=model_name, tag=tag, ema=False, recipe=_recipe_with_notes(str(args.recipe)),
        budget=budget,
        eval_json=str(eval_json), figure=figures,
        out=args.out, force=args.force, template=args.template, dry_run=True, repo_id=None,
        overwrite=False, create_pr=False, private=False, extra_texts=records))


def _train_eval_split(args_yaml: Optional[str], recipe: dict) -> str:
    """The split train.py evaluated every epoch on: its args.yaml's ``val_split`` (run.sh's data arguments
    included; ``args_yaml`` is that file's text, or None), else the recipe's, else train.py's default."""
    recorded = yaml.safe_load(args_yaml) if args_yaml else None
    if isinstance(recorded, dict) and recorded.get('val_split'):
        return recorded['val_split']
    return recipe.get('val_split', 'validation')


def _has_spe(model_name: str) -> bool:
    """Whether ``model_name`` has SPE layers with a learned lambda (built on the meta device: no weights)."""
    with torch.device('meta'):
        model = timm.create_model(model_name)
    return any(isinstance(m, timm_spe.SpeModule) and getattr(m, 'p', None) is not None for m in model.modules())


def _budget_from_run(rows: List[dict], recipe: dict, log: Optional[str] = None,
                     epochs: Optional[int] = None) -> str:
    """``'N of M epochs of batch B (train.py summary.csv); epochs 1-7 on cuda, ...'`` for the ``rows`` staged."""
    budget = f"{len(rows)} of {recipe['epochs']} epochs of batch {recipe['batch_size']} (train.py summary.csv)"
    ranges = epochs_by_device(log) if log else []
    if epochs is not None:  # only the epochs of the staged weights (the log may already hold later ones)
        ranges = [(d, a, min(b, epochs)) for d, a, b in ranges if a <= epochs]
    resumes = resumed_epochs(log) if log else []
    if epochs is not None:
        resumes = [(e, reseeded) for e, reseeded in resumes if e <= epochs]
    return '; '.join(part for part in (budget, describe_devices(ranges), describe_resumes(resumes)) if part)


def _recipe_with_notes(recipe_path: str) -> str:
    """The card's recipe entry: the file, then its header comment (its differences from the paper, with sources)."""
    notes = recipe_header(recipe_path)
    if not notes:
        return f'`{recipe_path}`'
    quoted = '\n'.join(f'> {line}'.rstrip() for line in notes)
    return (f"`{recipe_path}`. Its header comment (this project's recipes list there every difference from the "
            f"paper's recipe, with sources):\n\n{quoted}\n")


def cmd_run_status(args) -> str:
    """One line: where a ``./run.sh train`` run stands (its last completed epoch); with ``--expected-from LOG``
    instead the time its remaining epochs take at the pace of the run that wrote LOG (``''``: LOG has none)."""
    epochs = yaml.safe_load(Path(args.recipe).read_text()).get('epochs') if args.recipe else None
    if args.expected_from:
        if not epochs:
            raise SystemExit('--expected-from needs --recipe RECIPE.yaml with its epochs: the time is per epoch.')
        if not Path(args.expected_from).is_file():
            raise SystemExit(f"--expected-from: no '{args.expected_from}' (the train.log of a run of the recipe, "
                             f"e.g. train_runs/{Path(args.recipe).stem}/train.log).")
        line = expected_time(args.expected_from, epochs, done=len(completed_epochs(args.run_dir)))
        if line:
            print(args.prefix + line)
        return line
    line = args.prefix + run_status(args.run_dir, epochs)
    if args.plot:
        run_dir = Path(args.run_dir)
        rows = completed_epochs(run_dir)
        if not rows:
            raise SystemExit(f"--plot: '{run_dir}' has no completed epoch yet (no summary.csv row); plot after "
                             f"its first epoch.")
        log = run_dir / 'train.log'
        total = f'/{epochs}' if epochs else ''
        plot_training_curve(run_dir / 'summary.csv', args.plot, log=log if log.is_file() else None,
                            title=f"{run_dir.name}: epoch {rows[-1]['epoch'] + 1}{total} done")
        line += f'; curve: {args.plot}'
    print(line)
    return line


def cmd_compare(args) -> str:
    """Print the comparison of an SPE model's staged folder with its plain control's; ``--write`` also puts it
    into docs/results.md (between its markers) and both cards, ``--plot`` draws both runs' curves. Every input is
    checked before the first file is written."""
    folders = (Path(args.spe_dir), Path(args.plain_dir))
    if args.plot:
        for folder in folders:
            if not (folder / TRAIN_SUMMARY_NAME).is_file():
                raise SystemExit(f"'{folder}/{TRAIN_SUMMARY_NAME}' is missing: --plot draws the staged runs' train.py "
                                 f"summaries (timm-spe finish-run stages them).")
    if args.write:
        table, written = write_comparison(args.spe_dir, args.plain_dir, readme=args.readme)
    else:
        if args.readme:
            raise SystemExit('--readme is where --write writes the table: add --write, or drop --readme.')
        table, written = comparison_table(args.spe_dir, args.plain_dir), []
    if args.plot:
        from ..plots import plot_runs
        written.append(plot_runs({f.name: f / TRAIN_SUMMARY_NAME for f in folders}, args.plot,
                                 title='same recipe, one seed each (train.py per-epoch eval on the test split)'))
    print(table)
    for path in written:
        print(f'wrote {path}')
    return table


def register(subparsers) -> None:
    """Add ``run-status``, ``finish-run`` and ``compare`` to ``timm-spe``'s subparsers."""
    add = partial(add_command, subparsers)
    p = add('run-status', "one line: epoch, train loss and top-1 of a run's last completed epoch",
            'timm-spe run-status train_runs/resnet164_spe-cifar10_e30 --recipe train_recipes/resnet164_spe-cifar10_e30.yaml',
            'timm-spe run-status train_runs/resnet164_spe-cifar10_e30 --plot curve.png',
            'timm-spe run-status runs/resnet164_spe-cifar10_e164 --recipe train_recipes/resnet164_spe-cifar10_e164.yaml '
            '--expected-from train_runs/resnet164_spe-cifar10_e164/train.log')
    p.add_argument('run_dir', help='the run folder, e.g. train_runs/resnet164_spe-cifar10_e30')
    p.add_argument('--recipe', default=None, help='its recipe, for the scheduled epoch count (default: none)')
    p.add_argument('--prefix', default='', help='text printed before the status (default: none)')
    p.add_argument('--plot', default=None, metavar='PNG',
                   help='also plot the curve so far (loss per logged step and epoch, test top-1 per epoch) to PNG '
                        '(default: none)')
    p.add_argument('--expected-from', default=None, metavar='LOG',
                   help="instead of the status: minutes per epoch on each device from train.py's logged step and "
                        "eval times in LOG, the train.log of a run of the same recipe (./run.sh train: the record "
                        "train_runs/<recipe>/train.log), and the time of the run's remaining epochs; needs --recipe; "
                        "prints nothing where LOG has no complete epoch (default: off)")
    p.set_defaults(func=cmd_run_status)

    p = add('finish-run', 'eval + plots + staged Hub folder for a finished train.py run',
            'timm-spe finish-run --recipe train_recipes/resnet164_spe-cifar10_e30.yaml')
    p.add_argument('--recipe', required=True, help='the recipe YAML the run was trained with (required)')
    p.add_argument('--run-dir', default=None,
                   help="default: the recipe's <output>/<experiment> (./run.sh train passes runs/<recipe file name>)")
    p.add_argument('--unfinished', action='store_true',
                   help='stage the last completed epoch of a run that has not reached its scheduled epochs '
                        '(default: off)')
    p.add_argument('--data-dir', default=None, help="default: the recipe's data_dir/val_split")
    p.add_argument('--data-label', default=None, help='how the card names the data (default: from --data-dir)')
    p.add_argument('--tag', default=None, help='default: the part of the experiment name after "-"')
    p.add_argument('--log', default=None,
                   help="train.py's console log, for per-step loss in the curve (default: <run dir>/train.log)")
    p.add_argument('--budget', default='', help="training budget actually used (default: from the run's summary.csv)")
    p.add_argument('--template', default=None, help="card template (default: the package's templates/hub_card.md)")
    p.add_argument('--out', default=None, help='staging folder (default: hub_cards/<model>.<tag> in a clone)')
    p.add_argument('--force', action='store_true', help='replace a non-empty staging folder (default: off)')
    p.add_argument('--workers', type=int, default=0, help='data-loading worker processes for the eval')
    p.set_defaults(func=cmd_finish_run)

    p = add('compare', "does SPE help? An SPE model's staged folder next to its plain control's (same recipe)",
            'timm-spe compare hub_cards/resnet164_spe.cifar10_e30 hub_cards/resnet164.cifar10_e30',
            'timm-spe compare hub_cards/resnet164_spe.cifar10_e30 hub_cards/resnet164.cifar10_e30 --write')
    p.add_argument('spe_dir', help='staged folder of the SPE model (finish-run), e.g. hub_cards/resnet164_spe.cifar10_e30')
    p.add_argument('plain_dir', help='staged folder of its plain control, e.g. hub_cards/resnet164.cifar10_e30')
    p.add_argument('--write', action='store_true',
                   help="also write the table into docs/results.md (between its spe-comparison markers) and into both "
                        "folders' cards (default: off, print only)")
    p.add_argument('--readme', default=None, help="with --write: the file to write into (default: the clone's "
                                                   "docs/results.md)")
    p.add_argument('--plot', default=None, metavar='PNG',
                   help="also draw both runs' per-epoch losses and test top-1 from their staged summary.csv into PNG "
                        "(default: no plot)")
    p.set_defaults(func=cmd_compare)
