"""The C extensions: built here (CI and tests/run.sh install with VSPROXY_REQUIRE_C=1, and this
machine has a compiler), carried by the sdist, and setup.py's fallback to pure Python kept for
installs without a compiler but refused with VSPROXY_REQUIRE_C=1."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from vsproxy import fastpath
from vsproxy.simguest import cblast

ROOT = Path(__file__).resolve().parent.parent
C_DIRS = ["vsproxy/_c", "vsproxy/simguest/_c"]
# What setup.py needs to build the extensions in a copy of the tree.
BUILD_FILES = ["setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "vsproxy/_fastpath_build.py",
               "vsproxy/simguest/_cblast_build.py"]
WHY = ("with VSPROXY_REQUIRE_C=1" if os.environ.get("VSPROXY_REQUIRE_C")
       else "in CI" if os.environ.get("CI") else "on a machine with a C compiler")


def c_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for d in C_DIRS for p in (ROOT / d).iterdir() if p.suffix in (".c", ".h"))


@pytest.mark.parametrize("module", ["vsproxy._fastpath", "vsproxy.simguest._cblast"])
def test_the_extension_is_built(module: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - the failure this test is for
        pytest.fail(f"{module} was not built {WHY}: pip install -e . with VSPROXY_REQUIRE_C=1 says why ({e})")


def test_the_c_paths_are_on_unless_turned_off() -> None:
    on = not os.environ.get("VSPROXY_NO_C")
    assert fastpath.AVAILABLE == on, f"vsproxy.fastpath.AVAILABLE is {fastpath.AVAILABLE} {WHY}"
    assert cblast.AVAILABLE == on, f"vsproxy.simguest.cblast.AVAILABLE is {cblast.AVAILABLE} {WHY}"


def test_the_sdist_carries_every_c_file() -> None:
    files = c_files()
    assert "vsproxy/_c/fastpath_cdef.h" in files and "vsproxy/simguest/_c/blast.c" in files
    with tempfile.TemporaryDirectory(prefix="vsp-sdist-") as tmp:
        subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", tmp], cwd=ROOT, check=True,
                       capture_output=True)
        (tarball,) = Path(tmp).glob("vsproxy-*.tar.gz")
        with tarfile.open(tarball) as tar:
            names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert set(files) <= names, sorted(set(files) - names)
    assert set(BUILD_FILES) <= names, sorted(set(BUILD_FILES) - names)


def build_copy(tmp: Path, require_c: bool) -> subprocess.CompletedProcess[str]:
    """setup.py build_ext in a copy of what it needs, with a compiler that always fails."""
    for name in [*BUILD_FILES, *c_files()]:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tmp / name)
    env = {k: v for k, v in os.environ.items() if k not in ("VSPROXY_REQUIRE_C", "CC")}
    env["CC"] = "false"
    if require_c:
        env["VSPROXY_REQUIRE_C"] = "1"
    return subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("require_c", [False, True])
def test_a_failed_build_falls_back_to_python_unless_the_c_is_required(require_c: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="vsp-build-") as tmp:
        proc = build_copy(Path(tmp), require_c)
        built = list(Path(tmp).glob("vsproxy/**/*.so"))
    assert built == []
    if require_c:
        assert proc.returncode != 0, proc.stdout[-2000:]
    else:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
