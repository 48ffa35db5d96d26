""" ``timm-spe``: evaluate, inspect, convert and publish SPE models

    timm-spe eval MODEL[.TAG] [--checkpoint FILE] --data-dir DIR [--limit N] [--out JSON]
    timm-spe inspect MODEL[.TAG] [--checkpoint FILE] [--plot PNG]
    timm-spe convert SRC --model NAME[.TAG] --out FILE.safetensors|DIR
    timm-spe publish SRC --model NAME --tag TAG [--eval-json J] [--recipe R] [--budget B] [--figure PNG:CAPTION]
                     [--out DIR] [--dry-run] [--create-pr | --overwrite]
    timm-spe upload DIR [--create-pr | --overwrite] [--revision BRANCH] [--commit-message MSG]
    timm-spe finish-run --recipe RECIPE.yaml      # eval + plots + staged Hub folder for a train.py run
    timm-spe compare SPE_DIR PLAIN_DIR [--write] [--plot PNG]  # SPE vs its plain control: the comparison table
    timm-spe run path/to/validate.py ARGS...     # any timm script with the SPE models registered

Errors are one line on stderr, `timm-spe COMMAND: error: <what and the fix>`, exit status 1;
`timm-spe --debug COMMAND ...` adds the traceback.
"""
import argparse
import errno
import importlib.util
import json
import os
import re
import runpy
import shlex
import shutil
import socket
import sys
import tempfile
import traceback
from pathlib import Path
from typing import List, Optional, Tuple

import timm
import torch
import yaml
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled
from safetensors import SafetensorError
from safetensors.torch import save_file
from timm.models import split_model_name_tag
from timm.models._hub import save_for_hf

import timm_spe  # noqa: F401  (registers the models)

from .card import (
    TRAIN_ARGS_NAME,
    TRAIN_SUMMARY_NAME,
    dataset_of_tag,
    dataset_title,
    portable_eval_result,
    registered_cfg,
    render_card,
)
from .compare import comparison_table, write_comparison
from .convert import load_checkpoint_file, load_weights
from .evaluate import evaluate
from .hub import (
    NO_TOKEN_MESSAGE,
    SAFE_WEIGHTS_NAME,
    check_staged_folder,
    check_upload_allowed,
    hub_api,
    read_eval_json,
    sha256_file,
    stage_hub_folder,
    upload_hub_folder,
    validate_tag,
    weights_sha256,
)
from .plots import plot_lambdas, plot_training_curve, spe_lambdas
from .registry import default_hub_repo_id
from .train_run import (
    completed_epochs,
    describe_devices,
    describe_resumes,
    epochs_by_device,
    read_summary,
    recipe_header,
    resumed_epochs,
    run_status,
    summary_csv_text,
)
from .version import __version__

ROOT = Path(__file__).resolve().parents[1]


def _create(model: str, checkpoint: Optional[str], use_ema: bool = False) -> torch.nn.Module:
    """A model from ``MODEL[.TAG]``: weights from ``checkpoint`` if given, else the tag's pretrained weights."""
    name, tag = split_model_name_tag(model)
    if not timm.is_model(name):
        raise SystemExit(f"unknown model '{name}'; see timm.list_models('*spe*') / timm.list_models('resnet*').")
    if tag:
        validate_tag(tag, f"the tag of '{model}'")
    known_tag = not tag or registered_cfg(model) is not None
    if not known_tag and not checkpoint:
        tags = [t.split('.', 1)[1] for t in timm.list_pretrained(f'{name}.*')]
        raise SystemExit(f"'{name}' has no pretrained tag '{tag}' (tags with weights: {tags}); give --checkpoint "
                         f"for new weights.")
    if checkpoint:
        state_dict, _ = load_checkpoint_file(checkpoint, use_ema=use_ema)
        kwargs = {'num_classes': state_dict['fc.weight'].shape[0]} if 'fc.weight' in state_dict else {}
        _check_classes(model, kwargs.get('num_classes'), checkpoint)
        if not known_tag:  # weights for a tag not registered yet (e.g. a new training budget)
            model, kwargs['pretrained_cfg_overlay'] = name, {'tag': tag}
        m = timm.create_model(model, **kwargs)
        load_weights(m, checkpoint, use_ema=use_ema)
        return m
    return timm.create_model(model, pretrained=True)


def _check_classes(model_tag: str, num_classes: Optional[int], checkpoint: str) -> None:
    """A checkpoint's classifier must fit the tag it is used as (no CIFAR-100 weights as '.cifar10')."""
    cfg = registered_cfg(model_tag) if '.' in model_tag else None
    if cfg is not None and num_classes is not None and cfg.num_classes != num_classes:
        raise SystemExit(
            f"'{checkpoint}' has a {num_classes}-class classifier but '{model_tag}' is a {cfg.num_classes}-class "
            f"tag: check --model/--tag (e.g. .cifar100 for 100 classes).")


