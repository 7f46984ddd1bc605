#!/usr/bin/env bash
# CI step: the test suite on another software stack, named by the first argument:
#
#   gpu-machine  the GPU machine's (ENVIRONMENT.md: Python 3.12, torch 2.11.0+cu130, triton 3.6.0),
#                without its GPU, so that an API that torch 2.11 or triton 3.6 lacks is found
#                before a (rare, 15-minute) GPU session instead of during it. The CUDA kernels are
#                built for sm_90 and required; tests/experiments is left out (POT is not on the GPU
#                machine). numpy < 2.4: triton 3.6's interpreter fails on runtime-bounded loops
#                with numpy >= 2.4 (triton issue 9171; the GPU machine's numpy 2.5 is fine there
#                because nothing is interpreted).
#   floor        the oldest Python, torch and numpy pyproject.toml admits: Python 3.10, torch
#                2.4.1 (its CUDA 12.1 build from PyPI, with the triton 3.0.0 it pins), numpy
#                1.26.4, and the experiments' packages: the whole suite. Beside nvcc 13.0, setup.py
#                builds the CPU noise op only (the major versions differ), which is then
#                required; the Triton tests skip (3.0.0 is older than the 3.6 the kernels need).
#   newest       the newest Python this machine has, 3.13, with the newest torch its pip admits,
#                2.14.1 (the CUDA 13.0 build from PyPI) and the triton 3.8.0 it pins, and the
#                experiments' packages: the whole suite, as a user with a current Python runs it.
#                The CPU noise op only (required): .ci/check_cuda_build.sh builds the CUDA kernels
#                against this torch.
#
# Each stack gets a venv OUTSIDE the repo (reused when a previous run left a working one;
# FIERCE_STACK_VENV picks its path; torch and its CUDA libraries from PyPI, 4-5 GB), an editable
# install of a copy of the repo that must hold the compiled CPU noise op, and `pytest tests` there.
# Where the Python or the packages cannot be had (no pyenv, no registry), it prints
# "STACK CHECK NOT RUN" and exits 0: that is a missing check, not a result. A failing build or
# test exits non-zero.
set -euo pipefail

stack=${1:-}
repo=$(cd "$(dirname "$0")/.." && pwd)
case $stack in
    gpu-machine)
        python_version=3.12 torch_version=2.11.0 triton_version=3.6.0
        extra_packages=('numpy<2.4')
        build_env=(CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST=9.0 FIERCE_EXT_BUILD_CUDA=1)
        test_env=(FIERCE_EXT_REQUIRE_EXTENSION=1)  # the CUDA kernels' tests must not skip
        install_target=.
        pytest_args=(--ignore=tests/experiments)
        ;;
    floor)
        python_version=3.10 torch_version=2.4.1 triton_version=3.0.0
        extra_packages=(numpy==1.26.4)
        build_env=()
        test_env=()
        install_target=".[test,experiments]"
        pytest_args=()
        ;;
    newest)
        python_version=3.13 torch_version=2.14.1 triton_version=3.8.0
        extra_packages=(numpy)
        build_env=(FIERCE_EXT_BUILD_CUDA=0)
        test_env=()
        install_target=".[test,experiments]"
        # The sm_90 compile of every Triton kernel (~40 s) depends on triton, and this is the
        # triton 3.8.0 that README's command already compiles them with.
        pytest_args=(--ignore=tests/test_triton_codegen.py)
        ;;
    *)
        echo "usage: $0 gpu-machine|floor|newest" >&2
        exit 2
        ;;
esac
packages=("torch==$torch_version" "triton==$triton_version" "${extra_packages[@]}")
venv=${FIERCE_STACK_VENV:-/tmp/fierce-$stack-venv}
work=$(mktemp -d "/tmp/fierce-$stack.XXXXXX")
trap 'rm -rf "$work"' EXIT
case "$venv/" in "$repo"/*) echo "FIERCE_STACK_VENV must be outside the repo" >&2; exit 2;; esac
start=$SECONDS

python=
for candidate in "python$python_version" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$python_version"*/bin/python; do
    if "$candidate" -c "import sys; sys.exit('%d.%d' % sys.version_info[:2] != '$python_version')" \
            2>/dev/null; then
        python=$candidate
        break
    fi
done
if [[ -z $python ]]; then
    echo "STACK CHECK NOT RUN ($stack): no python$python_version on this machine"
    exit 0
fi

if "$venv/bin/python" - "$python_version" "$torch_version" "$triton_version" <<'EOF' 2>/dev/null
import sys, torch, triton, numpy, pytest, hypothesis, ninja, setuptools  # noqa: F401
sys.exit(0 if "%d.%d" % sys.version_info[:2] == sys.argv[1]
         and torch.__version__.split("+")[0] == sys.argv[2]
         and triton.__version__ == sys.argv[3] else 1)
EOF
then
    echo "reusing $venv"
else
    rm -rf "$venv"
    "$python" -m venv "$venv"
    if ! "$venv/bin/pip" install -q "${packages[@]}" pytest hypothesis ninja pybind11 \
            setuptools wheel; then
        rm -rf "$venv"
        echo "STACK CHECK NOT RUN ($stack): ${packages[*]} could not be installed"
        exit 0
    fi
fi
"$venv/bin/python" -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0],
'| torch', torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__)"

mkdir -p "$work/src"
tar -C "$repo" --exclude=.git --exclude=build --exclude='*.egg-info' --exclude='*.so' \
    --exclude=.pytest_cache --exclude=.hypothesis --exclude=__pycache__ -cf - . \
    | tar -C "$work/src" -xf -
cd "$work/src"
# The stack's pins ride along, so that the extras cannot move them (pip would rather fail).
env "${build_env[@]}" MAX_JOBS="${MAX_JOBS:-2}" \
    "$venv/bin/pip" install -q --no-build-isolation -e "$install_target" "${packages[@]}"
"$venv/bin/python" -m fierce_ext | sed -n 1,6p
"$venv/bin/python" -c "from fierce_ext import noise, _extension
assert noise.compiled_uniform() is not None, _extension.load() or 'philox_uniform_ not registered'"
# 25 minutes (a run takes up to ~8 in CI): a hang ends with pytest's traceback (SIGINT), not CI's limit.
env "${test_env[@]}" timeout -s INT -k 60 1500 \
    "$venv/bin/python" -m pytest tests -q -p no:cacheprovider "${pytest_args[@]}"
echo "stack check ($stack): $((SECONDS - start)) s"
