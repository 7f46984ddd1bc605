"""Builds fierce_ext with its compiled extension `fierce_ext._C` (csrc/) where it can be built.

`fierce_ext._C` holds the CPU noise op (csrc/noise_cpu.cpp, for the torch backend) and, when
torch has CUDA and nvcc is found (CUDA_HOME), the CUDA kernels of the `cuda` backend. It needs
torch at build time (`pip install --no-build-isolation .`). Without torch, or when the optional
build fails (no compiler, say), the package installs without it: the torch backend then draws
its noise in numpy (same bits, slower) and the `cuda` backend reports why it is unavailable.
Where the CUDA kernels were only attempted (no switch) and fail, nvcc's major version differing
from torch's CUDA (torch refuses that build) or a compile error, the CPU op is still built.
Environment switches:
    FIERCE_EXT_BUILD_CUDA=1   require the CUDA kernels (fail if they cannot be built)
    FIERCE_EXT_BUILD_CUDA=0   build the CPU op only
    TORCH_CUDA_ARCH_LIST      target architectures (default: "8.0;9.0" when no GPU is visible)
"""

import os
import re
import subprocess
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
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    try:
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    except OSError as error:
        return f"{nvcc} cannot run ({error})"
    release = re.search(r"release (\d+)\.(\d+)", version)
    if release and release.group(1) != torch.version.cuda.split(".")[0]:
        # torch.utils.cpp_extension refuses such a build; say so before trying it.
        return (f"{nvcc} is CUDA {release.group(1)}.{release.group(2)}, torch "
                f"{torch.__version__} was built with CUDA {torch.version.cuda}: their major "
                f"versions must match (point CUDA_HOME at a matching toolkit)")
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

    def cpu_only():  # also the fallback when the CUDA kernels fail to build
        return cpp_extension.CppExtension(
            name="fierce_ext._C", sources=CPU_SOURCES, extra_compile_args=["-O3"])

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
        extension = cpu_only()
    # Optional unless the CUDA kernels were asked for: a failed build leaves a working package.
    required = switch in ON

    class BuildExtension(cpp_extension.BuildExtension):
        def run(self):  # the whole step: torch checks the compiler before building anything
            # A failed run leaves the compiler object (which torch has patched) and `inplace`
            # changed; a retry starts from the state finalize_options left.
            compiler, inplace = self.compiler, self.inplace
            try:
                super().run()
                return
            except Exception as error:  # RuntimeError from ninja, CalledProcessError, ...
                if required:
                    raise
                failure = error
            if reason is None:  # the CUDA kernels failed: the CPU op alone may still build
                print(f"fierce_ext: WARNING: building the CUDA kernels failed ({failure}); "
                      "building the CPU op only (FIERCE_EXT_BUILD_CUDA=1 makes this an error, "
                      "=0 skips the attempt)")
                # The same Extension object (finalize_options annotated it for setuptools),
                # given the CPU op's sources, flags and libraries.
                vars(self.extensions[0]).update(vars(cpu_only()))
                self.compiler, self.inplace = compiler, inplace
                try:
                    super().run()
                    return
                except Exception as error:
                    failure = error
            print(f"fierce_ext: WARNING: building fierce_ext._C failed ({failure}); "
                  "installing without it (FIERCE_EXT_BUILD_CUDA=1 makes this an error)")

    return extension, {"build_ext": BuildExtension}


extension, cmdclass = _extension()
setup(ext_modules=[extension] if extension else [], cmdclass=cmdclass)
