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
    m = re.search(r"taken in +([0-9,]+) packets/s, offered ([0-9,]+)/s by a writer process \(([0-9,]+) of ([0-9,]+) "
                  r"records", out)
    assert m is not None, out
    took, sent = (int(m.group(k).replace(",", "")) for k in (3, 4))
    d = re.search(r"feed drops +([0-9,]+) records", out)
    assert d is not None, out
    drops = int(d.group(1).replace(",", ""))
    assert 0 < took <= sent and took + drops <= sent, out  # every record taken in or counted, none twice
    assert re.search(r"key latency +p50 [0-9.]+ ms, p99 [0-9.]+ ms over [1-9][0-9]* key presses", out), out
    m = re.search(r"peak RSS ([0-9]+) MB \(UI process; ([0-9]+) MB the ingest process\) with ([0-9,]+) packets held "
                  r"\(the ring's bound: 200,000 packets\)", out)
    assert m is not None and int(m.group(3).replace(",", "")) <= 200_000, out
