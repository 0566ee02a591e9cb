"""cffi builder for the simulated guest's bulk sender and receiver in C
(``vsproxy.simguest._cblast``, used by ``cblast.py``), built by setup.py beside vsproxy's own
fast path; the simulated guest runs without it (the Python driver).

Test and benchmark code, kept out of vsproxy's hot module: the C lives in
``vsproxy/simguest/_c/`` (``cblast_cdef.h``, the declarations cffi reads; ``sg.h`` and
``sg_ring.c``, the ring helpers; ``blast.c``, ``drain.c``, ``send.c``) and takes the virtio names from
``vsproxy/_c/virtio_vsock.h``.
"""

from __future__ import annotations

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent  # where setup.py is
C_DIR = HERE / "_c"
SHARED_C_DIR = HERE.parent / "_c"  # virtio_vsock.h
SOURCES = ["blast.c", "drain.c", "rtt.c", "send.c", "lat.c", "sg_ring.c"]
# -Werror only where the C build is required (as vsproxy/_fastpath_build.py says why).
CFLAGS = ["-O2", "-Wall", "-Wextra"] + (["-Werror"] if os.environ.get("VSPROXY_REQUIRE_C") == "1" else [])


def _rel(path: Path) -> str:
    """A path as setuptools wants it: relative to setup.py's directory, where builds run."""
    return path.relative_to(ROOT).as_posix()


ffibuilder = FFI()
ffibuilder.cdef((C_DIR / "cblast_cdef.h").read_text())
ffibuilder.set_source(
    "vsproxy.simguest._cblast",
    '#include "cblast.h"',
    sources=[_rel(C_DIR / name) for name in SOURCES],
    include_dirs=[_rel(C_DIR), _rel(SHARED_C_DIR)],
    extra_compile_args=CFLAGS,
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(ROOT), verbose=True)  # in place, as pip install -e builds it
