"""Builds fierce_ext with its compiled extension `fierce_ext._C` (csrc/) where it can be built.

`fierce_ext._C` holds the CPU noise op (csrc/noise_cpu.cpp, for the torch backend) and, when
torch has CUDA and nvcc is found (CUDA_HOME), the CUDA kernels of the `cuda` backend. It needs
torch at build time (`pip install --no-build-isolation .`). Without torch, or when the optional
build fails (no compiler, say), the package installs without it: the torch backend then draws
its noise in numpy (same bits, slower) and the `cuda` backend reports why it is unavailable.
Environment switches:
    FIERCE_EXT_BUILD_CUDA=1   require the CUDA kernels (fail if they cannot be built)
    FIERCE_EXT_BUILD_CUDA=0   build the CPU op only
    TORCH_CUDA_ARCH_LIST      target architectures (default: "8.0;9.0" when no GPU is visible)
"""

import os
import sys

from setuptools import setup

CPU_SOURCES = ["csrc/module.cpp", "csrc/noise_cpu.cpp"]
CUDA_SOURCES = ["csrc/fierce_ops.cpp", "csrc/fierce_kernels.cu"]
ON = ("1", "yes", "true", "on")
OFF = ("0", "no", "false", "off")


def _cuda_reason(torch, cpp_extension, switch):
    """Why the CUDA kernels are not built, or None when they are."""
    if switch in OFF:
        return "FIERCE_EXT_BUILD_CUDA=0"
    if not torch.version.cuda:
        return f"torch {torch.__version__} is a CPU build"
    if not cpp_extension.CUDA_HOME:
        return "nvcc / CUDA_HOME not found"
    return None


def _extension():
    switch = os.environ.get("FIERCE_EXT_BUILD_CUDA", "auto").strip().lower()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if switch in ON:
            sys.exit("fierce_ext: FIERCE_EXT_BUILD_CUDA=1 but torch is not importable at build "
                     "time (use pip install --no-build-isolation .)")
        print("fierce_ext: torch is not importable at build time (use pip install "
              "--no-build-isolation .): installing without the compiled extension")
        return None, {}
    reason = _cuda_reason(torch, cpp_extension, switch)
    if reason is not None and switch in ON:
        sys.exit(f"fierce_ext: FIERCE_EXT_BUILD_CUDA=1 but the CUDA kernels cannot be built: "
                 f"{reason}")
    # No -std flag: torch's BuildExtension picks the standard its headers need (C++20 for torch
    # 2.14, whose ATen.h rejects C++17). No --use_fast_math: it would change logf/expf and so
    # the Gumbel noise that every backend must share.
    if reason is None:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        extension = cpp_extension.CUDAExtension(
            name="fierce_ext._C", sources=CPU_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]})
    else:
        print(f"fierce_ext: not building the CUDA kernels ({reason}); the torch and triton "
              "backends do not need them")
        extension = cpp_extension.CppExtension(
            name="fierce_ext._C", sources=CPU_SOURCES, extra_compile_args=["-O3"])
    # Optional unless the CUDA kernels were asked for: a failed build leaves a working package.
    extension.optional = switch not in ON

    class BuildExtension(cpp_extension.BuildExtension):
        def run(self):  # the whole step: torch checks the compiler before building anything
            try:
                super().run()
            except Exception as error:  # RuntimeError from ninja, CalledProcessError, ...
                if not all(getattr(ext, "optional", False) for ext in self.extensions):
                    raise
                print(f"fierce_ext: WARNING: building fierce_ext._C failed ({error}); "
                      "installing without it (FIERCE_EXT_BUILD_CUDA=1 makes this an error)")

    return extension, {"build_ext": BuildExtension}


extension, cmdclass = _extension()
setup(ext_modules=[extension] if extension else [], cmdclass=cmdclass)
