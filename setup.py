"""Builds the optional C extensions: vsproxy's fast path (vsproxy._fastpath, from vsproxy/_c/)
and the simulated guest's bulk sender and receiver (vsproxy.simguest._cblast, from
vsproxy/simguest/_c/). vsproxy works without them, in pure Python: without a compiler the
install goes on without them. With VSPROXY_REQUIRE_C=1 (tests/run.sh, CI) a build that fails
fails the install instead."""

import importlib.util
import os
import pathlib

from setuptools import Extension, setup

ROOT = pathlib.Path(__file__).resolve().parent
BUILDERS = ["vsproxy/_fastpath_build.py", "vsproxy/simguest/_cblast_build.py"]
REQUIRE_C = os.environ.get("VSPROXY_REQUIRE_C", "") not in ("", "0")


def extension(path: str) -> Extension:
    """The setuptools Extension of one cffi builder, loaded from its file (not imported, so
    vsproxy itself is not)."""
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, ROOT / path)
    assert spec is not None and spec.loader is not None
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    ext = builder.ffibuilder.distutils_extension(tmpdir="build")
    # no compiler or headers: install anyway, run in pure Python (unless the C is required)
    ext.optional = not REQUIRE_C
    return ext


ext_modules = []
for path in BUILDERS:
    try:
        ext_modules.append(extension(path))
    except Exception as e:
        if REQUIRE_C:
            raise
        print(f"vsproxy: building without {path}: {e}")

setup(ext_modules=ext_modules)
