"""`python -m fierce_ext`: versions, devices and which backends can run where."""

from __future__ import annotations

import platform

import torch

import fierce_ext
from fierce_ext import _extension, noise
from fierce_ext.backends import available_backends


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except Exception as error:  # report, never crash: this is a diagnostic
        return f"not importable ({type(error).__name__})"
    return getattr(module, "__version__", "unknown")


def _compiled() -> str:
    """What fierce_ext._C provides here."""
    reason = _extension.load()
    if reason is not None:
        return f"fierce_ext._C not loaded: {reason} (CPU noise in numpy)"
    parts = ["fierce_ext._C: CPU noise op " + ("yes" if noise.compiled_uniform() else "no"),
             "CUDA kernels " + ("yes" if _extension.has_ops("cuda_histogram_forward") else "no")]
    return ", ".join(parts)


def report() -> str:
    lines = [
        f"fierce_ext {fierce_ext.__version__}",
        f"python     {platform.python_version()} ({platform.machine()})",
        f"torch      {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"triton     {_version('triton')}",
        f"numpy      {_version('numpy')}",
        f"compiled   {_compiled()}",
        "",
        "devices:",
        "  cpu",
    ]
    devices = ["cpu"]
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        lines.append(f"  cuda:{index}  {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                     f"sm_{props.major}{props.minor}")
        devices.append(f"cuda:{index}")
    if len(devices) == 1:
        lines.append("  (no CUDA device)")
    for device in devices:
        lines += ["", f"backends on {device}:"]
        for name, status in available_backends(device).items():
            mark = "yes" if status.available else "no "
            lines.append(f"  {mark}  {name:<10} {'' if status.available else status.reason}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
