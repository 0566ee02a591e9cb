"""bench_tui.py runs (--quick) and prints each figure the issue sets a target for."""

from __future__ import annotations

import re
import subprocess

from tui_helpers import ROOT


def test_tui_benchmark_runs_and_prints_its_figures() -> None:
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "benchmarks/bench_tui.py", "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"first screen +[0-9.]+ s \(20,000 rows|first screen +[0-9.]+ s \([0-9,]+ rows", out), out
    assert re.search(r"peak RSS +[0-9]+ MB", out), out
    assert re.search(r"jump to the end +[0-9.]+ ms", out), out
    m = re.search(r"filter '.*' +[0-9.]+ s, ([0-9,]+) matches", out)
    assert m is not None and m.group(1) == "8,000", out  # 2 in 5 packets are RW to port 8000
