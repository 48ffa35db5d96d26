#!/usr/bin/env bash
# timm-spe: one entry point for a fresh machine (each command sets up what it needs first).
#   ./run.sh test                 set up .venv, lint (ruff), run the whole test suite on the lowest timm
#                                 (TIMM_VERSION), then the fast tier on the newest (TIMM_NEWEST; .venv-timm-newest):
#                                 what CI runs; fails if either tier fails
#   ./run.sh test-fast            the suite without the tests marked slow (a few minutes; while working)
#   ./run.sh test-newest [PYTEST ARGS]
#                                 only the fast tier on the newest timm (default: -m "not slow" tests)
#   ./run.sh train [--dry-run] [RECIPE.yaml] [train.py args]
#                                 set up, train with timm's train.py in runs/<recipe>/ (git-ignored; resuming from
#                                 its checkpoint if it has one), evaluate the final epoch, stage the Hub folder in
#                                 runs/<recipe>/hub_folder/. First prints the expected time per epoch, from the
#                                 record train_runs/<recipe>/train.log where the recipe has one; --dry-run only
#                                 prints that and the command. Default recipe: resnet164_spe's cifar10_e164 (the
#                                 paper's 164 epochs). A finished run is reported, never trained over.
#                                 train_runs/ holds the committed records of how the shipped weights were made
#   ./run.sh bench [ARGS]         set up and run benchmarks/benchmark.py (default: the README's run) with the
#                                 allocator settings train uses
#   ./run.sh setup                only create/update .venv
# Environment: VENV (default .venv); TIMM_NEWEST (test: the newer timm, default the release pinned in this file)
# and TIMM_NEWEST_VENV (its environment, default .venv-timm-newest); TIMM_TRAIN_PY (an existing train.py of timm
# v1.0.28; else the pytorch-image-models repo is cloned at that tag into .cache/); CIFAR10_JPEG_TAR (the CIFAR-10 JPEG
# copy, default ../shared/data/cifar10-jpeg.tar.gz) for the CPU recipe; TIMM_SPE_CPU_KERNELS (train: default 1,
# SPE's one-pass CPU kernels, built on first use); TRAIN_RUNS (train: the folder of the runs, default runs;
# TRAIN_RUNS=train_runs works in the committed records and stages into hub_cards/);
# RUN_SH_SETUP=0 (no set-up: $VENV/bin/python as it is, e.g. a GPU machine's PyTorch; docs/development.md).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
TIMM_VERSION=1.0.28   # the lowest timm pyproject allows; train.py / validate.py and tests/data/train_args.txt match it
# The newest timm in pyproject's range (timm>=1.0.28,<1.1) that PyPI offered when last checked (2026-11-30):
# `./run.sh test` also runs the fast tier against it. Pinned so that CI is reproducible; raise it when timm
# publishes a newer 1.0.x, or override it (TIMM_NEWEST=1.0.32 ./run.sh test-newest). tests/unit/test_versions.py
# checks both pins against pyproject's range.
TIMM_NEWEST=${TIMM_NEWEST:-1.0.31}
NEWEST_VENV=${TIMM_NEWEST_VENV:-${VENV%/}-timm-newest}
NEWEST_PY="$NEWEST_VENV/bin/python"

setup() {
    if [ "${RUN_SH_SETUP:-1}" = 0 ]; then  # an environment made elsewhere (a GPU machine's PyTorch): used as it is
        "$PY" -c 'import torch, timm, timm_spe' 2>/dev/null || { echo "run.sh: RUN_SH_SETUP=0, but $PY cannot import" \
            "torch, timm and timm_spe: set VENV to an environment that has torch and timm, with PYTHONPATH=$PWD" >&2
            exit 1; }
        return
    fi
    [ -x "$PY" ] || python3 -m venv "$VENV"
    "$PY" -m pip install -q --disable-pip-version-check \
        torch==2.14.1 torchvision==0.29.1 "timm==$TIMM_VERSION" -e '.[dev]'
}

