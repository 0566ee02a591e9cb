"""Builds the optional C hot loop (vsproxy._fastpath); vsproxy works without it."""

from setuptools import setup

ext_modules = []
try:
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location(
        "_fastpath_build", pathlib.Path(__file__).parent / "vsproxy" / "_fastpath_build.py"
    )
    assert spec is not None and spec.loader is not None
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    ext = builder.ffibuilder.distutils_extension(tmpdir="build")
    ext.optional = True  # no compiler or headers: install anyway, run in pure Python
    ext_modules.append(ext)
except Exception as e:
    print(f"vsproxy: building without the C fast path: {e}")

setup(ext_modules=ext_modules)
