"""timm-spe's benchmarks (benchmarks/README.md), a package so that the tests and the scripts share one code.

Run the scripts as files from the repository root (``python benchmarks/benchmark.py --help``; ``./run.sh bench``);
import the package with the root on ``sys.path`` (pytest's ``pythonpath`` in pyproject.toml):
``from benchmarks.spe_reference import UnfusedSpeReference``. The committed runs are in ``benchmarks/results/``.

- ``benchmark.py``: the CPU benchmark's command line; its modes live in ``full_run`` (the default run), ``pairs``
  (``--models``), ``primitives`` (``--primitives``), ``compiled`` (``--compile``), ``goals`` (``--pool``) and
  ``allocator`` (``--compare``), on ``workloads`` (the models and their timed steps), ``memory`` and ``timing``
  (the interleaved timer);
- ``spe_reference.py``: SPE written out plainly, the reference of the tests and the benchmark's unfused model;
- ``profile_step.py``, ``cuda_check.py``, ``cuda_profile.py``, ``host_overhead.py``, ``model_table.py``: scripts of
  their own.
"""
