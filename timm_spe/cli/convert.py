""" ``timm-spe convert``: any supported checkpoint to safetensors (never a pickle)

Named like ``timm_spe.convert`` (the checkpoint readers it uses): inside this package that module is ``..convert``.
"""
from functools import partial
from pathlib import Path

from safetensors.torch import save_file
from timm.models import split_model_name_tag
from timm.models._hub import save_for_hf

from ._common import _create, add_command


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


def register(subparsers) -> None:
    """Add ``convert`` to ``timm-spe``'s subparsers."""
    add = partial(add_command, subparsers)
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
