#!/bin/bash
# One GPU session (issue #19), about 5 minutes on an H200: installs the wheels that travel with the tree, runs the
# CUDA tests, then benchmarks/bench.py --device cuda for the 256M shape (batch 1/8/32/64 decoding, the vision tower
# against the measured matmul rate, a 64-frame video's peak memory, fp32 greedy identity with the CPU) and the 500M
# shape. Each part runs under `timeout` (worst case 7.5 minutes in all) and logs into $OUT; a part that fails or runs out
# of time does not stop the next, and bench.py rewrites its JSON after every worker, so finished workloads are kept.
#
#   bash benchmarks/gpu.sh        # from the repo root on the GPU machine, with the ignored .gpu/ folder carried:
#                                 # .gpu/whl (av, num2words, transformers 5.23, pytest and its deps) and
#                                 # .gpu/checkpoint-files (the real config/tokenizer files, copied to ../shared)
#   DEVICE=cpu PY=python BENCH_EXTRA="--folder /tmp/tiny" bash benchmarks/gpu.sh   # the script's logic on a CPU
#
# Outputs in $OUT (default /tmp/gpu-out): summary.txt (each part's exit status and seconds), env.log, install.log,
# pytest.log, bench-256m.log/.json, bench-500m.log/.json.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
BENCH_EXTRA=${BENCH_EXTRA:-}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
export PYTHONPATH=$PWD SMOLVLM_KERNELS=0 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
failed=0

# part NAME SECONDS CMD...: run CMD under timeout, its output in $OUT/NAME.log and on stdout; record the outcome.
part() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $(date -u +%T) $name (at most ${limit} s): $*"
    timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" > "$OUT/$name.log" 2>&1  # bash -c: CMD may be a function
    rc=$?
    tail -n 60 "$OUT/$name.log"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && rc="$rc (timed out)"
    echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
    [ "$rc" = 0 ] || failed=$((failed + 1))
}

install() {
    [ "$DEVICE" = cpu ] && { echo "DEVICE=cpu: the environment is used as it is"; return 0; }
    # bench.py's workers get PYTHONPATH=<repo>, so the wheels go into the interpreter's own environment (or, where
    # that is read-only, into /tmp/site behind a .pth file).
    local wheels=(.gpu/whl/av-*.whl .gpu/whl/num2words-*.whl .gpu/whl/transformers-*.whl)
    "$PY" -c "import pytest" 2>/dev/null || wheels+=(.gpu/whl/pytest-*.whl .gpu/whl/pluggy-*.whl
                                                     .gpu/whl/iniconfig-*.whl .gpu/whl/pygments-*.whl)
    "$PY" -c "import packaging" 2>/dev/null || wheels+=(.gpu/whl/packaging-*.whl)
    local pip=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir)
    if ! "${pip[@]}" "${wheels[@]}"; then
        echo "pip into the environment failed; installing into /tmp/site behind a .pth file"
        "${pip[@]}" --target /tmp/site "${wheels[@]}" || return 1
        local site_dir
        site_dir=$("$PY" -c 'import site; print(site.getsitepackages()[0])')
        echo "import sys; sys.path.insert(0, '/tmp/site')" > "$site_dir/00_gpu_site.pth"
    fi
    mkdir -p ../shared
    [ -e ../shared/checkpoint-files ] || cp -r .gpu/checkpoint-files ../shared/checkpoint-files
}

environment() {
    [ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$PY" -c "import sys, torch, transformers, av, num2words, pytest; print('python', sys.version.split()[0], 'torch',
torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'pytest', pytest.__version__,
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"
    "$PY" -c "import smolvlm.generation.cuda_graphs, smolvlm.processing; print('smolvlm from', smolvlm.__file__)"
}

bench() {  # bench NAME ARGS...: bench.py with its JSON in $OUT/NAME.json
    local name=$1
    shift
    "$PY" benchmarks/bench.py --device "$DEVICE" --threads 8 --reps 1 --no-quality --timeout 100 \
        --json "$OUT/$name.json" "$@" $BENCH_EXTRA
}

export OUT DEVICE PY BENCH_EXTRA
export -f install environment bench
part install 40 install
part env 30 environment
# the CUDA-graph tests (the capture and replay; their CPU counterparts run in CI)
part pytest 45 "$PY" -m pytest -q -rs -p no:cacheprovider -m cuda tests/generation/test_cuda_graphs.py
part bench-256m 260 bench bench-256m --only text,batch8,batch32,batch64,vision,video64,fp32-identity
part bench-500m 100 bench bench-500m --shape smolvlm2-500m --only text,batch64,vision
echo "== $(date -u +%T) done: $failed part(s) failed; outputs in $OUT"
cat "$OUT/summary.txt"
exit $((failed > 0))
