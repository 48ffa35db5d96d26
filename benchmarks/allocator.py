"""The CPU memory allocator: the settings a run records (``meta.allocator``), and ``--compare`` of two runs' medians
(e.g. glibc's defaults against ``./run.sh bench``'s freed memory kept)."""
import json
import os
from pathlib import Path
from typing import Dict

from benchmarks.workloads import CHANNELS_LAST, KERNELS

COMPARED = ('resnet164', 'resnet164_spe', 'resnet164_spe' + KERNELS, 'resnet164' + CHANNELS_LAST,
            'resnet164_spe' + CHANNELS_LAST, 'resnet164_spe' + KERNELS + CHANNELS_LAST)  # rows of --compare


def allocator_settings() -> Dict[str, str]:
    """The environment variables that change how this process allocates memory (glibc malloc tunables, a
    preloaded allocator): on CPU they change train-step times a lot (README, "CPU memory allocator")."""
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith('MALLOC_') or k in ('GLIBC_TUNABLES', 'LD_PRELOAD')}


def fmt_allocator(settings: Dict[str, str]) -> str:
    return ' '.join(f'{k}={v}' for k, v in settings.items()) if settings else 'glibc malloc defaults'


def compare_table(before: Dict, after: Dict) -> str:
    """Markdown table of two runs' median times for resnet164 and resnet164_spe (both memory formats; with the CPU
    kernels too where both runs have them) and the
    speed-up from the first to the second; columns are named by each run's allocator settings."""
    lines = [f"| ms, median | {fmt_allocator(before['meta']['allocator'])} ({before['meta']['date']}) "
             f"| {fmt_allocator(after['meta']['allocator'])} ({after['meta']['date']}) | speed-up |", '|---|---:|---:|---:|']
    for name in (n for n in COMPARED if n in before['models'] and n in after['models']):
        for kind in ('eval_forward', 'train_step'):
            a, b = before['models'][name][kind]['median_ms'], after['models'][name][kind]['median_ms']
            lines.append(f"| {name}, {kind.replace('_', ' ')} | {a:.0f} | {b:.0f} | {a / b:.2f}x |")
    return '\n'.join(lines)


def run_compare(args) -> None:
    """``--compare BEFORE.json AFTER.json``: print :func:`compare_table` of the two result files."""
    before, after = (json.loads(Path(f).read_text()) for f in args.compare)
    print(compare_table(before, after))
