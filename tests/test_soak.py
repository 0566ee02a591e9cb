"""The soak script (benchmarks/soak.py; CI runs it for two minutes in tests/run.sh): ten seconds
of mixed traffic through one vsproxy, every check passing and printed with its figures, and a
failed check ends it with exit status 1 and says what failed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHECKS = ("vsproxy alive", "no traceback on vsproxy's stderr", "descriptors at the baseline",
          "connection table at the baseline", "RSS within the bound", "denials counted exactly",
          "byte counters equal the guest's", "no faults, bad chains, spoofed packets or credit violations",
          "counters never go back", "the guest saw no protocol error",
          "nothing reached the denied port's host listener", "connection table empty at the end",
          "guest b served every sibling connection, no protocol error")


def soak(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "benchmarks/soak.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_ten_second_soak_runs_every_kind_of_traffic_and_passes_every_check() -> None:
    proc = soak("--seconds", "10")
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "soak: OK" in out and "Traceback" not in proc.stderr
    rounds = int(re.search(r"soak: \d+ s, (\d+) rounds", out).group(1))  # type: ignore[union-attr]
    assert rounds >= 2
    for what, pattern in (("bulk guest->host", r"bulk guest->host\s+([\d,]+) MiB"),
                          ("bulk host->guest", r"bulk host->guest\s+([\d,]+) MiB"),
                          ("request/response", r"request/response\s+([\d,]+) exchanges"),
                          ("churn", r"churn\s+([\d,]+) connect"),
                          ("denials", r"denials\s+([\d,]+)"),
                          ("sibling", r"sibling pair\s+([\d,]+) MiB")):
        m = re.search(pattern, out)
        assert m and int(m.group(1).replace(",", "")) > 0, (what, out)
    assert int(re.search(r"denials\s+([\d,]+)", out).group(1)) == rounds  # type: ignore[union-attr]
    for check in CHECKS:
        m = re.search(rf"^  {re.escape(check)}: (\d+)x$", out, re.M)
        assert m, (check, out)
        assert int(m.group(1)) == (1 if "at the end" in check or "guest b served" in check else rounds)


def test_a_failed_check_ends_the_soak_with_status_1_and_names_it() -> None:
    proc = soak("--seconds", "1", "--rss-bound", "-1")  # no RSS can stay within -1 KiB of its own baseline
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"^FAILED: RSS \d+ KiB, 0 KiB above the baseline's \d+ \(bound -1\)$", proc.stdout, re.M)
    assert "soak: OK" not in proc.stdout and "Traceback" not in proc.stderr


def test_vsproxy_killed_mid_soak_fails_it_at_once_and_says_so() -> None:
    proc = subprocess.Popen([sys.executable, "benchmarks/soak.py", "--seconds", "60"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("baseline after round 1:"), first
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            children = [int(pid) for pid in f.read().split()]
        vsproxy = []
        for pid in children:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"-m\0vsproxy\0" in f.read():
                    vsproxy.append(pid)
        assert len(vsproxy) == 1, children
        os.kill(vsproxy[0], signal.SIGKILL)  # the soak's own vsproxy, by its pid
        start = time.monotonic()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, out[-3000:] + err[-3000:]
    assert time.monotonic() - start < 60  # not by running out its time
    assert re.search(r"^FAILED: .*vsproxy exited", out, re.M), out[-3000:]  # the check, or a guest call that failed
    assert "soak: OK" not in out and "Traceback" not in err, err[-3000:]
