#!/usr/bin/env bash
# One command for a GPU machine with no network: install capstriton from this checkout (no
# downloads), run the GPU test suite, tune the fused layer's launch parameters, the benchmark
# sweep of the ops, the whole-model benchmark, then the plots.
#
#   bench/gpu_check.sh OUTDIR
#
# Lands in OUTDIR:
#   check.log    nvidia-smi, versions, install, each step's exit status and duration
#   tests.log    pytest output
#   sweep.log    tune, sweep and model bench output, ending with the summaries against the targets
#   results.json the sweep's data; throughput.png speedup.png memory.png drawn from it
#   tune_layer.json  the fused layer's launch parameters against alternatives (bench/tune.py)
#   model_bench/ results.json, model_throughput.png, model_memory.png (bench/model_bench.py)
#
# Each step runs under `timeout`; the defaults add up to 8 minutes and can be changed with
# CT_INSTALL_S, CT_TESTS_S, CT_TUNE_S, CT_SWEEP_S, CT_HALF_S, CT_MODEL_S, CT_PLOT_S (seconds). A
# step that fails or runs out of time is logged and the next one still runs; the sweeps rewrite
# their JSON after every point and stop starting points before their limit, so the data so far
# is always kept.
#
# CT_GPU_CHECK_DRY=1 rehearses the whole script on a CPU in a few minutes: same steps, tiny sizes,
# only tests/test_bench.py. PYTHON selects the interpreter (default python3). OUTDIR must be new or
# empty: every file in it then comes from this run (a second run into it would append to the logs
# and plot the first run's data where its own steps failed).
set -u -o pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
if [[ -e "$1" && ! -d "$1" ]]; then
    echo "$0: OUTDIR $1 exists and is not a folder" >&2
    exit 2
fi
if [[ -d "$1" && -n "$(ls -A "$1")" ]]; then
    echo "$0: OUTDIR $1 holds files (an earlier run's?): give a new or empty folder" >&2
    exit 2
