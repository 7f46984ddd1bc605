#!/usr/bin/env bash
# The whole GPU check in one command, for the GPU machine (no internet; python, torch with CUDA,
# triton, nvcc, pytest preinstalled):
#
#   bash benchmarks/device_check.sh
#
# 1. build + install the package (`pip install --no-build-isolation .`, the CUDA extension for
#    sm_90 when nvcc is present), and copy the built fierce_ext/_C*.so into the source tree so
#    that imports from the checkout (pytest, the benchmark) find it too;
# 2. `python -m fierce_ext` (versions, devices, which backends run where);
# 3. `pytest -q --maxfail=5` of the kernel test modules (tests/gpu/test_triton_gpu.py,
#    test_cuda_gpu.py; a shard stops at its fifth failure, not its first: a GPU run is rare, and
#    it should show every kind of failure and measure every test it can, within the timeout),
#    sharded over FIERCE_CHECK_SHARDS (default 8) processes by benchmarks/pytest_shards.sh;
#    each comparison's measured error and asserted bound go to $OUT/device_check/measured/
#    (tests/measured_errors.py), the data for tightening the tolerances, failed tests included;
# 4. `benchmarks/entropy_kernel.py` on the DESIGN.md shapes in fp32 and bf16, every backend but
#    the paper's torch.compile; `benchmarks/host_overhead.py` (the host-side floor of an eager
#    step); then tests/gpu/test_integration_gpu.py (opcheck, a compiled training step, autocast)
#    and, time permitting, the compiled paper code;
# 5. a summary: the 15 measured errors nearest their bounds (all of them, worst case per test,
#    mode and quantity, in measured-errors.txt), a short fwd+bwd table, the faster of the cuda
#    and triton backends per case (the data for `auto`), then each step's status and time,
#    printed last.
#
# Results and logs go under $OUT (if set) or benchmarks/results/. Every step has a timeout and
# the script goes on after a failure; it exits non-zero if any step failed. The whole run is
# kept under FIERCE_CHECK_BUDGET seconds (default 290: the check must take < 5 minutes).
# Overrides: FIERCE_CHECK_PYTEST_ARGS (default "-q --maxfail=5"), FIERCE_CHECK_SHARDS (default 8),
# FIERCE_CHECK_BENCH_ARGS (default: the DESIGN shapes in fp32,bf16), PYTHON (default python3),
# TORCH_CUDA_ARCH_LIST (default 9.0).
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo" || exit 2
python=${PYTHON:-python3}
budget=${FIERCE_CHECK_BUDGET:-290}
out=${OUT:-$repo/benchmarks/results}
logs="$out/device_check"
mkdir -p "$logs"
start=$SECONDS
status=()
failed=0

remaining() { echo $((budget - (SECONDS - start))); }

# step NAME CAP_SECONDS COMMAND...: runs COMMAND with a timeout of min(CAP, time left), teeing
# its output to $logs/NAME.log, and records the outcome.
step() {
    local name=$1 cap=$2
    shift 2
    local left
    left=$(remaining)
    local limit=$(( cap < left ? cap : left ))
    if (( limit < 5 )); then
        status+=("$(printf '%-22s %-9s %5ss' "$name" "NOT RUN" 0)  (out of time)")
        failed=1
        return 1
    fi
    echo
    echo "=== $name (timeout ${limit}s)"
    local t0=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$logs/$name.log"
    rc=${PIPESTATUS[0]}
    local word=ok
    if (( rc == 124 || rc == 137 )); then word=TIMEOUT; elif (( rc != 0 )); then word="FAIL($rc)"; fi
    status+=("$(printf '%-22s %-9s %5ss' "$name" "$word" $((SECONDS - t0)))")
    if [[ $word != ok ]]; then failed=1; return 1; fi
    return 0
}

echo "=== fierce_ext device check in $repo, results under $out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -4
"$python" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch',
torch.__version__, 'CUDA', torch.version.cuda, '| triton', triton.__version__)" 2>&1

