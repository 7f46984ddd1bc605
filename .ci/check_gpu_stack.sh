#!/usr/bin/env bash
# CI step: the test suite on the GPU machine's software stack (ENVIRONMENT.md: Python 3.12,
# torch 2.11.0+cu130, triton 3.6.0), without its GPU, so that an API that torch 2.11 or triton 3.6
# lacks is found before a (rare, 15-minute) GPU session instead of during it:
#
#   1. a venv OUTSIDE the repo (reused when a previous run left a working one;
#      FIERCE_GPU_STACK_VENV picks its path) with python3.12, torch 2.11.0 (its CUDA 13.0 build,
#      from PyPI: about 4 GB), triton 3.6.0 and numpy < 2.4 (triton 3.6's interpreter fails on
#      runtime-bounded loops with numpy >= 2.4, triton issue 9171; the GPU machine's numpy 2.5
#      is fine there because nothing is interpreted);
#   2. an editable install of a copy of the repo with the CUDA kernels required
#      (FIERCE_EXT_BUILD_CUDA=1, CUDA_HOME=/usr/local/cuda, sm_90 only);
#   3. `pytest tests` there (the GPU modules skip without CUDA; the extension's tests must pass,
#      FIERCE_EXT_REQUIRE_EXTENSION=1), without tests/experiments (POT is not on the GPU machine).
#
# Where Python 3.12 or the packages cannot be had (no pyenv, no registry), it says so loudly and
# exits 0: that is a missing check, not a result. A failing build or test exits non-zero.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${FIERCE_GPU_STACK_VENV:-/tmp/fierce-gpu-stack-venv}
work=$(mktemp -d /tmp/fierce-gpu-stack.XXXXXX)
trap 'rm -rf "$work"' EXIT
case "$venv/" in "$repo"/*) echo "FIERCE_GPU_STACK_VENV must be outside the repo" >&2; exit 2;; esac
start=$SECONDS

python312=
for candidate in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python; do
    if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
        python312=$candidate
        break
    fi
done
if [[ -z $python312 ]]; then
    echo "GPU STACK CHECK NOT RUN: no python3.12 on this machine"
    exit 0
fi

if "$venv/bin/python" - <<'EOF' 2>/dev/null
import sys, torch, triton, numpy, pytest, hypothesis, ninja, setuptools  # noqa: F401
ok = torch.__version__.startswith("2.11.0") and triton.__version__ == "3.6.0"
sys.exit(0 if ok and sys.version_info[:2] == (3, 12) else 1)
EOF
then
    echo "reusing $venv"
else
    rm -rf "$venv"
    "$python312" -m venv "$venv"
    if ! "$venv/bin/pip" install -q torch==2.11.0 triton==3.6.0 'numpy<2.4' pytest hypothesis \
            ninja pybind11 setuptools wheel; then
        rm -rf "$venv"
        echo "GPU STACK CHECK NOT RUN: torch 2.11.0 / triton 3.6.0 could not be installed"
        exit 0
    fi
fi
"$venv/bin/python" -c "import sys, torch, triton; print('python', sys.version.split()[0],
'| torch', torch.__version__, '| triton', triton.__version__)"

mkdir -p "$work/src"
tar -C "$repo" --exclude=.git --exclude=build --exclude='*.egg-info' --exclude='*.so' \
    --exclude=.pytest_cache --exclude=.hypothesis --exclude=__pycache__ -cf - . \
    | tar -C "$work/src" -xf -
cd "$work/src"
CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST="9.0" FIERCE_EXT_BUILD_CUDA=1 \
    MAX_JOBS=${MAX_JOBS:-2} "$venv/bin/pip" install -q --no-build-isolation --no-deps -e .
"$venv/bin/python" -m fierce_ext | sed -n 1,6p
FIERCE_EXT_REQUIRE_EXTENSION=1 "$venv/bin/python" -m pytest tests -q -p no:cacheprovider \
    --ignore=tests/experiments
echo "GPU stack check: $((SECONDS - start)) s"
