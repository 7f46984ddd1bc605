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
#
# Takes about 3 minutes on 2 cores with a fresh venv (torch install ~1 min, build ~1.5 min).
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
cp "$repo/tests/test_cuda_build.py" "$repo/tests/cuda_emulator.py" "$work/tests/"
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

echo
echo "=== CUDA build check timings"
printf '%s\n' "${timings[@]}"
printf '%-34s %4ss\n' "total" $((SECONDS - start))
