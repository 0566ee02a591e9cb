"""The coverage gate of tests/run.sh (tests/input_coverage.py) reads coverage.py's report per
module and fails on any module under the bar, not only on the total."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from input_coverage import FileCoverage, below, python_coverage

Figures = tuple[int, int, int, int, float]  # statements, missing, branches, covered branches, percent


def summary(f: Figures) -> dict[str, float]:
    s, m, b, cb, p = f
    return {"num_statements": s, "missing_lines": m, "num_branches": b, "covered_branches": cb, "percent_covered": p}


def report(tmp_path: Path, files: dict[str, Figures], functions: dict[str, dict[str, Figures]] | None = None) -> Path:
    """A coverage.py JSON report: per file (and per function, for some) its figures."""
    per = functions or {}
    data = {"files": {path: {"summary": summary(f),
                             "functions": {n: {"summary": summary(ff)} for n, ff in per.get(path, {}).items()}}
                      for path, f in files.items()}}
    out = tmp_path / "coverage.json"
    out.write_text(json.dumps(data))
    return out


def test_one_module_under_the_bar_fails_even_when_the_total_is_above(tmp_path: Path) -> None:
    files = python_coverage(report(tmp_path, {
        "vsproxy/virtq.py": (1000, 0, 400, 400, 100.0),
        "vsproxy/memory.py": (50, 5, 10, 6, 85.0),
        "vsproxy/vhost_user/__init__.py": (0, 0, 0, 0, 100.0),
    }))
    assert [f.path for f in files] == ["vsproxy/memory.py", "vsproxy/vhost_user/__init__.py", "vsproxy/virtq.py"]
    assert files[0] == FileCoverage("vsproxy/memory.py", 50, 5, 10, 4, 85.0)
    assert [f.path for f in below(files, 95.0)] == ["vsproxy/memory.py"]


def test_modules_at_or_above_the_bar_and_empty_ones_pass(tmp_path: Path) -> None:
    files = python_coverage(report(tmp_path, {"a.py": (20, 1, 0, 0, 95.0), "b.py": (0, 0, 0, 0, 0.0)}))
    assert below(files, 95.0) == []
    assert [f.path for f in below(files, 95.01)] == ["a.py"]


def test_a_file_gated_per_function_fails_on_its_functions_not_on_the_whole(tmp_path: Path) -> None:
    path = report(tmp_path, {"vsproxy/vsock/core.py": (300, 60, 100, 70, 80.0)},
                  {"vsproxy/vsock/core.py": {"VsockCore.guest_packet": (60, 0, 40, 40, 100.0),
                                             "VsockCore.tick": (20, 20, 10, 0, 0.0),
                                             "VsockCore._guest_request": (20, 2, 6, 5, 88.46)}})
    files = python_coverage(path, {"vsproxy/vsock/core.py": ("VsockCore.guest_packet", "VsockCore._guest_request")})
    assert [f.path for f in files] == ["vsproxy/vsock/core.py:VsockCore.guest_packet",
                                       "vsproxy/vsock/core.py:VsockCore._guest_request"]
    assert [f.path for f in below(files, 95.0)] == ["vsproxy/vsock/core.py:VsockCore._guest_request"]
    with pytest.raises(KeyError, match=r"no function VsockCore\.gone"):
        python_coverage(path, {"vsproxy/vsock/core.py": ("VsockCore.gone",)})


def test_the_readme_command_prints_each_module_and_the_c_figures() -> None:
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "tests/input_coverage.py", "--c"], cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = dict(re.findall(r"^  (vsproxy/\S+\.py)\s+([\d.]+)%", proc.stdout, re.M))
    for module in ("virtq.py", "memory.py", "vhost_user/codec.py", "vhost_user/session.py", "vsock/header.py",
                   "vsock/rxbuf.py"):
        assert float(rows[f"vsproxy/{module}"]) >= 95.0, (module, rows)
    core = dict(re.findall(r"^  vsproxy/vsock/core\.py:(\S+)\s+([\d.]+)%", proc.stdout, re.M))
    assert set(core) == {"VsockCore.guest_packet", "VsockCore.guest_rw_run", "VsockCore.guest_seq_run",
                         "VsockCore.guest_rw_tail", "VsockCore.guest_credit", "VsockCore._guest_request",
                         "VsockCore._guest_shutdown"}, core
    assert all(float(v) >= 95.0 for v in core.values()), core
    c_rows = re.findall(r"^  (\S+\.[ch])\s+lines\s+(\d+)/(\d+)\s+[\d.]+%\s+branches taken\s+(\d+)/(\d+)", proc.stdout,
                        re.M)
    assert {r[0] for r in c_rows} >= {"tx_batch.c", "tx_kick.c", "rx_fill.c", "own.c", "ring.h"}, proc.stdout
    for _name, hit, lines, taken, branches in c_rows:  # the C ran under the tests: counts, not zeros
        assert 0 < int(hit) <= int(lines) and 0 < int(taken) <= int(branches)
