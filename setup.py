"""Builds fierce_ext, with the compiled CUDA extension `fierce_ext._C` where it can be built.

The extension is built when torch has CUDA and nvcc is found (CUDA_HOME); otherwise the package
installs without it and the `cuda` backend reports why it is unavailable. Environment switches:
    FIERCE_EXT_BUILD_CUDA=1   require the extension (fail if it cannot be built)
    FIERCE_EXT_BUILD_CUDA=0   never build it
    TORCH_CUDA_ARCH_LIST      target architectures (default: "8.0;9.0" when no GPU is visible)
"""

import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_extension():
    switch = os.environ.get("FIERCE_EXT_BUILD_CUDA", "auto").strip().lower()
    if switch in ("0", "no", "false", "off"):
        print("fierce_ext: FIERCE_EXT_BUILD_CUDA=0, not building the CUDA extension")
        return None, {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        reason = "torch is not importable at build time (use pip install --no-build-isolation .)"
    else:
        if not torch.version.cuda:
            reason = f"torch {torch.__version__} is a CPU build"
        elif not cpp_extension.CUDA_HOME:
            reason = "nvcc / CUDA_HOME not found"
        else:
            reason = None
    sources_dir = os.path.join(ROOT, "csrc")
    sources = sorted(
        os.path.join("csrc", name) for name in os.listdir(sources_dir)
        if name.endswith((".cpp", ".cu"))
    ) if os.path.isdir(sources_dir) else []
    if reason is None and not sources:
        reason = "csrc/ holds no sources"
    if reason is not None:
        if switch in ("1", "yes", "true", "on"):
            sys.exit(f"fierce_ext: FIERCE_EXT_BUILD_CUDA=1 but the CUDA extension cannot be "
                     f"built: {reason}")
        print(f"fierce_ext: not building the CUDA extension ({reason}); "
              "the torch and triton backends do not need it")
        return None, {}
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    extension = cpp_extension.CUDAExtension(
        name="fierce_ext._C",
        sources=sources,
        # No -std flag: torch's BuildExtension picks the standard its headers need (C++20 for
        # torch 2.14, whose ATen.h rejects C++17). No --use_fast_math: it would change
        # logf/expf and so the Gumbel noise that every backend must share.
        extra_compile_args={"cxx": ["-O3"],
                            "nvcc": ["-O3", "-lineinfo"]},
    )
    return extension, {"build_ext": cpp_extension.BuildExtension}


extension, cmdclass = _cuda_extension()
setup(ext_modules=[extension] if extension else [], cmdclass=cmdclass)
