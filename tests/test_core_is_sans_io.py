"""The vsock core is sans-I/O: its modules import no sockets, selectors, threads, clocks,
mappings or the C wrapper. The shell injects what the core needs of those."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = sorted((Path(__file__).resolve().parent.parent / "vsproxy" / "vsock").glob("*.py"))
FORBIDDEN = ("socket", "select", "selectors", "threading", "time", "mmap", "asyncio",
             "vsproxy.fastpath", "vsproxy._fastpath", "vsproxy.loop", "vsproxy.device")


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # "from vsproxy import fastpath"
    return names


def test_the_core_modules_are_the_ones_expected() -> None:
    assert {p.stem for p in CORE} >= {"core", "table", "credit", "credit_flow", "seqpacket", "tohost", "rx",
                                      "rxbuf", "lending", "connection", "header"}


@pytest.mark.parametrize("path", CORE, ids=[p.name for p in CORE])
def test_a_core_module_imports_nothing_that_does_io(path: Path) -> None:
    bad = sorted(n for n in imported(path) if any(n == f or n.startswith(f + ".") for f in FORBIDDEN))
    assert not bad, f"{path.name} imports {bad}"


def test_the_check_would_catch_an_import_of_the_c_wrapper(tmp_path: Path) -> None:
    p = tmp_path / "bad.py"
    p.write_text("from vsproxy import fastpath\nimport time\n")
    assert {"vsproxy.fastpath", "time"} <= imported(p)
