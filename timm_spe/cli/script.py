""" ``timm-spe run``: one of timm's scripts (validate.py, train.py...) with the SPE models registered """
import argparse
import runpy
import sys
from functools import partial
from pathlib import Path

from ._common import add_command


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


def register(subparsers) -> None:
    """Add ``run`` to ``timm-spe``'s subparsers."""
    add = partial(add_command, subparsers)
    p = add('run', "run one of timm's scripts (validate.py, train.py, inference.py...) with the SPE models "
                   "registered",
            'timm-spe run pytorch-image-models/validate.py --model resnet164_spe --pretrained --data-dir '
            'data/cifar10-jpeg/test --device cpu -b 100')
    p.add_argument('script', help="path to the script, e.g. a clone's pytorch-image-models/validate.py")
    p.add_argument('script_args', nargs=argparse.REMAINDER, help="the script's own arguments, passed unchanged")
    p.set_defaults(func=cmd_run)