def _command(args) -> str:
    """The command line that ran, quoted so it can be pasted into a shell."""
    return shlex.join(['timm-spe', *(getattr(args, 'argv', None) or [])])


def cmd_eval(args) -> dict:
    if args.ema and not args.checkpoint:
        raise SystemExit(f"--ema needs --checkpoint FILE (a train.py checkpoint with state_dict_ema): the pretrained "
                         f"weights of '{args.model}' have no EMA copy. Drop --ema, or give the checkpoint.")
    model = _create(args.model, args.checkpoint, args.ema)  # --ema on a file without EMA weights raises there
    device = torch.device(getattr(args, 'device', None) or 'cpu')
    if getattr(args, 'channels_last', False):
        model = model.to(memory_format=torch.channels_last)
    amp = getattr(args, 'amp', False)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        result = evaluate(model, args.data_dir, batch_size=args.batch_size, limit=args.limit, workers=args.workers,
                          device=device, progress=not getattr(args, 'json', False),
                          allow_class_subset=getattr(args, 'allow_class_subset', False),
                          skip_bad_images=getattr(args, 'skip_bad_images', False),
                          dataset=getattr(args, 'dataset', None), download=getattr(args, 'download', False))
    result.update(device=str(device), amp='bfloat16' if amp else None,
                  channels_last=bool(getattr(args, 'channels_last', False)))
    name, tag = split_model_name_tag(args.model)
    weights_file = args.checkpoint or model.pretrained_cfg.get('file')  # the Hub download (HF cache) if no checkpoint
    result = {'model': name, 'tag': tag or model.pretrained_cfg.get('tag'), 'checkpoint': args.checkpoint,
              'checkpoint_sha256': sha256_file(weights_file) if weights_file else None,
              'weights_sha256': weights_sha256(model), 'ema': bool(args.ema),
              'data_label': args.data_label, **result}
    if getattr(args, 'epoch', None) is not None:  # finish-run: the train.py epoch of these weights
        result.update(epoch=args.epoch, epochs_scheduled=getattr(args, 'epochs_scheduled', None))
    if getattr(args, 'argv', None):
        result['command'] = _command(args)
    notes = ([f"only {len(result['classes_evaluated'])} of {len(result['label_names'])} classes"]
             if result['class_subset'] else []) + ([f"{result['skipped_images']} unreadable images skipped"]
                                                   if result['skipped_images'] else [])
    if getattr(args, 'json', False):  # stdout is the JSON alone (pipe it to jq)
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.model}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
              f"({result['num_images']} images of {args.data_dir}{''.join('; ' + n for n in notes)})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        if not getattr(args, 'json', False):
            print(f'wrote {args.out}')
    return result


def cmd_inspect(args) -> List[dict]:
    model = _create(args.model, args.checkpoint, args.ema)
    rows = spe_lambdas(model)
    if not rows:
        raise SystemExit(f"'{args.model}' has no SPE layers.")
    print(f"{'block':<12} {'lambda':>8} {'p0':>9} {'p1':>9}")
    for r in rows:
        print(f"{r['block']:<12} {r['lambda']:8.4f} {r['p0']:9.4f} {r['p1']:9.4f}")
    lams = [r['lambda'] for r in rows]
    print(f'{len(rows)} SPE blocks; lambda mean {sum(lams) / len(lams):.4f}, min {min(lams):.4f}, max {max(lams):.4f}')
    if args.plot:
        plot_lambdas(rows, args.plot, title=f'{args.model}: learned lambda per SPE block')
        print(f'wrote {args.plot}')
    return rows


