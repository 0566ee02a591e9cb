"""The coverage gate of tests/run.sh (tests/input_coverage.py) reads coverage.py's report per
module and fails on any module under the bar, not only on the total."""

from __future__ import annotations

import json
from pathlib import Path

from input_coverage import FileCoverage, below, python_coverage


def report(tmp_path: Path, files: dict[str, tuple[int, int, int, int, float]]) -> Path:
    """A coverage.py JSON report: per file statements, missing, branches, covered branches, percent."""
    data = {"files": {path: {"summary": {"num_statements": s, "missing_lines": m, "num_branches": b,
                                         "covered_branches": cb, "percent_covered": p}}
                      for path, (s, m, b, cb, p) in files.items()}}
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