fi
# the interpreter as an absolute path: the steps run from the repository root
PY=$(command -v "${PYTHON:-python3}") || { echo "$0: PYTHON=${PYTHON:-python3} not found" >&2; exit 2; }
[[ $PY == /* ]] || PY="$PWD/$PY"
OUT=$(mkdir -p "$1" && cd "$1" && pwd) || exit 2
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
DRY=${CT_GPU_CHECK_DRY:-0}
export PYTHONUNBUFFERED=1
export MPLBACKEND=Agg

# Seen on an H200 at b59a9d2 (298 s in all): install 12 s, tests 102 s, tune 17 s, float32 sweep
# 120 s, half sweep 29 s. Now the suite holds the fused layer's kernels too (more compilations),
# and the model bench is added: the limits add up to 480 s, leaving 30 s of the 8.5 minutes for
# what runs outside them (version checks, imports, each step's 10 s kill grace).
INSTALL_S=${CT_INSTALL_S:-25}
TESTS_S=${CT_TESTS_S:-160}
TUNE_S=${CT_TUNE_S:-40}
SWEEP_S=${CT_SWEEP_S:-110}
HALF_S=${CT_HALF_S:-40}
MODEL_S=${CT_MODEL_S:-90}
PLOT_S=${CT_PLOT_S:-15}

LOG="$OUT/check.log"
: >"$LOG"
# a step's --time-budget: its limit less what it needs after its last point, at least a third of
# the limit (CT_*_S below the defaults' margins would give a negative budget, refused)
budget() { local b=$(($1 - $2)) m=$(($1 / 3)); echo $((b > m ? b : m)); }
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

# run NAME SECONDS LOGFILE CMD...: run CMD under timeout, output appended to LOGFILE.
run() {
    local name=$1 limit=$2 file=$3
    shift 3
    local start=$SECONDS rc
    log "step $name: start (limit ${limit}s): $*"
    timeout -k 10 "$limit" "$@" >>"$file" 2>&1
    rc=$?
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        log "step $name: TIMED OUT after $((SECONDS - start))s"
    else
        log "step $name: exit $rc after $((SECONDS - start))s"
    fi
    return $rc
}

if [[ $DRY == 1 ]]; then
    DEVICE=cpu
    SIZES=(--n-in 8 --n-out 3 --d-in 4 --d 5 --iterations 2 --quick)
    FULL_BATCHES=(1 2)
    HALF_BATCHES=(2)
    MODEL_BATCHES=(1 2)
    MODEL_IMPLS=(port eager fused)
    TESTS=(tests/test_bench.py -m "not slow")
    IMPLS=(eager triton fused)
    unset TRITON_INTERPRET
else
    DEVICE=cuda
    SIZES=()  # the paper's DigitCaps
    FULL_BATCHES=(1 16 64 256 1024 4096)
    HALF_BATCHES=(64 1024)
    MODEL_BATCHES=(1 32 128 1024)
    MODEL_IMPLS=(port eager fused triton cudagraphs)
    # The checks that mean something on a GPU: every kernel against the float64 reference,
    # opcheck and compiled execution, the fullgraph trace, transforms, autocast, validation.
    # The newest kernels first. The rest of the suite is CPU-only and runs in CI.
    TESTS=(tests/ops/test_fused_layer.py tests/ops/test_self_attention_routing.py
        tests/ops/test_dynamic_routing.py tests/ops/test_squash.py tests/test_cuda.py tests/test_layer_memory.py tests/test_compile_trace.py tests/test_autocast.py tests/test_transforms.py
        tests/test_validation.py)
    IMPLS=(eager triton fused compile module)
fi

log "gpu_check: repo $REPO, out $OUT, dry=$DRY, $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git')"
{
    echo "== nvidia-smi"
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    echo "== versions"
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1
    "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1
} >>"$LOG"

# --- install: capstriton.kernels comes from kernels/ through pyproject's package-dir, so the
# checkout needs installing; the tests and the sweep run from the repository root.
check_import() {
    "$PY" -c 'import capstriton, capstriton.kernels; print("import ok:", capstriton.__file__, capstriton.kernels.__file__)' >>"$LOG" 2>&1 &&
        (cd /tmp && "$PY" -c 'import capstriton.kernels') >>"$LOG" 2>&1
}
# Both attempts share INSTALL_S: the second gets what the first left (at least 5 s).
INSTALL_END=$((SECONDS + INSTALL_S))
if check_import; then
    log "install: capstriton already importable"
elif run install-editable "$INSTALL_S" "$LOG" "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . && check_import; then
    log "install: editable install ok"
elif run install-target "$((INSTALL_END - SECONDS > 5 ? INSTALL_END - SECONDS : 5))" "$LOG" "$PY" -m pip install --no-deps --no-build-isolation --no-index --target /tmp/ctsite . &&
    export PYTHONPATH="/tmp/ctsite${PYTHONPATH:+:$PYTHONPATH}" &&
    { [[ -e capstriton/kernels ]] || ln -s ../kernels capstriton/kernels; } && check_import; then
    # /tmp/ctsite serves other directories; in the repository root the checkout's capstriton/
    # shadows it, so a link gives that one its kernels too (this copy of the tree only).
    log "install: --target /tmp/ctsite + PYTHONPATH ok"
else
    log "install: FAILED, tests and sweep will fail to import capstriton (see above)"
fi

# --- tests on the GPU (the conftest uses the GPU when there is one, the interpreter otherwise)
PYTEST_ARGS=(-q -ra --durations=15 -p no:cacheprovider)
if "$PY" -c 'import pytest_timeout' 2>/dev/null; then
    PYTEST_ARGS+=(--timeout=120)
fi
run tests "$TESTS_S" "$OUT/tests.log" "$PY" -m pytest "${PYTEST_ARGS[@]}" "${TESTS[@]}"
{ tail -n 3 "$OUT/tests.log"; echo; } | tee -a "$LOG"

# --- launch parameters of the fused layer against alternatives (DigitCaps, fp32, B = 1024)
if [[ $DRY != 1 ]]; then
    run tune "$TUNE_S" "$OUT/sweep.log" "$PY" bench/tune.py --op layer --batch-sizes 1024 --out "$OUT" \
        --set fwd_examples=32,64 fwd_chunk=32,64 fwd_warps=4,8 target_programs=1024,4096 \
        target_programs_bwd=1024,2048 groups=8 final_examples=16,32 final_chunk=64,128
else  # the same script and output through the interpreter, on a tiny shape
    run tune "$TUNE_S" "$OUT/sweep.log" env TRITON_INTERPRET=1 "$PY" bench/tune.py --op layer --device cpu \
        --out "$OUT" --batch-sizes 2 --n-in 7 --n-out 3 --d 5 --d-in 4 --set fwd_examples=16 fwd_chunk=16 \
        fwd_warps=4 target_programs=8 target_programs_bwd=8 groups=2 final_examples=16 final_chunk=16
fi

# --- the sweep: float32 over the full batch list (routing first: its targets matter most),
# then half precision on a few sizes without the compiled implementations (compiles are slow).
SWEEP=("$PY" bench/routing_sweep.py --device "$DEVICE" --out "$OUT" --no-plots "${SIZES[@]}")
run sweep-float32 "$SWEEP_S" "$OUT/sweep.log" "${SWEEP[@]}" --op routing layer attention fccaps \
    --modes forward forward+backward --dtypes float32 --implementations "${IMPLS[@]}" \
    --batch-sizes "${FULL_BATCHES[@]}" --time-budget "$(budget "$SWEEP_S" 45)"
run sweep-half "$HALF_S" "$OUT/sweep.log" "${SWEEP[@]}" --append --op routing layer attention fccaps \
    --modes forward forward+backward --dtypes bfloat16 float16 --implementations eager triton fused \
    --batch-sizes "${HALF_BATCHES[@]}" --time-budget "$(budget "$HALF_S" 15)"
rm -f "$OUT"/*.tmp

# --- the whole model against the port-style baseline: training step and inference, the bytes
# saved for backward, and (on CUDA) the largest training batch under 16 GiB
MODEL=("$PY" bench/model_bench.py --device "$DEVICE" --out "$OUT/model_bench" --no-progress --quick)
[[ $DRY == 1 ]] || MODEL+=(--max-batch)
run model-bench "$MODEL_S" "$OUT/sweep.log" "${MODEL[@]}" --implementations "${MODEL_IMPLS[@]}" \
    --modes train inference --batch-sizes "${MODEL_BATCHES[@]}" --time-budget "$(budget "$MODEL_S" 35)"

# --- plots and the summary, from the JSON alone
if [[ -f "$OUT/results.json" ]]; then
    run plots "$PLOT_S" "$OUT/sweep.log" "$PY" bench/plot_results.py "$OUT/results.json" --out "$OUT"
    SLUG=$("$PY" -c 'import json, sys; sys.path.insert(0, "bench"); import plot_results as p; print(p.device_slug(p.load(sys.argv[1])["environment"]["device"]))' "$OUT/results.json" 2>>"$LOG")
    if [[ $DRY == 1 ]]; then
        log "dry run: nothing to commit (CPU data of toy sizes)"
    else
        log "to commit: mkdir -p bench/results/$SLUG && cp $(printf %q "$OUT")/{results.json,throughput.png,speedup.png,memory.png} bench/results/$SLUG/"
    fi
else
    log "no results.json: the sweep did not start (see sweep.log)"
fi
log "gpu_check: done in ${SECONDS}s; files: $(cd "$OUT" && ls | tr '\n' ' ')"