def cmd_convert(args) -> Path:
    """Any supported checkpoint -> ``FILE.safetensors``, or a folder (``model.safetensors`` + ``config.json``)."""
    out = Path(args.out)
    if out.suffix.lower() in _NOT_SAFETENSORS_SUFFIXES or (out.suffix != '.safetensors' and out.is_file()):
        stem = out.name
        while Path(stem).suffix.lower() in _NOT_SAFETENSORS_SUFFIXES:
            stem = Path(stem).stem
        raise SystemExit(f"--out '{out}': convert writes safetensors only, never a pickle: give --out "
                         f"{out.with_name(stem + '.safetensors')} (one file) or a folder path (model.safetensors + "
                         f"config.json).")
    if out.suffix == '.safetensors' and out.is_dir():
        raise SystemExit(f"--out '{out}' is a folder: give a file name, or a folder path not ending in .safetensors.")
    if out.suffix != '.safetensors' and not split_model_name_tag(args.model)[1]:
        raise SystemExit(f"a folder's config.json names the weights' tag: give --model {args.model}.TAG "
                         f"(e.g. {args.model}.cifar10), or --out FILE.safetensors.")
    model = _create(args.model, args.src, args.ema)
    if out.suffix == '.safetensors':
        if out.exists() and not args.force:
            raise SystemExit(f"'{out}' exists; pass --force to replace it.")
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    else:
        if out.exists() and any(out.iterdir()) and not args.force:
            raise SystemExit(f"output folder '{out}' is not empty; choose another --out or pass --force.")
        save_for_hf(model, out, safe_serialization=True)  # loadable with timm.create_model('local-dir:OUT')
    print(f'wrote {out} ({args.model}, from {args.src})')
    return out


# --out names that look like weight files but are not safetensors: refused rather than made a folder named 'x.pth'
_NOT_SAFETENSORS_SUFFIXES = ('.pth', '.pt', '.pt2', '.bin', '.ckpt', '.pkl', '.pickle', '.tar', '.gz', '.zip', '.npz',
                             '.h5', '.onnx', '.st', '.safetensor', '.json', '.yaml', '.yml', '.md')


def _parse_figure(spec: str) -> Tuple[Path, str]:
    path, _, caption = spec.partition(':')
    if not Path(path).is_file():
        raise SystemExit(f"--figure '{path}' does not exist.")
    return Path(path), caption or Path(path).stem.replace('_', ' ')


def _recipe_and_budget(args, info: dict) -> Tuple[str, str]:
    """``--recipe`` / ``--budget`` if given, else what the train.py checkpoint's ``args`` and ``epoch`` record."""
    recipe, budget = args.recipe, args.budget
    a = info.get('args')
    if info.get('format') == 'official':
        recipe = recipe or ("the authors' official SPEM code (github.com/Qrange-group/SPEM, run.py), "
                            "converted with timm-spe")
        if not budget and info.get('epoch') is not None:
            budget = f"{info['epoch']} epochs (the official checkpoint's epoch counter)"
    elif a is not None:
        if not recipe:
            recipe = (f"timm train.py: model {a.model}, opt {a.opt}, lr {a.lr}, weight decay {a.weight_decay}, "
                      f"sched {a.sched}, epochs {a.epochs}, batch {a.batch_size}, crop "
                      f"{getattr(a, 'train_crop_mode', None) or 'timm default'}")
        if not budget and info.get('epoch') is not None:
            budget = (f"checkpoint of epoch {info['epoch'] + 1} of {a.epochs} scheduled, batch {a.batch_size} "
                      f"(from the checkpoint's train.py args)")
    return recipe, budget


def _check_eval_result(result: Optional[dict], model_name: str, sha: str, path: str) -> None:
    """The eval JSON must be of this model and, if it records them, of exactly these weights."""
    if result is None:
        return
    if result.get('model') not in (None, model_name):
        raise SystemExit(f"--eval-json '{path}' is a result of '{result['model']}', not '{model_name}'.")
    if result.get('weights_sha256') not in (None, sha):
        raise SystemExit(
            f"--eval-json '{path}' was measured on other weights (sha256 {result['weights_sha256'][:16]}... vs "
            f"{sha[:16]}... here): run `timm-spe eval` on this checkpoint (same --ema) and publish again.")


def default_out(model_tag: str) -> Path:
    """``hub_cards/<model>.<tag>`` in a clone of timm-spe, else ``./<model>.<tag>``."""
    cards = ROOT / 'hub_cards'
    return cards / model_tag if cards.is_dir() else Path(model_tag)