# 1. Build and install. FIERCE_EXT_BUILD_CUDA=1 when nvcc exists: a failing extension build is
# then an error, not a silent fallback to a package without the cuda backend.
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
build_cuda=0
if command -v nvcc >/dev/null 2>&1 || [[ -x "$CUDA_HOME/bin/nvcc" ]]; then build_cuda=1; fi
install() {
    if ! FIERCE_EXT_BUILD_CUDA=$build_cuda "$python" -m pip install --no-build-isolation \
            --no-deps --no-index -q .; then
        # pip can fail for reasons of its own there (no wheel, old setuptools): the tests and
        # the benchmark import the checkout, so an in-place build is enough.
        echo "pip install failed; building the extension in place instead"
        FIERCE_EXT_BUILD_CUDA=$build_cuda "$python" setup.py -q build_ext --inplace || return $?
        return 0
    fi
    # Put the installed extension beside the sources too (*.so is git-ignored).
    local so
    so=$(cd / && "$python" -c "import importlib.util as u; s = u.find_spec('fierce_ext._C');
print(s.origin if s else '')")
    if [[ -n $so ]]; then
        cp -f "$so" "$repo/fierce_ext/" && echo "copied $(basename "$so") into fierce_ext/"
    elif (( build_cuda )); then
        echo "the CUDA extension was not built"; return 1
    else
        echo "nvcc not found: installed without the CUDA extension"
    fi
}
export python repo build_cuda
export -f install
step install 170 bash -c install

# 2. Versions and backends.
step info 40 "$python" -m fierce_ext

# 3. GPU tests of the kernels (the backends against the oracle, noise, determinism), in
# FIERCE_CHECK_SHARDS concurrent pytest processes: a first run is mostly Triton compiling kernel
# variants, one at a time per process.
shards=${FIERCE_CHECK_SHARDS:-8}
measured="$logs/measured"
rm -rf "$measured"
export FIERCE_MEASURED_ERRORS=$measured
# shellcheck disable=SC2086
step gpu-tests 120 env PYTHON="$python" SHARD_LOGS="$logs/gpu-tests" \
    bash benchmarks/pytest_shards.sh "$shards" \
    tests/gpu/test_triton_gpu.py tests/gpu/test_cuda_gpu.py -- ${FIERCE_CHECK_PYTEST_ARGS:--q --maxfail=5}

# 4. Benchmark: the main table first, the paper's torch.compile after (it compiles per case).
bench_args=${FIERCE_CHECK_BENCH_ARGS:---shapes few-shot,hyperspectral,mid,large,xl --dtypes fp32,bf16}
# shellcheck disable=SC2086
step benchmark 150 "$python" benchmarks/entropy_kernel.py $bench_args \
    --backends paper,torch,triton,cuda --out "$out/bench"
# The host-side floor of an eager step (fierce_ext.entropy with a backend that does nothing)
# against each backend, at the paper's few-shot shape: is the step bound by the host?
step host-overhead 40 "$python" benchmarks/host_overhead.py --shape 256,640,1,100
# Training-loop integration (opcheck, compiled step, autocast): after the main table, since
# its torch.compile calls take the longest.
# shellcheck disable=SC2086
step gpu-integration 90 env PYTHON="$python" SHARD_LOGS="$logs/gpu-integration" \
    bash benchmarks/pytest_shards.sh "$shards" \
    tests/gpu/test_integration_gpu.py -- ${FIERCE_CHECK_PYTEST_ARGS:--q --maxfail=5}
if (( $(remaining) >= 45 )); then
    # shellcheck disable=SC2086
    step bench-compiled 200 "$python" benchmarks/entropy_kernel.py $bench_args \
        --backends paper-compiled --out "$out/bench-compiled"
else
    status+=("$(printf '%-22s %-9s %5ss' bench-compiled skipped 0)  (less than 45 s left)")
fi

# 5. Summary, printed last.
echo
echo "=== summary ($((SECONDS - start)) s; logs in $logs)"
if [[ -d $measured ]]; then
    "$python" tests/measured_errors.py "$measured" >"$logs/measured-errors.txt" 2>&1
    "$python" tests/measured_errors.py "$measured" --top 15 2>&1
    echo "(all of them: $logs/measured-errors.txt)"
    echo
fi
"$python" - "$out/bench" "$out/bench-compiled" <<'EOF' 2>&1
import json, sys
from pathlib import Path

rows = []
for folder in sys.argv[1:]:
    files = sorted(Path(folder).glob("*.json"), key=lambda p: p.stat().st_mtime)
    if files:
        rows += json.loads(files[-1].read_text())["rows"]
if not rows:
    print("no benchmark results")
    sys.exit(0)
backends = ["paper", "paper-compiled", "torch", "triton", "cuda"]
cells = {(r["shape"], r["dtype"], r["backend"]): r for r in rows}
cases = list(dict.fromkeys((r["shape"], r["dtype"]) for r in rows))
print("fwd+bwd ms (extra MiB) per backend")
print(f"| shape | dtype | " + " | ".join(backends) + " |")
print("|---|---|" + "---|" * len(backends))
for shape, dtype in cases:
    line = []
    for b in backends:
        r = cells.get((shape, dtype, b))
        if r is None:
            line.append("-")
        elif r.get("skipped"):
            line.append("skipped")
        elif r.get("fwdbwd_ms") is None:
            line.append("?")
        else:
            mib = r.get("extra_mib")
            line.append(f"{r['fwdbwd_ms']:.3g}" + (f" ({mib:.0f})" if mib is not None else ""))
    print(f"| {shape} | {dtype} | " + " | ".join(line) + " |")
# The data for `auto` on CUDA (fierce_ext/backends/__init__.py): the faster GPU backend per case.
print("\nfaster GPU backend, fwd+bwd (the data for auto's choice on CUDA)")
for shape, dtype in cases:
    times = {b: cells[(shape, dtype, b)].get("fwdbwd_ms") for b in ("cuda", "triton")
             if (shape, dtype, b) in cells}
    if len(times) == 2 and None not in times.values():
        fast, slow = sorted(times, key=times.get)
        print(f"  {shape:<14} {dtype:<5} {fast} ({times[slow] / times[fast]:.2f}x {slow})")
graphed = [r for r in rows if r.get("graph_fwdbwd_ms") or r.get("graph_note")]
if graphed:
    print("\nfwd+bwd ms replayed from a CUDA graph (device time of the launch-bound shapes)")
    for r in graphed:
        value = r.get("graph_fwdbwd_ms")
        print(f"  {r['shape']:<14} {r['dtype']:<5} {r['backend']:<15} "
              + (f"{value:.4g}" if value else f"not capturable: {r['graph_note']}"))
EOF
if [[ -s $logs/host-overhead.log ]]; then
    echo
    echo "eager step, host floor (backend noop) vs the backends, us:"
    tail -n +2 "$logs/host-overhead.log"
fi
echo
for line in "${status[@]}"; do echo "$line"; done
if (( failed )); then echo "DEVICE CHECK: FAILED"; else echo "DEVICE CHECK: OK"; fi
exit $failed
