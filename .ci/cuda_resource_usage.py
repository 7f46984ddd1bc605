"""Print registers and stack frame (where ptxas puts spilled registers) of every kernel in the
installed fierce_ext._C, read with the cuobjdump that Triton's wheel ships (the CUDA toolkit on
the CI machines has none; Triton comes with the CUDA build of torch)."""

import pathlib
import re
import subprocess

import triton

import fierce_ext._C as extension

# csrc/fierce.h's enum GemmMode, in order.
GEMM_MODES = ("half", "bfloat16", "tf32", "float", "double")

tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
text = subprocess.run([str(tool), "--dump-resource-usage", extension.__file__],
                      capture_output=True, text=True, check=True).stdout
archs = re.findall(r"arch = (sm_\d+)", text)
names = re.findall(r"Function (\S+):", text)
usage = re.findall(r"REG:(\d+) STACK:(\d+)", text)
demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                           text=True).stdout.splitlines()
if len(demangled) != len(names):
    demangled = names
print(f"{'kernel (' + ','.join(sorted(set(archs))) + ')':<64} {'regs':>4} {'stack':>5}")
for name, (registers, stack) in sorted(zip(demangled, usage)):
    short = re.sub(r"\(anonymous namespace\)::|fierce::|^void ", "", name)
    short = re.sub(r"\([^()]*\)$", "", short)  # the parameter list
    short = re.sub(r"\(GemmMode\)(\d)", lambda m: GEMM_MODES[int(m.group(1))], short)
    print(f"{short[:64]:<64} {registers:>4} {stack:>5}")
