"""List the argument names (argparse dests) that timm's train.py accepts, for the recipe tests.

train.py silently ignores unknown YAML keys, so tests/test_recipes.py checks every recipe key against
this list. Regenerate it when the pinned timm changes, from train.py of the matching release:

    python train_recipes/list_train_args.py path/to/pytorch-image-models/train.py > tests/data/train_args.txt
"""
import ast
import sys
from typing import List


def train_args(source: str) -> List[str]:
    """``dest`` of every ``*.add_argument(...)`` call in ``source`` (argparse's naming rules)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and getattr(node.func, 'attr', None) == 'add_argument'):
            continue
        dest = next((k.value.value for k in node.keywords if k.arg == 'dest'), None)
        flags = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        if dest is None and flags:
            long = [f for f in flags if f.startswith('--')]
            dest = (long[0] if long else flags[0]).lstrip('-').replace('-', '_')
        if dest:
            names.add(dest)
    return sorted(names)


if __name__ == '__main__':
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    with open(sys.argv[1]) as f:
        src = f.read()
    print(f'# argparse dests of timm train.py ({sys.argv[1].split("/")[-1]}), by train_recipes/list_train_args.py')
    print('\n'.join(train_args(src)))
