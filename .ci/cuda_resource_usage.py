"""Print registers, stack frame (where ptxas puts spilled registers) and tensor-core
instructions (HMMA/DMMA in the SASS) of every kernel in the installed fierce_ext._C, read with the
cuobjdump that Triton's wheel ships (the CUDA toolkit on the CI machines has none; Triton comes
with the CUDA build of torch)."""

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
sass = subprocess.run([str(tool), "-sass", extension.__file__], capture_output=True, text=True,
                      check=True).stdout
tensor_cores = {}
for block in re.split(r"\n\s*Function : ", sass)[1:]:
    name, body = block.split("\n", 1)
    tensor_cores[name.strip()] = ",".join(sorted(set(re.findall(r"\b([HD]MMA\.[A-Z0-9.]+)",
                                                                   body)))) or "-"
archs = re.findall(r"arch = (sm_\d+)", text)
names = re.findall(r"Function (\S+):", text)
usage = re.findall(r"REG:(\d+) STACK:(\d+)", text)
demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                           text=True).stdout.splitlines()
if len(demangled) != len(names):
    demangled = names
print(f"{'kernel (' + ','.join(sorted(set(archs))) + ')':<40} {'regs':>4} {'stack':>5}  "
      "tensor cores")
for name, mangled, (registers, stack) in sorted(zip(demangled, names, usage)):
    short = re.sub(r"\(anonymous namespace\)::|fierce::|^void ", "", name)
    short = re.sub(r"\([^()]*\)$", "", short)  # the parameter list
    short = re.sub(r"\(GemmMode\)(\d)", lambda m: GEMM_MODES[int(m.group(1))], short)
    print(f"{short[:40]:<40} {registers:>4} {stack:>5}  {tensor_cores.get(mangled, '?')}")
