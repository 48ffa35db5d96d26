""" ``timm-spe publish`` (stage a Hub folder and upload it) and ``timm-spe upload`` (a folder staged earlier) """
import json
import shlex
from functools import partial
from pathlib import Path
from typing import Optional, Tuple

import timm

from .._paths import REPO_ROOT
from ..card import portable_eval_result, registered_cfg, render_card
from ..convert import load_checkpoint_file, load_weights
from ..hub import (
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
from ..registry import default_hub_repo_id
from ._common import _check_classes, add_command


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
    cards = REPO_ROOT / 'hub_cards'
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
                           repo_id=repo_id, training_files=sorted(records),
                           best_epoch=getattr(args, 'best_epoch', None))

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
        print(_dry_run_line(staged, model_tag, repo_id, given=bool(args.repo_id)))
        return staged
    _upload(staged, repo_id, args, api)
    return staged


def _dry_run_line(staged: Path, model_tag: str, repo_id: Optional[str], given: bool) -> str:
    """How to upload what a dry run staged: ``timm-spe upload`` of the folder, whose card already names the repo
    (publishing again without --dry-run would meet the now non-empty --out)."""
    folder = shlex.quote(str(staged))
    if repo_id:
        return (f'dry run: nothing uploaded. Upload the staged folder to {repo_id} with `timm-spe upload {folder}'
                + (f' --repo-id {repo_id}' if given else '') + '`.')
    return (f"dry run: nothing uploaded. '{model_tag}' is not a registered tag, so uploading needs --repo-id ORG/NAME: "
            f"`timm-spe upload {folder} --repo-id {default_hub_repo_id(model_tag)}` uploads it to the repo its card "
            f"names (for another repo, stage it again with `timm-spe publish ... --repo-id ORG/NAME --force`).")


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


def register(subparsers) -> None:
    """Add ``publish`` and ``upload`` to ``timm-spe``'s subparsers."""
    add = partial(add_command, subparsers)
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
