"""Connection churn leaves nothing behind in vsproxy (issue 18 item 5).

2,000 connect/transfer/close cycles of each kind (the guest to a host unix listener, the guest
to a TCP listener through ``forward``, a host program into a guest listener through the hybrid
socket's ``CONNECT``), every echo checked, against a real vsproxy process: afterwards its open
descriptors and connection table are exactly what they were after the warm-up and its RSS
within the benchmark's bound. benchmarks/bench_churn.py runs the same with 100,000 each.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_churn import RSS_BOUND_KIB, run_churn  # noqa: E402 (benchmarks/ is put on the path just above)


def test_churn_of_each_kind_returns_fds_table_and_rss_to_the_baseline() -> None:
    lines: list[str] = []
    res = run_churn(2000, warmup=300, report=lines.append)
    assert set(res.rates) == {"guest->unix", "guest->tcp", "host->guest"}
    assert all(rate > 0 for rate in res.rates.values()), lines
    assert res.before.table == 0 and res.after.table == 0
    assert res.after.fds == res.before.fds, (res.before, res.after)
    assert res.after.rss_kib - res.before.rss_kib <= RSS_BOUND_KIB, (res.before, res.after)
    assert res.guest_conns == 0
    assert res.ok


def test_churn_benchmark_quick_run_prints_rates_and_both_baselines() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/bench_churn.py", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for kind in ("guest->unix", "guest->tcp", "host->guest"):
        assert any(line.startswith(kind) and line.endswith("cycles/s") for line in out.splitlines()), out
    rows = {line.split()[0] + (" " + line.split()[1] if line.startswith(("open", "conn")) else ""): line
            for line in out.splitlines() if line.startswith(("open fds", "conn table", "RSS KiB"))}
    assert set(rows) == {"open fds", "conn table", "RSS"}, out
    assert rows["open fds"].endswith("same") and rows["conn table"].endswith("same")
    assert "baseline: back" in out