# The newest timm's environment without a second torch (after setup): a venv of the same python, without pip,
# whose site-packages holds a .pth line naming $VENV's site-packages, so torch, torchvision, pytest, pip,
# setuptools ... come from there and pip counts them as installed; only timm (plus any dependency $VENV lacks:
# none for 1.0.31) and this project (editable, no dependencies) are installed into it, and they come first on
# sys.path. pip leaves $VENV's own timm alone ("Not uninstalling ... outside environment").
setup_newest() {
    local base site log="$NEWEST_VENV/pip-install.log"
    base=$(cd "$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" && pwd -P)
    if [ -x "$NEWEST_PY" ] && [ "$("$NEWEST_PY" -c 'import sys; print(sys.version)' 2>/dev/null)" != \
            "$("$PY" -c 'import sys; print(sys.version)')" ]; then
        rm -rf "$NEWEST_VENV"  # made by another python than $VENV's: it cannot share $VENV's site-packages
    fi
    [ -x "$NEWEST_PY" ] || "$PY" -m venv --without-pip "$NEWEST_VENV"
    site=$("$NEWEST_PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    echo "$base" > "$site/timm_spe_base_venv.pth"
    : > "$log"
    if [ "$("$NEWEST_PY" -c 'import importlib.metadata as m, sys; d = m.distribution("timm")
print(d.version if str(d.locate_file("")).startswith(sys.prefix + "/") else "")')" != "$TIMM_NEWEST" ]; then
        "$NEWEST_PY" -m pip install --disable-pip-version-check "timm==$TIMM_NEWEST" >>"$log" 2>&1 \
            || { echo "run.sh: could not install timm==$TIMM_NEWEST into $NEWEST_VENV (package index unreachable," \
            "or no such release; pip's output: $log): connect to PyPI, or set TIMM_NEWEST to a timm release pip can" \
            "install" >&2; return 1; }
    fi
    "$NEWEST_PY" -m pip install --disable-pip-version-check --no-deps --no-build-isolation -e . >>"$log" 2>&1 \
        || { echo "run.sh: could not install timm-spe (editable) into $NEWEST_VENV (pip's output: $log)" >&2
             return 1; }
    # console scripts of $VENV's packages (olah-cli for the Hub tests, ...), run by this environment's python;
    # those pip installed here (timm-spe) stay
    local f to mark="# run.sh: a copy of $VENV's script for $NEWEST_VENV"
    for f in "$VENV"/bin/*; do
        to=$NEWEST_VENV/bin/${f##*/}
        [[ -f "$f" && ! -L "$f" && "$(head -c 2 "$f")" == '#!' && "$(head -n 1 "$f")" == *'/bin/python'* ]] || continue
        [ ! -e "$to" ] || [ "$(sed -n 2p "$to")" = "$mark" ] || continue
        { echo "#!$(cd "$NEWEST_VENV" && pwd)/bin/python"; echo "$mark"; tail -n +2 "$f"; } > "$to"
        chmod +x "$to"
    done
    "$NEWEST_PY" -m pip check >>"$log" 2>&1 || { echo "run.sh: $NEWEST_VENV has broken requirements (pip check:" \
        "$log): remove $NEWEST_VENV and rerun" >&2; return 1; }
    "$NEWEST_PY" - "$TIMM_NEWEST" "$NEWEST_VENV" "$base" <<'PY' || return 1
import os, sys
import timm, timm_spe, torch
want, venv, base = sys.argv[1:]
where = {'timm': (timm, venv), 'timm_spe': (timm_spe, os.getcwd()), 'torch': (torch, base)}
wrong = [f'{n} from {m.__file__} (expected under {d})' for n, (m, d) in where.items()
         if not os.path.realpath(m.__file__).startswith(os.path.realpath(d) + os.sep)]
if timm.__version__ != want or wrong:
    sys.exit(f'run.sh: {venv} has timm {timm.__version__} (want {want}); ' + '; '.join(wrong)
             + f': remove {venv} and rerun')
PY
}

# one pytest run; prints its verdict and wall time, returns pytest's status (so that the next tier still runs)
TIERS=()
tier() {
    local name=$1 py=$2 start=$SECONDS rc=0
    shift 2
    echo "== $name"
    "$py" -m pytest -q -p no:cacheprovider --durations=15 "$@" || rc=$?
    TIERS+=("$name: $([ $rc = 0 ] && echo passed || echo "FAILED (pytest exit $rc)") in $((SECONDS - start)) s")
    return $rc
}
tiers_summary() {
    printf 'run.sh: %s\n' "${TIERS[@]}"
}

# glibc malloc hands freed blocks above its mmap threshold (128 KiB rising to at most 32 MiB) back to the OS
# and faults fresh pages in for the next one: CPU training allocates such activations every layer, so train and
# bench keep freed memory in the process instead (README, "CPU memory allocator"). Values already set are kept.
keep_freed_memory() {
    export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-2147483647}"
    export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-2147483647}"
}

