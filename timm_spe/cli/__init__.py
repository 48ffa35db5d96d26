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
import importlib.util
import sys
from typing import List, Optional

import timm_spe  # noqa: F401  (registers the models)

from ..hub import validate_tag
from ..version import __version__
from . import convert, evaluate, publish, runs, script
from ._common import DEBUG_HELP, _HelpFormatter
from .errors import _error_message, _fail


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='timm-spe', description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}',
                        help='print the timm-spe version and exit')
    parser.add_argument('--debug', action='store_true', help=DEBUG_HELP)
    sub = parser.add_subparsers(dest='command', required=True)
    for commands in (evaluate, convert, publish, script, runs):  # the order `timm-spe --help` lists them in
        commands.register(sub)
    return parser


def _needs_matplotlib(args) -> bool:
    return args.command == 'finish-run' or (args.command in ('inspect', 'run-status', 'compare') and bool(args.plot))


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

