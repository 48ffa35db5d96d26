"""The benchmarks' timer: workloads timed round-robin, their summaries, per-round ratios, and how timings print."""
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List


def timed_interleaved(fns: Dict[str, Callable[[], None]], warmup: int, repeats: int) -> Dict[str, Dict[str, float]]:
    """Time several workloads round-robin (one run of each per repeat), so that drift in machine state
    (other load, frequency, the allocator's state) falls on all of them alike. The order rotates by one
    each round, so no workload always runs after the same one (whose leftover cache and heap state it
    would otherwise always inherit)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    keys = list(fns)
    times: Dict[str, List[float]] = {key: [] for key in keys}
    for round_index in range(repeats):
        shift = round_index % len(keys)
        for key in keys[shift:] + keys[:shift]:
            t0 = time.perf_counter()
            fns[key]()
            times[key].append(time.perf_counter() - t0)
    return {key: summarize(t) for key, t in times.items()}


def summarize(times: List[float]) -> Dict[str, object]:
    """Median, min and max in ms, and every timing in run order (``times_ms``, for per-round ratios)."""
    return {'median_ms': 1e3 * statistics.median(times), 'min_ms': 1e3 * min(times), 'max_ms': 1e3 * max(times),
            'times_ms': [1e3 * t for t in times]}


def per_round_ratios(times: Dict[str, object], base: Dict[str, object]) -> Dict[str, float]:
    """Median (min, max) over rounds of ``time / base time`` in the same round of :func:`timed_interleaved`:
    drift between rounds cancels in each pair, which the ratio of the two medians does not do."""
    ratios = [t / b for t, b in zip(times['times_ms'], base['times_ms'])]
    return {'median': statistics.median(ratios), 'min': min(ratios), 'max': max(ratios)}


def timed(fn: Callable[[], object]) -> float:
    """Seconds of one call of ``fn``."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def fmt(t: Dict[str, float]) -> str:
    return f"{t['median_ms']:9.1f} ({t['min_ms']:.1f}-{t['max_ms']:.1f})"


def fmt_fine(t: Dict[str, float]) -> str:
    """As :func:`fmt`, with the decimals a sub-millisecond median needs (one small op takes microseconds)."""
    d = 3 if t['median_ms'] < 0.1 else 2 if t['median_ms'] < 1 else 1
    return f"{t['median_ms']:.{d}f} ({t['min_ms']:.{d}f}-{t['max_ms']:.{d}f})"


def fmt_ratio(q: Dict[str, float]) -> str:
    return f"{q['median']:.3f} ({q['min']:.3f}-{q['max']:.3f})"


def write_result(path: str, result: Dict) -> None:
    """A mode's JSON (``--out``), its folder made if need be."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1))