train_py() {
    if [ -n "${TIMM_TRAIN_PY:-}" ]; then
        [ -f "$TIMM_TRAIN_PY" ] || { echo "run.sh: TIMM_TRAIN_PY=$TIMM_TRAIN_PY does not exist" >&2; return 1; }
        echo "$TIMM_TRAIN_PY"; return
    fi
    local src=.cache/pytorch-image-models
    if [ ! -f "$src/train.py" ]; then
        command -v git >/dev/null || { echo "run.sh: git is needed to fetch timm's train.py; install git, or set" \
            "TIMM_TRAIN_PY=/path/to/train.py of timm v$TIMM_VERSION" >&2; return 1; }
        rm -rf "$src"
        git clone -q --depth 1 --branch "v$TIMM_VERSION" https://github.com/huggingface/pytorch-image-models "$src" \
            >&2 2>/dev/null || { echo "run.sh: could not clone pytorch-image-models (no network?); set" \
            "TIMM_TRAIN_PY=/path/to/train.py of timm v$TIMM_VERSION" >&2; return 1; }
    fi
    echo "$src/train.py"
}

# The CIFAR-10 of a budget recipe (data_dir: data/cifar10-jpeg): CIFAR10_SOURCE=jpeg (the JPEG q75 copy: data/
# cifar10-jpeg, or unpacked from CIFAR10_JPEG_TAR), torchvision (the original binaries in data/cifar10, downloaded
# if missing), or auto (default: the JPEG copy where present, else torchvision). Other recipes: their own data.
JPEG_TAR=${CIFAR10_JPEG_TAR:-../shared/data/cifar10-jpeg.tar.gz}
data_source() {
    grep -q '^data_dir: data/cifar10-jpeg' "$1" || { echo recipe; return; }
    case "${CIFAR10_SOURCE:-auto}" in
        jpeg|torchvision) echo "$CIFAR10_SOURCE" ;;
        auto) if [ -d data/cifar10-jpeg ] || [ -f "$JPEG_TAR" ]; then echo jpeg; else echo torchvision; fi ;;
        *) echo "run.sh: CIFAR10_SOURCE must be jpeg, torchvision or auto, not '$CIFAR10_SOURCE'" >&2; return 2 ;;
    esac
}
data_args() {  # train.py arguments for the source
    [ "$1" = torchvision ] && echo "--dataset torch/cifar10 --data-dir data/cifar10 --train-split train --val-split test"
    return 0
}
describe_source() {
    case "$1" in
        jpeg) echo "CIFAR-10 (JPEG q75 copy) in data/cifar10-jpeg$([ -d data/cifar10-jpeg ] || echo ", unpacked from $JPEG_TAR")" ;;
        torchvision) echo "CIFAR-10 (original, torchvision) in data/cifar10$([ -d data/cifar10/cifar-10-batches-py ] \
            && echo ", already there" || echo ", downloaded first")" ;;
        *) echo "the recipe's own data_dir/dataset" ;;
    esac
}
prepare_data() {
    case "$1" in
        jpeg)
            [ -d data/cifar10-jpeg ] || { mkdir -p data && tar xzf "$JPEG_TAR" -C data; } ;;
        torchvision)
            [ -d data/cifar10/cifar-10-batches-py ] && return 0
            mkdir -p data/cifar10
            [ "$(df -Pk data | awk 'NR==2 {print $4}')" -gt 1048576 ] || { echo "run.sh: less than 1 GiB free under" \
                "data/ for CIFAR-10 (~340 MB): free some disk space" >&2; return 1; }
            "$PY" -c "import torchvision; torchvision.datasets.CIFAR10('data/cifar10', download=True)" >/dev/null 2>&1 \
                || { echo "run.sh: could not download CIFAR-10 (no network?): put the extracted cifar-10-batches-py" \
                "folder into data/cifar10/, or use the JPEG copy (CIFAR10_JPEG_TAR=...)" >&2; return 1; } ;;
    esac
}