def cmd_publish(args) -> Path:
    if not timm.is_model(args.model):
        raise SystemExit(f"unknown model '{args.model}'; see timm.list_models('resnet*').")
    validate_tag(args.tag)
    model_tag = f'{args.model}.{args.tag}'
    cfg = registered_cfg(model_tag)
    repo_id = args.repo_id or (default_hub_repo_id(model_tag) if cfg else None)
    if not args.dry_run and not repo_id:
        raise SystemExit(f"no Hub repo for '{model_tag}' (tag not registered in timm_spe): pass --repo-id ORG/NAME.")
    api = None
    if not args.dry_run:  # refuse before staging anything if the upload would be refused anyway
        api = hub_api()
        check_upload_allowed(repo_id, overwrite=args.overwrite, create_pr=args.create_pr, api=api,
                             revision=getattr(args, 'revision', None))
    state_dict, info = load_checkpoint_file(args.src, use_ema=args.ema)
    num_classes = state_dict['fc.weight'].shape[0] if 'fc.weight' in state_dict else 10
    _check_classes(model_tag, num_classes, args.src)
    overlay = None if cfg else {'tag': args.tag, 'num_classes': num_classes}
    model = timm.create_model(model_tag if cfg else args.model, num_classes=num_classes, pretrained_cfg_overlay=overlay)
    load_weights(model, args.src, use_ema=args.ema)
    sha = weights_sha256(model)  # = sha256 of the model.safetensors about to be staged
    eval_result = read_eval_json(args.eval_json)
    _check_eval_result(eval_result, args.model, sha, args.eval_json)
    recipe, budget = _recipe_and_budget(args, info)
    records = getattr(args, 'extra_texts', None) or {}  # finish-run: the run's summary.csv and args.yaml
    figures = [_parse_figure(f) for f in args.figure]
    if args.template and not Path(args.template).is_file():
        raise SystemExit(f"card template '{args.template}' not found (omit --template to use the package's own).")

    def card(staged_sha: str) -> str:
        return render_card(args.model, args.tag, staged_sha, eval_result=eval_result, recipe=recipe, budget=budget,
                           figures=[(p.name, c) for p, c in figures], num_classes=num_classes, template=args.template,
                           repo_id=repo_id, training_files=sorted(records))

    out = Path(args.out) if args.out else default_out(model_tag)
    # the staged eval.json: the same numbers, with paths relative / shortened and the command quoted
    texts = {'eval.json': json.dumps(portable_eval_result(eval_result), indent=2) + '\n'} if eval_result else {}
    texts.update(records)
    staged = stage_hub_folder(model, out, card=card, figures={p.name: p for p, _ in figures},
                              extra_texts=texts, force=args.force)
    staged_sha = sha256_file(staged / SAFE_WEIGHTS_NAME)
    if staged_sha != sha:
        raise RuntimeError(f'staged {SAFE_WEIGHTS_NAME} sha256 {staged_sha} differs from the weights ({sha}).')
    print(f'staged {staged}: {", ".join(sorted(p.name for p in staged.iterdir()))} (sha256 {sha[:16]}...)')
    if args.dry_run:
        print(f'dry run: nothing uploaded. Upload with the same command without --dry-run (repo {repo_id}).')
        return staged
    _upload(staged, repo_id, args, api)
    return staged


def _upload(folder: Path, repo_id: str, args, api=None) -> None:
    result = upload_hub_folder(folder, repo_id, overwrite=args.overwrite, create_pr=args.create_pr,
                               private=args.private, api=api, commit_message=getattr(args, 'commit_message', None),
                               revision=getattr(args, 'revision', None))
    url = getattr(result, 'pr_url', None) if args.create_pr else None
    print(f'uploaded {folder} to {repo_id}' + (f' ({args.revision})' if getattr(args, 'revision', None) else '')
          + (f' as a pull request: {url}' if args.create_pr else ''))
    print(f"pretrained=True for '{repo_id}' needs its sha256 {sha256_file(folder / SAFE_WEIGHTS_NAME)} recorded in "
          f"timm_spe/registry.py PRETRAINED_TAGS (see docs/hub.md); hf-hub:{repo_id} loads right away.")


def cmd_upload(args) -> Path:
    """Upload a folder staged earlier (``publish --dry-run`` / ``finish-run``) after checking it is complete."""
    folder = Path(args.folder)
    config = check_staged_folder(folder)
    tag = (config.get('pretrained_cfg') or {}).get('tag') or ''
    if tag:
        validate_tag(tag, f"the tag in '{folder / 'config.json'}' (pretrained_cfg.tag)")
    model_tag = f"{config['architecture']}.{tag}"
    cfg = registered_cfg(model_tag)
    repo_id = args.repo_id or (default_hub_repo_id(model_tag) if cfg else None)
    if not repo_id:
        raise SystemExit(f"no Hub repo for '{model_tag}' (tag not registered in timm_spe): pass --repo-id ORG/NAME.")
    _upload(folder, repo_id, args)
    return folder


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
    return cmd_publish(argparse.Namespace(
        src=str(snapshot), model=model_name, tag=tag, ema=False, recipe=_recipe_with_notes(str(args.recipe)),
        budget=budget,
        eval_json=str(eval_json), figure=figures,
        out=args.out, force=args.force, template=args.template, dry_run=True, repo_id=None,
        overwrite=False, create_pr=False, private=False, extra_texts=records))


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
    """One line: where a ``./run.sh train`` run stands (its last completed epoch)."""
    epochs = yaml.safe_load(Path(args.recipe).read_text()).get('epochs') if args.recipe else None
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
    into the README (between its markers) and both cards, ``--plot`` draws both runs' curves. Every input is
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
        from .plots import plot_runs
        written.append(plot_runs({f.name: f / TRAIN_SUMMARY_NAME for f in folders}, args.plot,
                                 title='same recipe, one seed each (train.py per-epoch eval on the test split)'))
    print(table)
    for path in written:
        print(f'wrote {path}')
    return table


