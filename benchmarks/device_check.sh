#!/usr/bin/env bash
# The whole GPU check in one command, for the GPU machine (no internet; python, torch with CUDA,
# triton, nvcc, pytest preinstalled):
#
#   bash benchmarks/device_check.sh
#
# Correctness first, then timing; every step has a timeout and the script goes on after a failure:
# 1. install: `pip install --no-build-isolation .` (the CUDA extension for sm_90 when nvcc and a
#    CUDA torch are present), and copy the built fierce_ext/_C*.so into the source tree so that
#    imports from the checkout (pytest, the benchmark) find it too; `setup.py build_ext
#    --inplace` if pip fails;
# 2. info: `python -m fierce_ext` (versions, devices, which backends run where);
# 3. gpu-tests: `pytest -q --maxfail=5` of the kernel test modules (tests/gpu/test_triton_gpu.py,
#    test_cuda_gpu.py; a shard stops at its fifth failure, not its first: a GPU run is rare, and
#    it should show every kind of failure and measure every test it can, within the timeout),
#    sharded over FIERCE_CHECK_SHARDS (default 8) processes by benchmarks/pytest_shards.sh, each
#    shard's log written as it runs to $OUT/device_check/gpu-tests/ (a timeout still leaves each
#    shard's failures and summary there: see pytest_shards.sh); each comparison's measured error
#    and asserted bound go to $OUT/device_check/measured/ (tests/measured_errors.py), the data for
#    tightening the tolerances, failed tests included;
# 4. gpu-integration: tests/gpu/test_integration_gpu.py (opcheck, a compiled training step,
#    autocast), sharded the same way;
# 5. benchmark: `benchmarks/entropy_kernel.py` on its CUDA shapes (few-shot ... xl) in fp32 and bf16, every
#    backend but the paper's torch.compile, to $OUT/bench/ (the .json/.md rewritten after every
#    case: a timeout keeps what was measured). Always given at least FIERCE_CHECK_BENCH_MIN
#    seconds (default 90): the steps before it leave that much (plus the next step's and the
#    summary's share) whatever their own caps;
# 6. bench-age: the age experiment's term (shape `age`, --similarity distance, fp32) to
#    $OUT/bench-age/;
# 7. extras, timing only, with whatever time is left (too little: "skipped"; a timeout keeps the
#    partial results and does not fail the check): host-overhead (`benchmarks/host_overhead.py`,
#    the host-side floor of an eager step) and bench-compiled (the paper's torch.compile, to
#    $OUT/bench-compiled/, partial results kept the same way);
# 8. a summary: the 15 measured errors nearest their bounds (all of them, worst case per test,
#    mode and quantity, in measured-errors.txt), a short fwd+bwd table, the faster of the cuda
#    and triton backends per case (the data for `auto`), then each step's status and time,
#    printed last.
#
# Results and logs go under $OUT; with OUT unset (run by hand) under a new dated folder,
# /tmp/fierce-device-check-YYYYmmdd-HHMMSS, never under the tracked benchmarks/results/. The whole
# console output is also in $OUT/device_check/console.log (card, versions, summary). A relative
# PYTHON or OUT is taken relative to the folder the script is started from. The script exits
# non-zero if any required step failed, timed out or was not run. The whole run is kept under
# FIERCE_CHECK_BUDGET seconds (default 290: the check must take < 5 minutes).
# Overrides: FIERCE_CHECK_PYTEST_ARGS (default "-q --maxfail=5"), FIERCE_CHECK_SHARDS (default 8),
# FIERCE_CHECK_BENCH_ARGS (default: the CUDA shapes in fp32,bf16), FIERCE_CHECK_BENCH_MIN
# (default 90), FIERCE_CHECK_BENCH_CAP (the benchmark's timeout, default 150), PYTHON (default
# python3), CUDA_HOME (default: /usr/local/cuda if it has bin/nvcc, else derived from the nvcc on
# the PATH, else left to torch), TORCH_CUDA_ARCH_LIST (default 9.0).
set -uo pipefail

# Before any cd: a relative PYTHON or OUT is relative to where the script was started.
python=${PYTHON:-python3}
if ! python=$(command -v "$python"); then
    echo "device_check: no python found at '${PYTHON:-python3}'" >&2
    exit 2
