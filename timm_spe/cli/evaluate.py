""" ``timm-spe eval`` (top-1/top-5/loss on a CIFAR test split) and ``timm-spe inspect`` (the learned lambdas) """
import json
from functools import partial
from pathlib import Path
from typing import List

import torch
from timm.models import split_model_name_tag

from ..evaluate import evaluate
from ..hub import sha256_file, weights_sha256
from ..plots import plot_lambdas, spe_lambdas
from ._common import _command, _create, add_command


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


def model_args(p, checkpoint_flag='--checkpoint'):
    p.add_argument('model', help='model name, optionally with a pretrained tag (resnet164_spe.cifar10_e30)')
    p.add_argument(checkpoint_flag, default=None,
                   help='weights: safetensors, train.py checkpoint or official SPEM checkpoint '
                        "(default: the tag's pretrained weights: shipped in the package, else from the Hub)")
    p.add_argument('--ema', action='store_true', help="use a train.py checkpoint's state_dict_ema (default: off)")


def register(subparsers) -> None:
    """Add ``eval`` and ``inspect`` to ``timm-spe``'s subparsers."""
    add = partial(add_command, subparsers)
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
