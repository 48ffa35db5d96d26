"""The model table of docs/models.md: parameters and GMACs (32x32, batch 1) of every registered CIFAR model.

    python benchmarks/model_table.py            # print the markdown table
    python benchmarks/model_table.py --readme   # rewrite the table between the markers of docs/models.md

MACs are counted with torch.utils.flop_counter (convolutions and matmuls; elementwise work such as
BN, ReLU and the attention gates is not counted) as FLOPs / 2.
"""
import argparse
import re
from pathlib import Path
from typing import Dict, List

import timm
import torch

import timm_spe
from timm_spe.card import model_complexity

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = '<!-- model-table:begin -->', '<!-- model-table:end -->'
TARGET = ROOT / 'docs' / 'models.md'  # the file whose markers --readme rewrites


def model_stats(name: str, num_classes: int = 10) -> Dict[str, float]:
    return model_complexity(name, num_classes)


def num_params(name: str, num_classes: int) -> int:
    """Parameters only (no forward): the CIFAR-100 column needs no MAC count."""
    with torch.random.fork_rng(devices=[]):
        return sum(p.numel() for p in timm.create_model(name, num_classes=num_classes).parameters())


def table() -> str:
    rows: List[str] = [
        '| model | attention | params (CIFAR-10) | params (CIFAR-100) | GMACs @ 32x32 |',
        '|---|---|---:|---:|---:|',
    ]
    for depth in timm_spe.CIFAR_DEPTHS:
        for attn in timm_spe.resnet.CIFAR_ATTN_LAYERS:
            name = timm_spe.resnet.cifar_model_name(depth, attn)
            s10 = model_stats(name, 10)
            rows.append(
                f"| `{name}` | {attn.upper() or '-'} | {s10['params'] / 1e6:.3f}M | {num_params(name, 100) / 1e6:.3f}M "
                f"| {s10['gmacs']:.3f} |")
    return '\n'.join(rows)


def update_readme(text: str, new_table: str) -> str:
    pattern = re.compile(re.escape(BEGIN) + '.*?' + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f'{TARGET.relative_to(ROOT)} has no {BEGIN} ... {END} block')
    return pattern.sub(f'{BEGIN}\n{new_table}\n{END}', text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--readme', action='store_true', help='write the table into docs/models.md')
    args = parser.parse_args()
    t = table()
    if args.readme:
        readme = TARGET
        readme.write_text(update_readme(readme.read_text(), t))
    print(t)


if __name__ == '__main__':
    main()
