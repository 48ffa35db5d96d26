"""Run every recipe with the real timm train.py on a tiny CIFAR-10 subset, on CPU.

Checks that each recipe starts, runs training steps and writes a checkpoint. Only the data
(a 2-step epoch of the CIFAR-10 JPEG copy instead of torchvision's download), device, epoch count,
batch size and workers are overridden; everything else comes from the recipe.

    python train_recipes/verify_recipes.py --train-py path/to/pytorch-image-models/train.py \
        [--cifar-tar ../shared/data/cifar10-jpeg.tar.gz] [--out output/verify] [RECIPE ...]
"""
import argparse
import json
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Dict, List

from tqdm import tqdm

HERE = Path(__file__).resolve().parent


def make_subset(cifar_tar: Path, out: Path, per_class: int = 4) -> Path:
    """Extract ``per_class`` images per class of each split into ``out/{train,test}/<class>/``."""
    counts: Dict[str, int] = {}
    with tarfile.open(cifar_tar) as tar:
        for member in tar:
            parts = Path(member.name).parts  # cifar10-jpeg/<split>/<class>/<file>
            if not member.isfile() or len(parts) != 4 or parts[1] not in ('train', 'test'):
                continue
            key = f'{parts[1]}/{parts[2]}'
            if counts.get(key, 0) >= per_class:
                continue
            counts[key] = counts.get(key, 0) + 1
            dst = out / parts[1] / parts[2] / parts[3]
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(tar.extractfile(member).read())
    if len(counts) != 20:
        raise SystemExit(f'{cifar_tar} does not look like the CIFAR-10 JPEG copy (found {sorted(counts)})')
    return out


def run_recipe(train_py: Path, recipe: Path, data: Path, out: Path) -> Dict[str, object]:
    name = recipe.stem
    cmd = [
        sys.executable, str(train_py), '--config', str(recipe),
        '--dataset', '', '--data-dir', str(data), '--train-split', 'train', '--val-split', 'test',
        '--device', 'cpu', '--epochs', '1', '-b', '16', '-vb', '20', '--workers', '1', '--log-interval', '1',
        '--output', str(out), '--experiment', name,
    ]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    (out / f'{name}.log').write_text(log)
    steps = len(re.findall(r'Train: 0 \[', log))
    ckpts = sorted(p.name for p in (out / name).glob('*.pth.tar')) if (out / name).exists() else []
    ok = proc.returncode == 0 and steps >= 1 and 'last.pth.tar' in ckpts
    return {'recipe': recipe.name, 'ok': ok, 'returncode': proc.returncode, 'logged_steps': steps,
            'checkpoints': ckpts, 'seconds': round(time.time() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('recipes', nargs='*', type=Path, help='recipes to run (default: all)')
    parser.add_argument('--train-py', type=Path, required=True, help="timm's train.py (pytorch-image-models v1.0.28)")
    parser.add_argument('--cifar-tar', type=Path, default=HERE.parent.parent / 'shared/data/cifar10-jpeg.tar.gz')
    parser.add_argument('--out', type=Path, default=Path('output/verify'))
    args = parser.parse_args()
    if not args.train_py.is_file():
        raise SystemExit(f'--train-py {args.train_py} is not a file: clone pytorch-image-models at v1.0.28')
    recipes: List[Path] = args.recipes or sorted(HERE.glob('*.yaml'))
    args.out.mkdir(parents=True, exist_ok=True)
    data = make_subset(args.cifar_tar, args.out / 'data')
    results = [run_recipe(args.train_py, r, data, args.out) for r in tqdm(recipes, desc='recipes')]
    (args.out / 'verify.json').write_text(json.dumps(results, indent=1))
    print('| recipe | result | logged steps | checkpoints | seconds |\n|---|---|---:|---|---:|')
    for r in results:
        print(f"| {r['recipe']} | {'ok' if r['ok'] else 'FAILED rc=%s' % r['returncode']} | {r['logged_steps']} "
              f"| {', '.join(r['checkpoints'])} | {r['seconds']} |")
    if not all(r['ok'] for r in results):
        raise SystemExit(f'some recipes failed; logs in {args.out}')


if __name__ == '__main__':
    main()