def cmd_run(args) -> None:
    """Run a timm script (``validate.py``, ``train.py``, ``inference.py``...) with the SPE models registered.

    The script runs in this process (``runpy``) with ``sys.argv = [script, *args]`` after ``import timm_spe``,
    so ``--model resnet164_spe`` (and ``--pretrained``) work as for timm's own models.
    """
    script = Path(args.script)
    if not script.is_file():
        raise SystemExit(f"timm-spe run: '{script}' does not exist (timm's scripts are in a clone of "
                         f"github.com/huggingface/pytorch-image-models: validate.py, train.py, inference.py...).")
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [str(script), *args.script_args]
    sys.path.insert(0, str(script.resolve().parent))  # as `python script.py` would
    try:
        runpy.run_path(str(script), run_name='__main__')
    finally:
        sys.argv, sys.path[:] = old_argv, old_path


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' layout and appends '(default: X)' to optional options whose help does not state it (a
    required one has no default to show)."""

    def _get_help_string(self, action):
        text = action.help or ''
        flags = (argparse._StoreTrueAction, argparse._HelpAction, argparse._VersionAction)
        if (action.option_strings and 'default' not in text and action.default is not argparse.SUPPRESS
                and not action.required and not isinstance(action, flags)):
            text += ' (default: %(default)s)'
        return text


def _examples(*lines: str) -> str:
    return 'example:\n' + '\n'.join(f'  {line}' for line in lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='timm-spe', description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}',
                        help='print the timm-spe version and exit')
    parser.add_argument('--debug', action='store_true',
                        help='on an error, print the traceback before the one-line message (default: off)')
    sub = parser.add_subparsers(dest='command', required=True)

    def add(name, help, *examples):
        p = sub.add_parser(name, help=help, description=help, epilog=_examples(*examples),
                           formatter_class=_HelpFormatter)
        if name != 'run':  # `timm-spe run` passes everything after the script to it
            p.add_argument('--debug', action='store_true', default=argparse.SUPPRESS,
                           help='on an error, print the traceback before the one-line message (default: off)')
        return p

    def upload_args(p, repo_default):
        p.add_argument('--repo-id', default=None, help=f'Hub repo (default: {repo_default})')
        g = p.add_mutually_exclusive_group()
        g.add_argument('--create-pr', action='store_true', help='upload as a pull request (default: off)')
        g.add_argument('--overwrite', action='store_true', help='replace weights already on the Hub (default: off)')
        p.add_argument('--private', action='store_true',
                       help="create the repo private (default: off, the account's default visibility)")
        p.add_argument('--revision', default=None,
                       help='branch to commit to, created from main if absent; with --create-pr the base of the '
                            'pull request (default: main)')
        p.add_argument('--commit-message', default=None,
                       help="commit / pull request title (default: 'Add <folder> (timm-spe publish)')")

    def model_args(p, checkpoint_flag='--checkpoint'):
        p.add_argument('model', help='model name, optionally with a pretrained tag (resnet164_spe.cifar10_e30)')
        p.add_argument(checkpoint_flag, default=None,
                       help='weights: safetensors, train.py checkpoint or official SPEM checkpoint '
                            "(default: the tag's pretrained weights: shipped in the package, else from the Hub)")
        p.add_argument('--ema', action='store_true', help="use a train.py checkpoint's state_dict_ema (default: off)")

    p = add('eval', 'top-1/top-5/loss on a CIFAR test split',
            'timm-spe eval resnet164_spe --data-dir data/cifar10-jpeg/test --out eval.json',
            'timm-spe eval resnet164_spe --dataset torch/cifar10 --download --data-dir data/cifar10',
            'timm-spe eval resnet164_spe --checkpoint last.pth.tar --data-dir data/cifar10 --device cuda --amp '
            '--channels-last --json')
    model_args(p)
    p.add_argument('--data-dir', required=True,
                   help="test split: <dir>/<class>/*, class folders named as the model's classes (CIFAR-10: airplane "
                        "... truck), or a folder with cifar-10-batches-py / cifar-100-python (required)")
    p.add_argument('--data-label', default=None,
                   help='how the card names the data, e.g. "CIFAR-10 (JPEG q75 copy)" (default: the data path)')
    p.add_argument('--limit', type=int, default=None,
                   help='evaluate a fixed class-balanced subset of N images (default: all)')
    p.add_argument('--dataset', default=None, choices=('torch/cifar10', 'torch/cifar100'),
                   help="read torchvision's files of this dataset in --data-dir (labels mapped by the model's class "
                        "names); default: whatever --data-dir holds")
    p.add_argument('--download', action='store_true',
                   help="with --dataset: download torchvision's test files into --data-dir if missing (default: off)")
    p.add_argument('--allow-class-subset', action='store_true',
                   help="score a split holding only some of the model's classes; the JSON records which (default: off)")
    p.add_argument('--skip-bad-images', action='store_true',
                   help='leave out unreadable images instead of refusing; the JSON records how many (default: off)')
    p.add_argument('--batch-size', type=int, default=100, help='images per batch')
    p.add_argument('--workers', type=int, default=0, help='data-loading worker processes (0: in the main process)')
    p.add_argument('--device', default='cpu', help='torch device: cpu, cuda, cuda:1, mps...')
    p.add_argument('--amp', action='store_true', help='bfloat16 autocast on --device (default: off, float32)')
    p.add_argument('--channels-last', action='store_true', help='channels_last memory format (default: off)')
    p.add_argument('--json', action='store_true',
                   help='print the full result as JSON on stdout instead of the one-line summary (default: off)')
    p.add_argument('--out', default=None, help='write the result as JSON here (default: not written)')
    p.set_defaults(func=cmd_eval)

    p = add('inspect', 'print (and plot) the learned lambda of every SPE block',
            'timm-spe inspect resnet164_spe --plot spe_lambda.png')
    model_args(p)
    p.add_argument('--plot', default=None, help="write a PNG plot here; needs pip install 'timm-spe[plot]' "
                                                "(default: no plot)")
    p.set_defaults(func=cmd_inspect)

    p = add('convert', "convert a checkpoint (e.g. the authors' official one) to safetensors",
            'timm-spe convert model_best.pth.tar --model resnet164_spe.cifar10 --out resnet164_spe.safetensors')
    p.add_argument('src', help='official SPEM checkpoint (model_best.pth.tar), train.py checkpoint or safetensors')
    p.add_argument('--model', required=True,
                   help='target model, optionally MODEL.TAG, recorded in config.json (required)')
    p.add_argument('--out', required=True,
                   help='FILE.safetensors, or a folder: model.safetensors + config.json, timm local-dir: format '
                        '(required)')
    p.add_argument('--ema', action='store_true', help="use a train.py checkpoint's state_dict_ema (default: off)")
    p.add_argument('--force', action='store_true',
                   help='replace an existing output file / non-empty folder (default: off)')
    p.set_defaults(func=cmd_convert)

    p = add('publish', 'stage a Hub folder (safetensors + config.json + card) and upload it',
            'timm-spe publish last.pth.tar --model resnet164_spe --tag cifar10 --eval-json eval.json --dry-run',
            'timm-spe publish last.pth.tar --model resnet164_spe --tag cifar10 --eval-json eval.json --create-pr')
    p.add_argument('src', help='train.py checkpoint, safetensors file or official SPEM checkpoint')
    p.add_argument('--model', required=True, help='model name, e.g. resnet164_spe (required)')
    p.add_argument('--tag', required=True, help='pretrained tag, e.g. cifar10 or cifar10_e30 (required)')
    p.add_argument('--ema', action='store_true', help="use a train.py checkpoint's state_dict_ema (default: off)")
    p.add_argument('--eval-json', default=None,
                   help='result of `timm-spe eval --out` for the card (default: none, the card says "Not evaluated")')
    p.add_argument('--recipe', default='', help='recipe used (default: from the train.py checkpoint)')
    p.add_argument('--budget', default='', help='training budget actually used, free text (default: from the '
                                                'train.py checkpoint)')
    p.add_argument('--figure', action='append', default=[],
                   help='PNG[:caption] to include in the card; repeatable (default: none)')
    p.add_argument('--template', default=None,
                   help="card template with $name placeholders (default: the package's templates/hub_card.md)")
    p.add_argument('--out', default=None,
                   help='staging folder (default: hub_cards/<model>.<tag> in a clone, else ./<model>.<tag>)')
    p.add_argument('--force', action='store_true', help='replace a non-empty staging folder (default: off)')
    p.add_argument('--dry-run', action='store_true', help='stage only, do not upload (default: off)')
    upload_args(p, repo_default="timm-spe/<model>.<tag> for a registered tag, else required")
    p.set_defaults(func=cmd_publish)

    p = add('upload', 'upload a folder staged by `publish --dry-run` or `finish-run`',
            'timm-spe upload hub_cards/resnet164_spe.cifar10_e30 --create-pr --commit-message "30-epoch weights"')
    p.add_argument('folder', help='the staged folder (model.safetensors, config.json, README.md...)')
    upload_args(p, repo_default="timm-spe/<model>.<tag> of config.json's architecture and tag")
    p.set_defaults(func=cmd_upload)

    p = add('run', "run one of timm's scripts (validate.py, train.py, inference.py...) with the SPE models "
                   "registered",
            'timm-spe run pytorch-image-models/validate.py --model resnet164_spe --pretrained --data-dir '
            'data/cifar10-jpeg/test --device cpu -b 100')
    p.add_argument('script', help="path to the script, e.g. a clone's pytorch-image-models/validate.py")
    p.add_argument('script_args', nargs=argparse.REMAINDER, help="the script's own arguments, passed unchanged")
    p.set_defaults(func=cmd_run)

    p = add('run-status', "one line: epoch, train loss and top-1 of a run's last completed epoch",
            'timm-spe run-status train_runs/resnet164_spe-cifar10_e30 --recipe train_recipes/resnet164_spe-cifar10_e30.yaml',
            'timm-spe run-status train_runs/resnet164_spe-cifar10_e30 --plot curve.png')
    p.add_argument('run_dir', help='the run folder, e.g. train_runs/resnet164_spe-cifar10_e30')
    p.add_argument('--recipe', default=None, help='its recipe, for the scheduled epoch count (default: none)')
    p.add_argument('--prefix', default='', help='text printed before the status (default: none)')
    p.add_argument('--plot', default=None, metavar='PNG',
                   help='also plot the curve so far (loss per logged step and epoch, test top-1 per epoch) to PNG '
                        '(default: none)')
    p.set_defaults(func=cmd_run_status)

    p = add('finish-run', 'eval + plots + staged Hub folder for a finished train.py run',
            'timm-spe finish-run --recipe train_recipes/resnet164_spe-cifar10_e30.yaml')
    p.add_argument('--recipe', required=True, help='the recipe YAML the run was trained with (required)')
    p.add_argument('--run-dir', default=None,
                   help="default: the recipe's <output>/<experiment>, or train_runs/<recipe file name> for run.sh")
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
                   help="also write the table into the README (between its spe-comparison markers) and into both "
                        "folders' cards (default: off, print only)")
    p.add_argument('--readme', default=None, help="with --write: the README to write into (default: the clone's "
                                                   "README.md)")
    p.add_argument('--plot', default=None, metavar='PNG',
                   help="also draw both runs' per-epoch losses and test top-1 from their staged summary.csv into PNG "
                        "(default: no plot)")
    p.set_defaults(func=cmd_compare)
    return parser


def _needs_matplotlib(args) -> bool:
    return args.command == 'finish-run' or (args.command in ('inspect', 'run-status', 'compare') and bool(args.plot))


# --- errors: one line on stderr, with the fix; the traceback only with --debug ---------------------------------

_TOKEN_LIKE = re.compile(r"""(hf_[A-Za-z0-9]{16,}|api_org_[A-Za-z0-9]{16,})"""
                         r"""|((?i:authorization['"]?\s*[:=]\s*['"]?(?:bearer\s+)?|bearer\s+))[^\s'",]+""")


def _scrub(text: str) -> str:
    """``text`` without anything token-like: the token of HF_TOKEN / HUGGING_FACE_HUB_TOKEN, ``hf_...`` /
    ``api_org_...`` strings, ``Bearer ...`` / ``Authorization: ...`` values."""
    for var in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN'):
        token = (os.environ.get(var) or '').strip()
        if len(token) >= 4:
            text = text.replace(token, '***')
    return _TOKEN_LIKE.sub(lambda m: m.group(2) + '***' if m.group(2) else 'hf_***', text)


def _one_line(text: str, limit: int = 2000) -> str:
    text = ' '.join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + '...'


def _network_error_types() -> tuple:
    types = [ConnectionError, TimeoutError, socket.gaierror]
    for module, names in (('httpx2', ('TransportError',)), ('httpx', ('TransportError',)),
                          ('requests', ('ConnectionError', 'Timeout'))):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        types += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(types)


def _is_network_error(e: BaseException, chain: bool = False) -> bool:
    """``e`` (with ``chain``: or its cause / context) is a failure to reach a server."""
    for err in (e, e.__cause__, e.__context__) if chain else (e,):
        if err is None or isinstance(err, HfHubHTTPError):  # an answer from the server, not a network failure
            continue
        if isinstance(err, _network_error_types()) or (
                isinstance(err, OSError) and err.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN)):
            return True
    return False


def _hub_http_message(e: HfHubHTTPError) -> str:
    """Built here, never from the exception's text (a server may echo request headers)."""
    status = getattr(getattr(e, 'response', None), 'status_code', None)
    fix = '`hf auth login` or HF_TOKEN'
    if status == 401:
        return (f"the Hub rejected the token (HTTP 401 Unauthorized: invalid, expired or revoked): log in again "
                f"with {fix} using a token with write access.")
    if status == 403:
        return (f"the token may not do this (HTTP 403 Forbidden): use a token with write access to the repo's "
                f"organisation ({fix}), pass --repo-id ORG/NAME of a namespace you can write to, or --create-pr.")
    if status == 404:
        return (f"the Hub has no such repo, branch or file, or the token may not see it (HTTP 404): check --repo-id "
                f"/ --revision and that the token ({fix}) belongs to an account with access.")
    if status == 429:
        return 'the Hub is rate-limiting these requests (HTTP 429 Too Many Requests): wait a few minutes and retry.'
    if status is not None and status >= 500:
        return (f"the Hub failed to answer (HTTP {status}): retry later (HF_ENDPOINT is {hf_constants.ENDPOINT}).")
    said = _one_line(_scrub(str(getattr(e, 'server_message', None) or '')), 200)
    return (f"the Hub refused the request (HTTP {status}{': ' + said if said else ''}): check --repo-id / --revision "
            f"and the token ({fix}).")


def _error_message(e: BaseException) -> str:
    """The one-line message, with the fix, of an exception a command may raise."""
    if isinstance(e, LocalTokenNotFoundError):
        return NO_TOKEN_MESSAGE
    if isinstance(e, OfflineModeIsEnabled):
        return (f"the Hub cannot be reached in offline mode (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '1')}): "
                f"unset HF_HUB_OFFLINE to upload, or stage only (publish --dry-run) and `timm-spe upload` later.")
    if isinstance(e, HfHubHTTPError):
        return _hub_http_message(e)
    if _is_network_error(e):
        return (f"cannot reach the Hugging Face Hub at {hf_constants.ENDPOINT} ({type(e).__name__}): check the "
                f"network connection and HF_ENDPOINT / proxy settings, then retry; a staged folder can be uploaded "
                f"later with `timm-spe upload DIR`.")
    if isinstance(e, SafetensorError):
        return (f"not a readable safetensors file ({e}): it is truncated or corrupt; write it again (timm-spe "
                f"convert) or download it again.")
    if isinstance(e, KeyError):
        return f'missing entry {e} (rerun with --debug for the traceback).'
    if isinstance(e, (FileNotFoundError, FileExistsError, ValueError, RuntimeError)) and str(e):
        return str(e)  # our own checks' messages (they name the fix)
    if _is_network_error(e, chain=True):
        return _error_message(ConnectionError())
    if isinstance(e, OSError):
        return f'{e} (rerun with --debug for the traceback).'
    return f'unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback, and please report it).'


def _fail(command: str, message: str, debug: bool) -> None:
    """Exit 1 with ``timm-spe COMMAND: error: MESSAGE`` (one line, token-free) on stderr; with ``debug`` the
    traceback of the exception being handled comes first."""
    if debug:
        sys.stderr.write(_scrub(traceback.format_exc()))
        sys.stderr.flush()
    raise SystemExit(f'timm-spe {command}: error: {_one_line(_scrub(message))}')


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.command == 'run':  # the script owns its errors and exit status
        args.argv = argv
        return args.func(args)
    debug = bool(getattr(args, 'debug', False))
    args.argv = [a for a in argv if a != '--debug']  # the recorded command (eval JSON) is the same either way
    try:
        if _needs_matplotlib(args) and importlib.util.find_spec('matplotlib') is None:
            raise SystemExit("plotting needs matplotlib: pip install 'timm-spe[plot]'")
        if getattr(args, 'tag', None) is not None:  # publish / finish-run
            validate_tag(args.tag)
        args.func(args)
    except SystemExit as e:  # a command's own refusal: its message is the line
        if e.code is None or isinstance(e.code, int):
            raise
        _fail(args.command, str(e.code), debug)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line (the traceback with --debug)
        _fail(args.command, _error_message(e), debug)


if __name__ == '__main__':
    main(sys.argv[1:])
