"""The source distribution builds what a checkout builds; the wheel carries the py.typed marker.

`pip install fierce_ext-<version>.tar.gz` (a release, `pip download`, a wheel built from an
sdist) compiles fierce_ext._C from the files the sdist carries. setup.py names only the sources
it compiles on the machine that makes the sdist, never the headers they include, so without
MANIFEST.in the extension failed to build from it (csrc/noise_cpu.cpp includes philox.cuh) and
the package installed without it, with a warning only.
"""

from __future__ import annotations

import os
import pathlib
import posixpath
import re
import shutil
import subprocess
import sys
import tarfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUILD_FILES = ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "LICENSE")
SOURCE_SUFFIXES = {".c", ".cc", ".cpp", ".cu", ".cuh", ".h", ".hpp"}


def _setup(tmp_path, *command):
    """Runs `setup.py *command` on a CPU-only build configuration in a copy of the checkout's
    build inputs (so that no egg-info lands in the checkout); returns the completed process."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in BUILD_FILES:
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, tree / name)
    ignore = shutil.ignore_patterns("*.so", "*.o", "__pycache__", "build")
    for folder in ("fierce_ext", "csrc"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=ignore)
    env = dict(os.environ, FIERCE_EXT_BUILD_CUDA="0")
    return subprocess.run([sys.executable, "setup.py", "-q", *command], cwd=tree, env=env,
                          check=True, capture_output=True, text=True)


def _sdist_names(tmp_path):
    """The paths inside an sdist, and the build's output."""
    build = _setup(tmp_path, "sdist", "-d", str(tmp_path / "dist"))
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    return names, build.stdout + build.stderr


def test_sdist_carries_every_csrc_source_and_header(tmp_path):
    names, _ = _sdist_names(tmp_path)
    sources = {path.relative_to(ROOT).as_posix() for path in (ROOT / "csrc").rglob("*")
               if path.suffix in SOURCE_SUFFIXES}
    assert "csrc/philox.cuh" in sources and "csrc/fierce_kernels.cu" in sources
    assert sources - names == set()
    # Every quoted include of those files resolves inside the sdist.
    for source in sorted(sources):
        text = (ROOT / source).read_text()
        for include in re.findall(r'^\s*#\s*include\s+"([^"]+)"', text, flags=re.M):
            target = posixpath.normpath(posixpath.join(posixpath.dirname(source), include))
            assert target in names, f"{source} includes {include}, missing from the sdist"
    assert not any(name.endswith((".so", ".o", ".pyc")) for name in names)
    assert "fierce_ext/backends/fused_triton.py" in names


def test_sdist_has_the_license_and_no_deprecated_metadata(tmp_path):
    # setuptools deprecates pyproject's TOML-table `license` (an error after 2027-02-18).
    names, output = _sdist_names(tmp_path)
    assert "LICENSE" in names
    assert "SetuptoolsDeprecationWarning" not in output, output


def test_wheel_carries_the_py_typed_marker(tmp_path):
    # PEP 561: without fierce_ext/py.typed in the installed package, mypy and pyright ignore its
    # annotations (an untyped import). build_py copies what a wheel gets besides the extension.
    lib = tmp_path / "lib"
    _setup(tmp_path, "build_py", "--build-lib", str(lib))
    assert (lib / "fierce_ext" / "functional.py").is_file()
    assert (lib / "fierce_ext" / "py.typed").is_file()