fi
[[ $python == /* ]] || python="$PWD/$python"
out=${OUT:-/tmp/fierce-device-check-$(date +%Y%m%d-%H%M%S)}
if ! mkdir -p "$out" || ! out=$(cd "$out" && pwd); then
    echo "device_check: cannot create $out" >&2
    exit 2
fi
repo=$(cd "$(dirname "$0")/.." && pwd) || exit 2
cd "$repo" || exit 2
budget=${FIERCE_CHECK_BUDGET:-290}
logs="$out/device_check"
mkdir -p "$logs" || exit 2
# A rerun into the same OUT: no step log of an earlier run may pass for this one's.
find "$logs" -maxdepth 1 -name '*.log' ! -name console.log -delete

# Everything printed from here on also goes to console.log; at exit the tee is given a moment
# to write the last lines (the summary) before the script ends.
exec 3>&1 4>&2
exec > >(tee -a "$logs/console.log") 2>&1
tee_pid=$!
# shellcheck disable=SC2329  # (run by the trap below)
finish() {
    exec 1>&3 2>&4 3>&- 4>&-
    local i
    for (( i = 0; i < 50; i++ )); do kill -0 "$tee_pid" 2>/dev/null || break; sleep 0.1; done
}
trap finish EXIT

start=$SECONDS
status=()
failed=0

# Time kept back for what follows (seconds): the summary, the age step, the main benchmark, and
# the integration tests' share that the kernel tests leave them.
summary_s=10
age_min=20
bench_min=${FIERCE_CHECK_BENCH_MIN:-90}
integration_min=30
before_bench=$(( bench_min + age_min + summary_s ))

remaining() { echo $((budget - (SECONDS - start))); }

# run_step KIND NAME CAP RESERVE COMMAND...: runs COMMAND with a timeout of
# min(CAP, time left - RESERVE), teeing its output to $logs/NAME.log, and records the outcome.
# KIND "required": a failure, timeout or lack of time fails the check; "extra" (timing only,
# with what is left): only a failure does.
run_step() {
    local kind=$1 name=$2 cap=$3 reserve=$4
    shift 4
    local left
    left=$(( $(remaining) - reserve ))
    local limit=$(( cap < left ? cap : left ))
    if (( limit < 5 )); then
        if [[ $kind == extra ]]; then
            status+=("$(printf '%-22s %-9s %5ss' "$name" skipped 0)  (out of time)")
            return 0
        fi
        status+=("$(printf '%-22s %-9s %5ss' "$name" "NOT RUN" 0)  (out of time)")
        failed=1
        return 1
    fi
    echo
    echo "=== $name (timeout ${limit}s, $(( $(remaining) )) s of the budget left)"
    local t0=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$logs/$name.log"
    rc=${PIPESTATUS[0]}
    local word=ok note=""
    if (( rc == 124 || rc == 137 )); then word=TIMEOUT; elif (( rc != 0 )); then word="FAIL($rc)"; fi
    if [[ $word == TIMEOUT && $kind == extra ]]; then note="  (extra: partial results kept)"; fi
    status+=("$(printf '%-22s %-9s %5ss' "$name" "$word" $((SECONDS - t0)))$note")
    if [[ $word == ok ]]; then return 0; fi
    if [[ $kind == required || $word != TIMEOUT ]]; then failed=1; fi
    return 1
}
step() { run_step required "$@"; }
extra_step() { run_step extra "$@"; }

echo "=== fierce_ext device check in $repo, results under $out"
echo "python: $python; budget ${budget}s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -4
"$python" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch',
torch.__version__, 'CUDA', torch.version.cuda, '| triton', triton.__version__)" 2>&1

# 1. Build and install. CUDA_HOME: as given; else /usr/local/cuda where it has nvcc; else the
# toolkit of the nvcc on the PATH; else unset (torch's cpp_extension then looks for it).
if [[ -z ${CUDA_HOME:-} ]]; then
    if [[ -x /usr/local/cuda/bin/nvcc ]]; then
        export CUDA_HOME=/usr/local/cuda
    elif nvcc_path=$(command -v nvcc); then
        CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$nvcc_path")")")
        export CUDA_HOME
    fi
fi
echo "CUDA_HOME=${CUDA_HOME:-(unset: left to torch)}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# FIERCE_EXT_BUILD_CUDA=1 when nvcc exists and torch is a CUDA build: a failing extension build
# is then an error, not a silent fallback to a package without the cuda backend.
build_cuda=0
if { command -v nvcc >/dev/null 2>&1 || [[ -n ${CUDA_HOME:-} && -x $CUDA_HOME/bin/nvcc ]]; } \
        && "$python" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null
then
    build_cuda=1
fi
# shellcheck disable=SC2329  # (run by `step install` below, through bash -c)
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
        echo "nvcc or a CUDA torch not found: installed without the CUDA extension"
    fi
}
export python repo build_cuda
export -f install
step install 170 "$before_bench" bash -c install

# 2. Versions and backends.
step info 30 "$before_bench" "$python" -m fierce_ext

# 3. GPU tests of the kernels (the backends against the oracle, noise, determinism), in
# FIERCE_CHECK_SHARDS concurrent pytest processes: a first run is mostly Triton compiling kernel
# variants, one at a time per process. They leave the integration tests their share.
shards=${FIERCE_CHECK_SHARDS:-8}
measured="$logs/measured"
rm -rf "$measured"
export FIERCE_MEASURED_ERRORS=$measured
# shellcheck disable=SC2086
step gpu-tests 120 $(( before_bench + integration_min )) \
    env PYTHON="$python" SHARD_LOGS="$logs/gpu-tests" \
    bash benchmarks/pytest_shards.sh "$shards" \
    tests/gpu/test_triton_gpu.py tests/gpu/test_cuda_gpu.py -- ${FIERCE_CHECK_PYTEST_ARGS:--q --maxfail=5}

# 4. Training-loop integration (opcheck, a compiled step, autocast): correctness that only a GPU
# can check, so before every timing step.
# shellcheck disable=SC2086
step gpu-integration 90 "$before_bench" env PYTHON="$python" SHARD_LOGS="$logs/gpu-integration" \
    bash benchmarks/pytest_shards.sh "$shards" \
    tests/gpu/test_integration_gpu.py -- ${FIERCE_CHECK_PYTEST_ARGS:--q --maxfail=5}

# 5. The main benchmark, with at least bench_min seconds (what the steps above left).
bench_args=${FIERCE_CHECK_BENCH_ARGS:---shapes few-shot,hyperspectral,mid,large,xl --dtypes fp32,bf16}
# shellcheck disable=SC2086
step benchmark "${FIERCE_CHECK_BENCH_CAP:-150}" $(( age_min + summary_s )) \
    "$python" benchmarks/entropy_kernel.py $bench_args \
    --backends paper,torch,triton,cuda --out "$out/bench"

# 6. The age experiment's term: D = 1 (no tensor-core tile fits it), distance similarity.
step bench-age 40 "$summary_s" "$python" benchmarks/entropy_kernel.py --shapes age \
    --similarity distance --dtypes fp32 --backends paper,torch,triton,cuda --out "$out/bench-age"

# 7. Timing-only extras, with what is left. The host-side floor of an eager step
# (fierce_ext.entropy with a backend that does nothing) against each backend, at the paper's
# few-shot shape: is the step bound by the host? Then the paper's torch.compile (per case).
extra_step host-overhead 40 "$summary_s" "$python" benchmarks/host_overhead.py --shape 256,640,1,100
if (( $(remaining) - summary_s >= 45 )); then
    # shellcheck disable=SC2086
    extra_step bench-compiled 200 "$summary_s" "$python" benchmarks/entropy_kernel.py $bench_args \
        --backends paper-compiled --out "$out/bench-compiled"
else
    status+=("$(printf '%-22s %-9s %5ss' bench-compiled skipped 0)  (less than 45 s left)")
fi

# 8. Summary, printed last.
echo
echo "=== summary ($((SECONDS - start)) s; logs in $logs)"
if [[ -d $measured ]]; then
    "$python" tests/measured_errors.py "$measured" >"$logs/measured-errors.txt" 2>&1
    "$python" tests/measured_errors.py "$measured" --top 15 2>&1
    echo "(all of them: $logs/measured-errors.txt)"
    echo
fi
"$python" - "$out/bench" "$out/bench-age" "$out/bench-compiled" <<'EOF' 2>&1
import json, sys
from pathlib import Path

rows = []
for folder in sys.argv[1:]:
    files = sorted(Path(folder).glob("*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        continue
    data = json.loads(files[-1].read_text())
    meta = data.get("meta", {})
    if not meta.get("complete", True):
        print(f"{files[-1]}: partial, {meta.get('cases_done')} of {meta.get('cases_total')} "
              "(shape, dtype) cases finished (the run was cut short)")
    similarity = meta.get("similarity", "cosine")
    for r in data["rows"]:
        if similarity != "cosine":
            r["shape"] = f"{r['shape']} ({similarity})"
        rows.append(r)
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
