"""ATen ops an SPE block adds over the plain block in a train step: what every extra kernel launch costs on a GPU.

    python benchmarks/count_ops.py [--out F.json]

Counts, with a ``TorchDispatchMode``, the ops one inner block of each resnet164 stage (at that stage's map size,
batch 2) dispatches in forward + backward, for resnet164_spe and resnet164_se against resnet164, in float32 and under
bfloat16 autocast, NCHW and channels_last, with the CPU kernels off: the code CUDA runs (the count does not depend on
the device or the batch). The CUDA goal: at most 30 extra ops per SPE block (SE: 24). The last column counts
resnet164_spe on the Triton kernels of its block tail (the CUDA default where Triton runs; switched on here,
``timm_spe.set_triton_kernels(True)``), run by Triton's interpreter: each of their ops is one kernel launch (the
counter watches the ops, so they go through their custom ops, as under ``torch.compile``).
"""
import argparse
import json
import os
import sys
from pathlib import Path

# Triton's interpreter runs the kernels on CPU tensors; Triton reads this when torch imports it
os.environ.setdefault('TRITON_INTERPRET', '1')

import timm  # noqa: E402
import torch  # noqa: E402

if not __package__:  # run as a file: the package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timm_spe  # noqa: E402,F401  (registers the models)
from benchmarks.profile_step import aten_ops  # noqa: E402


def block_ops(model_name: str, stage: str, size: int, dtype=None, channels_last: bool = False) -> int:
    """Ops of one forward + backward of the middle block of ``stage`` on a 2 x C x size x size input (after one
    uncounted call), under CPU autocast to ``dtype`` (None: float32)."""
    torch.manual_seed(0)
    blocks = getattr(timm.create_model(model_name).train(), stage)
    block = blocks[len(blocks) // 2]
    # under autocast a block's input is the previous block's output: in the low-precision dtype
    x = torch.randn(2, block.conv1.in_channels, size, size, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    x.requires_grad_()

    def step():
        with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = block(x)
        out.backward(torch.ones_like(out))

    step()
    return aten_ops(step)


def _extra_ops(name, triton, stages, dtype, channels_last, plain) -> list:
    """``name``'s ops per block, stage by stage, minus ``plain`` (resnet164's in the same setting)."""
    with timm_spe.set_triton_kernels(triton):
        return [block_ops(name, s, n, dtype, channels_last) - base for (s, n), base in zip(stages, plain)]


def count_table() -> dict:
    """``{setting: {model: [extra ops per block, layer1 / layer2 / layer3]}}`` with the CPU kernels off."""
    timm_spe.set_cpu_kernels(False)
    stages = (('layer1', 32), ('layer2', 16), ('layer3', 8))
    table = {}
    for dtype in (None, torch.bfloat16):
        for channels_last in (False, True):
            setting = f"{'float32' if dtype is None else 'bfloat16 autocast'}, {'channels_last' if channels_last else 'NCHW'}"
            plain = [block_ops('resnet164', s, n, dtype, channels_last) for s, n in stages]  # once per setting
            table[setting] = {label: _extra_ops(name, triton, stages, dtype, channels_last, plain)
                              for label, name, triton in (('resnet164_spe', 'resnet164_spe', False),
                                                          ('resnet164_se', 'resnet164_se', False),
                                                          ('resnet164_spe, Triton kernels', 'resnet164_spe', True))}
    return table


def markdown_table(table: dict) -> str:
    """The table benchmarks/README.md shows (CUDA section), from :func:`count_table`'s ``table``."""
    names = list(next(iter(table.values())))
    lines = ['| extra ATen ops per block (layer1 / layer2 / layer3) | ' + ' | '.join(names) + ' |',
             '|---' * (len(names) + 1) + '|']
    for setting, row in table.items():
        lines.append(f'| {setting} | ' + ' | '.join(' / '.join(map(str, row[name])) for name in names) + ' |')
    return '\n'.join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--out', help='also write the counts as JSON here')
    args = ap.parse_args(argv)
    table = count_table()
    print('extra ATen ops per block over resnet164 (forward + backward; layer1 32x32 / layer2 16x16 / layer3 8x8)')
    for setting, row in table.items():
        print(f'{setting}: ' + '; '.join(f"{name} {' / '.join(map(str, counts))}" for name, counts in row.items()))
    if args.out:
        with open(args.out, 'w') as f:
            json.dump({'torch': torch.__version__, 'timm': timm.__version__, 'extra_ops_per_block': table}, f,
                      indent=1)


if __name__ == '__main__':
    main()
