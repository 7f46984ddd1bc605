#!/usr/bin/env bash
# CI step: prove that the CUDA extension (csrc/) compiles and registers its ops, on a machine
# without a GPU (ENVIRONMENT.md's recipe). A compile error fails this script.
#
#   1. a second venv OUTSIDE the repo with the CUDA 13.0 build of torch 2.14.1 (reused when a
#      previous run left a working one; FIERCE_CUDA_VENV picks its path),
#   2. `pip install --no-build-isolation` of a copy of the repo with FIERCE_EXT_BUILD_CUDA=1
#      (so a missing toolkit is an error too), CUDA_HOME=/usr/local/cuda and one target
#      architecture, 9.0, to keep CI short (setup.py's own default without a GPU is "8.0;9.0"),
#   3. tests/test_cuda_build.py against the installed package, run from outside the checkout so
#      that `import fierce_ext` finds the installed one, with FIERCE_EXT_REQUIRE_EXTENSION=1.
#      Its emulated-kernel tests need no extension and run in the main test suite; they are
#      deselected here.
#   4. setup.py's fallbacks, with stand-in toolkits (an nvcc script): where nvcc's major version
#      differs from torch's CUDA, or nvcc fails to compile, an automatic build still installs the
#      CPU noise op; with FIERCE_EXT_BUILD_CUDA=1 the mismatch is an error.
#
# Takes about 4 minutes on 2 cores with a fresh venv (torch install ~1 min, build ~1.5 min).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${FIERCE_CUDA_VENV:-/tmp/fierce-cuda-venv}
python=${PYTHON:-python3}
work=$(mktemp -d /tmp/fierce-cuda-check.XXXXXX)
trap 'rm -rf "$work"' EXIT
case "$venv/" in "$repo"/*) echo "FIERCE_CUDA_VENV must be outside the repo ($repo)" >&2; exit 2;; esac

start=$SECONDS
phase_start=$SECONDS
timings=()
phase() {  # end the current phase (its name: $1) and record its duration
    timings+=("$(printf '%-34s %4ss' "$1" $((SECONDS - phase_start)))")
    phase_start=$SECONDS
}

echo "=== CUDA build check: venv $venv, work dir $work"
if "$venv/bin/python" - <<'EOF' 2>/dev/null
import sys, torch, ninja, pytest, setuptools  # noqa: F401
sys.exit(0 if torch.__version__.startswith("2.14.1") and torch.version.cuda else 1)
EOF
then
    echo "reusing $venv"
else
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install -q torch==2.14.1 numpy ninja pybind11 pytest setuptools wheel
fi
"$venv/bin/python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
phase "venv (torch 2.14.1+cu130)"

mkdir -p "$work/src"
tar -C "$repo" --exclude=.git --exclude=build --exclude='*.egg-info' --exclude=.pytest_cache \
    --exclude=.hypothesis --exclude=__pycache__ -cf - . | tar -C "$work/src" -xf -
CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST="9.0" FIERCE_EXT_BUILD_CUDA=1 \
    MAX_JOBS=${MAX_JOBS:-2} "$venv/bin/pip" install -q --no-build-isolation --no-deps "$work/src"
phase "build + install (sm_90)"

# Registers and stack frames (spills) per kernel: informative, never fails the check.
"$venv/bin/python" "$repo/.ci/cuda_resource_usage.py" || echo "(resource usage unavailable)"
phase "resource usage (cuobjdump)"

mkdir -p "$work/tests"
cp "$repo/tests/test_cuda_build.py" "$repo/tests/cuda_emulator.py" "$repo/tests/oracle.py" \
    "$work/tests/"
(
    cd "$work/tests"
    "$venv/bin/python" -c "
import fierce_ext, fierce_ext._C
assert '$repo' not in fierce_ext.__file__, fierce_ext.__file__
print('installed:', fierce_ext._C.__file__)"
    FIERCE_EXT_REQUIRE_EXTENSION=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider \
        -k "not emulated" test_cuda_build.py
)
phase "tests/test_cuda_build.py"

# 4. Fallbacks. Each stand-in nvcc answers --version; "failing" refuses every compile.
fake_toolkit() {  # fake_toolkit NAME RELEASE
    mkdir -p "$work/$1/bin"
    printf '#!/bin/sh\n[ "$1" = --version ] && { echo "Cuda compilation tools, release %s"; exit 0; }\n%s\n' \
        "$2" "echo 'stand-in nvcc: no compiling here' >&2; exit 1" >"$work/$1/bin/nvcc"
    chmod +x "$work/$1/bin/nvcc"
}
fake_toolkit cuda-mismatch 12.1
fake_toolkit cuda-failing 13.0
for toolkit in cuda-mismatch cuda-failing; do
    case $toolkit in
        cuda-mismatch) expected="their major versions must match";;
        cuda-failing) expected="building the CUDA kernels failed";;
    esac
    rm -rf "$work/src/build"
    CUDA_HOME="$work/$toolkit" TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS=${MAX_JOBS:-2} \
        "$venv/bin/pip" install -v --no-build-isolation --no-deps --target "$work/$toolkit-install" \
        "$work/src" >"$work/$toolkit.log" 2>&1 || { tail -30 "$work/$toolkit.log"; exit 1; }
    grep -q "$expected" "$work/$toolkit.log" || { echo "$toolkit: no '$expected' in the build log" >&2; exit 1; }
    (cd "$work/tests" && PYTHONPATH="$work/$toolkit-install" "$venv/bin/python" -c "
from fierce_ext import _extension, noise
assert noise.compiled_uniform() is not None, _extension.load()
assert not _extension.has_ops('cuda_histogram_forward')
print('$toolkit: installed the CPU noise op without the CUDA kernels')")
done
rm -rf "$work/src/build"
if CUDA_HOME="$work/cuda-mismatch" FIERCE_EXT_BUILD_CUDA=1 "$venv/bin/pip" install -q \
        --no-build-isolation --no-deps --target "$work/required-install" "$work/src" \
        >"$work/required.log" 2>&1; then
    echo "FIERCE_EXT_BUILD_CUDA=1 with a mismatched nvcc installed instead of failing" >&2; exit 1
fi
grep -q "FIERCE_EXT_BUILD_CUDA=1 but the CUDA kernels cannot be built" "$work/required.log"
echo "FIERCE_EXT_BUILD_CUDA=1 with a mismatched nvcc: the install fails, naming why"
phase "setup.py fallbacks (stand-in nvcc)"

echo
echo "=== CUDA build check timings"
printf '%s\n' "${timings[@]}"
printf '%-34s %4ss\n' "total" $((SECONDS - start))
