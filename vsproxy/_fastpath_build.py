"""cffi builder for the C fast path (``vsproxy._fastpath``), built by setup.py when a C compiler
and the Python headers are there; vsproxy runs without it (pure Python).

The C lives in ``vsproxy/_c/``: ``fastpath.h`` is the interface (``fastpath_cdef.h``, the
declarations cffi reads, and the values of their fields), one ``.c`` file per part (tx batch,
tx kick, rx fill, the lent connections, capture records), ``virtio_vsock.h`` and
``vsockmon.h`` mirror the Linux headers whose names it uses.
"""

from __future__ import annotations

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent  # where setup.py is
C_DIR = HERE / "_c"
SOURCES = ["tx_batch.c", "tx_kick.c", "rx_fill.c", "own.c", "capture.c"]
# Warnings are errors where the C build is required (CI: tests/run.sh sets VSPROXY_REQUIRE_C=1),
# so the C stays free of them; elsewhere a newer compiler's new warning must not silently leave a
# user on the pure-Python path.
CFLAGS = ["-O2", "-Wall", "-Wextra"] + (["-Werror"] if os.environ.get("VSPROXY_REQUIRE_C") == "1" else [])


def _rel(path: Path) -> str:
    """A path as setuptools wants it: relative to setup.py's directory, where builds run."""
    return path.relative_to(ROOT).as_posix()


ffibuilder = FFI()
ffibuilder.cdef((C_DIR / "fastpath_cdef.h").read_text())
ffibuilder.set_source(
    "vsproxy._fastpath",
    '#include "fastpath.h"',
    sources=[_rel(C_DIR / name) for name in SOURCES],
    include_dirs=[_rel(C_DIR)],
    extra_compile_args=CFLAGS,
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(ROOT), verbose=True)  # in place, as pip install -e builds it
