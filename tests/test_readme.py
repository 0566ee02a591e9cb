"""The README's commands work as written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    m = re.match(r"```sh\n(.*?)\n```", text, re.S)
    assert m, "README must open with a sh block of two commands"
    lines = m.group(1).splitlines()
    assert len(lines) == 2
    return lines


def test_readme_opens_with_install_and_test_commands() -> None:
    run, test = readme_commands()
    assert "vsproxy demo" in run
    assert test == "bash tests/run.sh"
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("exec bash tests/run.sh")


def test_readme_install_and_demo_command_works_in_a_clean_copy() -> None:
    run, _ = readme_commands()
    with tempfile.TemporaryDirectory(prefix="vsp-readme-") as tmp:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout.split()
        for f in files:
            src = ROOT / f
            if src.is_file():
                dst = Path(tmp) / f
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
        env["DEBIAN_FRONTEND"] = "noninteractive"
        proc = subprocess.run(["bash", "-c", run], cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "Demo OK." in proc.stdout
        assert "sha256 matches" in proc.stdout
        assert "refused with RST" in proc.stdout
        assert "#4 Nitro heartbeat 0xB7" in proc.stdout  # vsproxy read of the capture, installed with pip
        assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr


def test_benchmark_runs_and_prints_every_figure() -> None:
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "benchmarks/bench_throughput.py", "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("guest->host", "host->guest"))]
    assert [(r[0], r[1]) for r in rows] == [
        ("guest->host", "65536"), ("guest->host", "65536"), ("guest->host", "4096"), ("guest->host", "64"),
        ("host->guest", "65536"), ("host->guest", "65536"), ("host->guest", "65536"), ("host->guest", "4096"),
        ("host->guest", "64"),
    ]
    assert [r[3] for r in rows if r[:2] == ["host->guest", "65536"]] == ["65580", "3776", "65580"]  # rx buffers
    for r in rows:  # ratio to the floor, then the CPU shares of vsproxy and of the guest
        ratio, vsp, guest = (float(f.rstrip("%")) for f in r[-3:])
        assert all(f.endswith("%") for f in r[-3:]) and ratio > 0 and vsp > 0 and guest >= 0  # C guest: ~0
    assert "idle connections: vsproxy RSS" in proc.stdout
    # enclave-shaped guests: each case on each shape, beside the one-region guest, and whether C ran it
    shapes = ("1-region", "2-regions", "ring-1024", "microvm", "nitro-legacy")
    shaped = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] and line.split()[0] in shapes]
    assert len(shaped) == 6 * len(shapes) and {r[0] for r in shaped} == set(shapes)
    for r in shaped:  # rate, its ratio, vsproxy's CPU per payload, its ratio, the C pump's counters
        assert r[-5].endswith("%") and float(r[-5].rstrip("%")) > 0 and r[-3] == "ns"
        assert r[-2].endswith("%") and float(r[-2].rstrip("%")) > 0
        assert (int(r[-1]) > 0) is not bool(os.environ.get("VSPROXY_NO_C"))  # the C pump's counters
    # SEQPACKET beside STREAM, sibling guests beside the guest-to-host floor
    seq = [line.split() for line in proc.stdout.splitlines() if line.startswith(("seqpacket ", "siblings "))]
    assert [(v[0], v[1], v[4]) for v in seq] == [("seqpacket", "65536", "stream"), ("seqpacket", "64", "stream"),
                                                 ("siblings", "65536", "floor")]
    assert all(v[-1].endswith("%") and float(v[-1].rstrip("%")) > 0 for v in seq)
    modes = ("off", "pcap", "pcapng", "idle", "lossless", "null", "null-ll")
    cap = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] and line.split()[0] in modes]
    assert [(r[0], r[1]) for r in cap] == [(m, p) for p in ("65536", "64") for m in modes]
    for r in cap:
        if r[0] != "off":  # packets written, bytes, drops: the writer wrote what crossed, or counted it
            assert int(r[-4]) > 0 and int(r[-3]) > 0 and int(r[-2]) >= 0
        if r[0] in ("lossless", "null-ll"):  # no drops, and a ratio to the lower of off and the file floor
            assert int(r[-2]) == 0 and r[-1].endswith("%"), r
    assert "a new file there takes" in proc.stdout


def test_scale_benchmark_runs_and_prints_its_three_rows() -> None:
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "benchmarks/bench_scale.py", "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("256 connections", "fairness", "8 devices"))]
    assert len(rows) == 3, proc.stdout
    for row in rows:
        ratio = next(f for f in row.split() if f.endswith("%") and not f.startswith(">"))
        assert int(ratio.rstrip("%")) > 0, row


def test_benchmark_runs_one_table_alone() -> None:
    """--shapes-only (with --only picking its cases) and --seqpacket-only print that table only."""
    py = str(ROOT / ".venv" / "bin" / "python")
    shapes = subprocess.run([py, "benchmarks/bench_throughput.py", "--quick", "--shapes-only", "--only", "g2h:64"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert shapes.returncode == 0, shapes.stderr[-3000:]
    rows = [line.split()[:3] for line in shapes.stdout.splitlines()
            if line.startswith(("1-region", "2-regions", "ring-1024", "microvm", "nitro-legacy"))]
    assert rows == [[s, "guest->host", "64"] for s in ("1-region", "2-regions", "ring-1024", "microvm", "nitro-legacy")]
    assert "seqpacket" not in shapes.stdout and "idle connections" not in shapes.stdout
    seq = subprocess.run([py, "benchmarks/bench_throughput.py", "--quick", "--seqpacket-only"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert seq.returncode == 0, seq.stderr[-3000:]
    assert [line.split()[:2] for line in seq.stdout.splitlines() if line.startswith(("seqpacket ", "siblings "))] == [
        ["seqpacket", "65536"], ["seqpacket", "64"], ["siblings", "65536"]]
    assert "1-region" not in seq.stdout and "guest->host" not in seq.stdout


def test_flood_benchmark_runs_and_prints_each_flood_beside_the_rate_alone() -> None:
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "benchmarks/bench_flood.py", "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line[:18].strip(): line[18:].split() for line in proc.stdout.splitlines()
            if line.startswith(("(nothing)", "guest connections", "idle host conns", "CONNECT flood", "connect loop",
                                "requests, no rx"))}
    assert list(rows) == ["(nothing)", "guest connections", "idle host conns", "CONNECT flood", "connect loop",
                          "requests, no rx"]
    for r in rows.values():
        assert float(r[0].replace(",", "")) > 0 and r[1].endswith("%")
    assert all(r[3] == "yes" for r in list(rows.values())[1:]) and rows["(nothing)"][2] == "yes"  # B finished
    assert "5,000 in" in " ".join(rows["connect loop"])  # the connect loop made its attempts
    assert "control_full=" in " ".join(rows["requests, no rx"])
    assert "handshakes_dropped=" in proc.stdout and "worst: B kept" in proc.stdout


def test_fanout_benchmark_runs_and_prints_each_subscriber_beside_none() -> None:
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "benchmarks/bench_fanout.py", "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modes = ("none", "devnull", "reading", "stalled", "tui")
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] and line.split()[0] in modes]
    assert [(r[0], r[1]) for r in rows] == [(m, p) for p in ("65536", "64") for m in modes]
    for r in rows:  # rate, ratio to no subscriber, records, dropped, C records
        assert float(r[2].replace(",", "")) > 0 and r[4].endswith("%")
        if r[0] in ("reading", "tui"):
            assert int(r[5]) > 0  # it got records (the TUI: into its store, through the control socket)
            # and the C paths wrote them, unless they are off by request
            assert (int(r[7]) > 0) is not bool(os.environ.get("VSPROXY_NO_C"))


def test_snapshot_benchmark_runs_and_prints_its_figure() -> None:
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "benchmarks/bench_snapshot.py", "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"snapshot of 256 connections: [0-9.]+ ms median", proc.stdout), proc.stdout


def test_filter_benchmark_runs() -> None:
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "benchmarks/bench_filter.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rates = [line for line in proc.stdout.splitlines() if line.endswith("packets/s")]
    assert len(rates) == 8


def test_read_benchmark_runs() -> None:
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "benchmarks/bench_read.py", "--packets", "3000"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "vsproxy read: 3,000 packets" in proc.stdout
    assert "vsproxy read --follow all: 3,000 packets as transcripts in " in proc.stdout


def test_benchmark_only_runs_the_cases_named() -> None:
    py = str(ROOT / ".venv" / "bin" / "python")
    proc = subprocess.run([py, "benchmarks/bench_throughput.py", "--quick", "--only", "g2h:65536:256"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("guest->host", "host->guest"))]
    assert [(r[0], r[1], r[2]) for r in rows] == [("guest->host", "65536", "256K")]
    assert "idle connections" not in proc.stdout
    one = subprocess.run([py, "benchmarks/bench_throughput.py", "--quick", "--only", "h2g:65536:256:3776"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    rows = [line.split() for line in one.stdout.splitlines() if line.startswith(("guest->host", "host->guest"))]
    assert [tuple(r[:4]) for r in rows] == [("host->guest", "65536", "256K", "3776")]
    bad = subprocess.run([py, "benchmarks/bench_throughput.py", "--only", "g2h:12345"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "matches no case" in bad.stderr