case "${1:-}" in
    setup)
        setup ;;
    test)  # lint, the whole suite on the lowest timm, the fast tier on the newest: what CI runs
        setup
        setup_newest  # before the long tier: a missing index fails in the first minute, not after the suite
        "$PY" -m ruff check .
        status=0
        tier "whole suite, timm $TIMM_VERSION ($VENV)" "$PY" tests || status=1
        tier "fast tier (not slow), timm $TIMM_NEWEST ($NEWEST_VENV)" "$NEWEST_PY" -m "not slow" tests || status=1
        tiers_summary
        exit $status ;;
    test-newest)  # only the fast tier on the newest timm; arguments replace the default selection
        setup
        setup_newest
        shift
        [ $# -gt 0 ] || set -- -m "not slow" tests
        status=0
        tier "timm $TIMM_NEWEST ($NEWEST_VENV): $*" "$NEWEST_PY" "$@" || status=1
        tiers_summary
        exit $status ;;
    test-fast)  # while working: lint, then everything but the tests marked slow
        setup
        "$PY" -m ruff check .
        exec "$PY" -m pytest -q -p no:cacheprovider --durations=15 -m "not slow" tests ;;
    bench)
        setup
        keep_freed_memory
        shift
        [ $# -gt 0 ] || set -- --repeats 15 --out benchmarks/results/results.json --plot benchmarks/results/results.png
        exec "$PY" benchmarks/benchmark.py "$@" ;;
    train)
        shift
        dry_run=0
        if [ "${1:-}" = --dry-run ]; then dry_run=1; shift; fi
        recipe=${1:-train_recipes/resnet164_spe-cifar10_e164.yaml}
        [ $# -gt 0 ] && shift
        [ -f "$recipe" ] || { echo "run.sh train: no recipe $recipe (the recipes are in train_recipes/)" >&2; exit 2; }
        # one folder per recipe holds the run's resume state: runs/<recipe>/ (last.pth.tar, summary.csv, args.yaml,
        # train.log); if it has a checkpoint, train.py resumes after its last completed epoch. train_runs/<recipe>/
        # are the committed records of the shipped weights' runs: the expected time comes from their train.log
        name=$(basename "$recipe" .yaml)
        runs=${TRAIN_RUNS:-runs}
        run_dir=$runs/$name
        record=train_runs/$name/train.log
        resume=()
        # a finished run keeps its records (summary.csv, train.log): a new train.py would append a second run to
        # them, so a folder with all epochs is only resumed while its checkpoint is not staged yet (finish-run
        # below; the records in train_runs/ drop their checkpoint instead), and records without a checkpoint are
        # never trained in
        epochs=$(sed -n 's/^epochs: *\([0-9][0-9]*\) *$/\1/p' "$recipe" | head -n 1)
        done_epochs=0
        [ ! -f "$run_dir/summary.csv" ] \
            || done_epochs=$(awk -F, '$1 ~ /^[0-9]+$/ {e = $1 + 1} END {print e + 0}' "$run_dir/summary.csv")
        if [ -n "$epochs" ] && [ "$done_epochs" -ge "$epochs" ] \
                && { [ ! -f "$run_dir/last.pth.tar" ] || [ -d "$run_dir/hub_folder" ]; }; then
            if [ "$runs" = train_runs ]; then
                echo "run.sh: $run_dir finished all $epochs epochs (a record of the shipped weights, its checkpoint" \
                    "removed; the weights are in hub_cards/, see README 'Results'): to train $recipe anew," \
                    "./run.sh train $recipe (in runs/$name/) or TRAIN_RUNS=DIR ./run.sh train $recipe"
            else
                echo "run.sh: $run_dir finished all $epochs epochs ($([ -d "$run_dir/hub_folder" ] \
                    && echo "staged in $run_dir/hub_folder" || echo "its checkpoint was removed")): to train" \
                    "$recipe anew, move $run_dir away or TRAIN_RUNS=DIR ./run.sh train $recipe"
            fi
            exit 0
        fi
        if [ ! -f "$run_dir/last.pth.tar" ] && [ -f "$run_dir/summary.csv" ]; then
            echo "run.sh: $run_dir has a summary.csv but no last.pth.tar to resume from: move $run_dir away to" \
                "start anew, or TRAIN_RUNS=DIR ./run.sh train $recipe to train in DIR/$name" >&2; exit 2
        fi
        if [ -f "$run_dir/last.pth.tar" ]; then
            # train.py seeds its RNGs at every start, so with the recipe's seed each resumed epoch would replay the
            # first epoch's data order and augmentation. A resume seeds with the recipe's seed + the epoch it
            # resumes at (after the last row of summary.csv): its own draw, still reproducible. (--seed in "$@"
            # comes later and wins.)
            seed=$(sed -n 's/^seed: *\([0-9][0-9]*\) *$/\1/p' "$recipe" | head -n 1)
            next_epoch=1
            [ -f "$run_dir/summary.csv" ] \
                && next_epoch=$(awk -F, '$1 ~ /^[0-9]+$/ {e = $1 + 1} END {print (e > 0 ? e : 1)}' "$run_dir/summary.csv")
            resume=(--resume "$run_dir/last.pth.tar" --seed $(( ${seed:-42} + next_epoch )))
        fi
        source=$(data_source "$recipe") || exit 2
        # a run keeps the data it started with: the JPEG copy and the original are different test sets
        if [ -f "$run_dir/data_source" ] && [ "$(cat "$run_dir/data_source")" != "$source" ]; then
            echo "run.sh: $run_dir was trained on '$(cat "$run_dir/data_source")' data, this machine would use '$source':" \
                "set CIFAR10_SOURCE=$(cat "$run_dir/data_source") (or move $run_dir away to start anew)" >&2; exit 2
        fi
        read -r -a dargs <<< "$(data_args "$source")"
        if [ "$source" = jpeg ] && [ ! -d data/cifar10-jpeg ] && [ ! -f "$JPEG_TAR" ]; then
            echo "run.sh: CIFAR10_SOURCE=jpeg but there is no data/cifar10-jpeg and no $JPEG_TAR: set" \
                "CIFAR10_JPEG_TAR=/path/to/cifar10-jpeg.tar.gz, or CIFAR10_SOURCE=torchvision" >&2; exit 1
        fi
        if [ "$dry_run" = 1 ]; then  # what would run, without setting up, unpacking or cloning anything
            tp=${TIMM_TRAIN_PY:-.cache/pytorch-image-models/train.py}
            [ -f "$tp" ] || tp="$tp (cloned from pytorch-image-models v$TIMM_VERSION on a real run)"
            echo "recipe:   $recipe"
            echo "data:     $(describe_source "$source")"
            echo "run dir:  $run_dir ($([ ${#resume[@]} -gt 0 ] && echo "resumes from last.pth.tar" || echo "new run"))"
            if [ -f "$record" ] && [ -x "$PY" ]; then
                "$PY" -m timm_spe.cli run-status "$run_dir" --recipe "$recipe" --expected-from "$record" || true
            elif [ -f "$record" ]; then
                echo "expected: (./run.sh setup first: timm-spe reads the time per epoch from $record)"
            fi
            echo "train.py: $tp"
            echo "command:  $PY ${TIMM_TRAIN_PY:-.cache/pytorch-image-models/train.py} --config $recipe" \
                "--output $runs --experiment $name ${dargs[*]} ${resume[*]} $*"
            exit 0
        fi
        setup
        keep_freed_memory
        # one-pass CPU kernels for SPE's pooling (README, "CPU kernels"); TIMM_SPE_CPU_KERNELS=0 turns them off
        export TIMM_SPE_CPU_KERNELS="${TIMM_SPE_CPU_KERNELS:-1}"
        echo "data: $(describe_source "$source")"
        prepare_data "$source" || exit 1
        tp=$(train_py) || exit 1
        mkdir -p "$run_dir"
        [ "$source" = recipe ] || echo "$source" > "$run_dir/data_source"
        if [ ${#resume[@]} -gt 0 ]; then
            "$PY" -m timm_spe.cli run-status "$run_dir" --recipe "$recipe" --prefix "resuming: "
            # in the log too: finish-run's card tells reseeded resumes from those that replayed epoch 1's draw
            echo "run.sh: resuming with ${resume[*]:2} (the recipe's seed + the epoch it resumes at)" \
                | tee -a "$run_dir/train.log"
        fi
        # how long it takes, at the pace of the run that made the shipped weights (nothing without its record)
        [ ! -f "$record" ] || "$PY" -m timm_spe.cli run-status "$run_dir" --recipe "$recipe" --expected-from "$record" \
            || true
        set -o pipefail
        "$PY" "$tp" --config "$recipe" --output "$runs" --experiment "$name" "${dargs[@]}" "${resume[@]}" "$@" 2>&1 \
            | tee -a "$run_dir/train.log"
        rm -f "$run_dir"/checkpoint-*.pth.tar "$run_dir"/model_best.pth.tar  # only last.pth.tar is resume state
        # evaluate the final epoch's weights, plot, and stage the Hub folder (never overwrites): a run outside
        # train_runs/ (runs/, or TRAIN_RUNS) stages beside itself, in <run dir>/hub_folder/; train_runs/ (the
        # records of the shipped weights) in hub_cards/<model>.<tag>/
        out=()
        [ "$runs" = train_runs ] || out=(--out "$run_dir/hub_folder")
        exec "$PY" -m timm_spe.cli finish-run --recipe "$recipe" --run-dir "$run_dir" "${out[@]}" ;;
    *)
        sed -n '2,/^set -euo/{/^set -euo/!p}' "$0"; exit 2 ;;
esac
