"""Branch coverage of the code that reads guest and front-end input (issue 18 item 6).

    .venv/bin/python tests/input_coverage.py [--fail-under 95] [--c]

Python: the virtqueue walker (``vsproxy/virtq.py``), the vhost-user codec and session
(``vsproxy/vhost_user/``), the mapping of the front-end's memory table (``vsproxy/memory.py``),
the vsock header codec (``vsproxy/vsock/header.py``), the views of the guest's rx buffers
(``vsproxy/vsock/rxbuf.py``) and the vsock core's functions that read the guest's headers
(``guest_packet`` and what it hands each op to, ``guest_rw_run``/``guest_credit`` for what the C
path parsed), measured by coverage.py with branches over their own plain-bytes tests only (not
the whole suite: CI time stays low). The per-module (per-function for the core) table is
printed; one below ``--fail-under`` percent fails the run (exit status 1).

``--c``: the C paths too. vsproxy/_c is built again with gcc's ``--coverage`` into a
temporary directory, beside a copy of the package, and the C paths' Python tests
(test_fastpath.py, test_c_input_checks.py, test_c_pump.py, test_c_readahead.py, test_c_sender.py,
test_c_capture.py) run against it (the vsproxy processes they start included); gcov's line and
branch figures per C file are printed, merged over the files that include a header, and those of
tx_batch.c's checks of the guest's chains and headers. They are printed, not enforced.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = ("vsproxy.virtq", "vsproxy.vhost_user", "vsproxy.memory", "vsproxy.vsock.header", "vsproxy.vsock.rxbuf",
           "vsproxy.vsock.core")
# The vsock core is measured whole but gated on the functions that read the guest's headers
# (the rest of it is host-side and C-lending logic, tested elsewhere).
FUNCTIONS = {"vsproxy/vsock/core.py": ("VsockCore.guest_packet", "VsockCore.guest_rw_run", "VsockCore.guest_seq_run",
                                       "VsockCore.guest_rw_tail", "VsockCore.guest_credit", "VsockCore._guest_request",
                                       "VsockCore._guest_shutdown")}
TESTS = ("tests/test_virtq.py", "tests/test_vhost_user_session.py", "tests/test_vsock_core.py",
         "tests/test_input_edges.py", "tests/test_close_semantics.py", "tests/test_seqpacket_runs.py")
C_TESTS = ("tests/test_fastpath.py", "tests/test_c_input_checks.py", "tests/test_c_pump.py",
           "tests/test_c_readahead.py", "tests/test_c_sender.py", "tests/test_c_capture.py",
           "tests/test_c_seqpacket.py")
FAIL_UNDER = 95.0


@dataclass(frozen=True, slots=True)
class FileCoverage:
    path: str
    statements: int
    missed: int
    branches: int
    partial: int  # branches not taken
    percent: float  # coverage.py's figure: (lines + branches hit) / (lines + branches)


def _figures(name: str, s: dict[str, float]) -> FileCoverage:
    return FileCoverage(name, int(s["num_statements"]), int(s["missing_lines"]), int(s["num_branches"]),
                        int(s["num_branches"] - s["covered_branches"]), float(s["percent_covered"]))


def python_coverage(report_json: Path, functions: dict[str, tuple[str, ...]] | None = None) -> list[FileCoverage]:
    """The figures of a coverage.py JSON report to gate: per file, except for a file named in
    ``functions``, which is gated per function named there (``path:function``)."""
    data = json.loads(report_json.read_text())
    by_function = FUNCTIONS if functions is None else functions
    out = []
    for path, f in sorted(data["files"].items()):
        if path not in by_function:
            out.append(_figures(path, f["summary"]))
            continue
        for name in by_function[path]:
            if name not in f.get("functions", {}):
                raise KeyError(f"{path}: no function {name} in the coverage report")
            out.append(_figures(f"{path}:{name}", f["functions"][name]["summary"]))
    return out


def whole_files(report_json: Path, paths: tuple[str, ...]) -> list[FileCoverage]:
    """The whole-file figures of ``paths`` (printed, not gated)."""
    data = json.loads(report_json.read_text())
    return [_figures(p, data["files"][p]["summary"]) for p in paths if p in data["files"]]


def below(files: list[FileCoverage], fail_under: float) -> list[FileCoverage]:
    """The files under the bar (files with nothing to measure are not)."""
    return [f for f in files if f.statements + f.branches and f.percent < fail_under]


def run_python(fail_under: float, tmp: Path) -> int:
    report = tmp / "coverage.json"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS,
           *(f"--cov={m}" for m in MODULES), "--cov-branch", "--cov-report=term-missing",
           f"--cov-report=json:{report}"]  # the bar is checked per module below, not on the total
    env = {k: v for k, v in os.environ.items() if k != "COVERAGE_FILE"}
    env["COVERAGE_FILE"] = str(tmp / ".coverage")
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if not report.exists():
        print("input coverage: the tests did not produce a coverage report", file=sys.stderr)
        return 1
    files = python_coverage(report)
    print(f"input coverage (branches included), per module or function, bar {fail_under:g}%:")
    for f in files:
        print(f"  {f.path:<50} {f.percent:6.2f}%  ({f.statements} statements, {f.missed} missed; "
              f"{f.branches} branches, {f.partial} not taken)")
    for f in whole_files(report, tuple(FUNCTIONS)):
        print(f"  ({f.path} as a whole: {f.percent:.2f}%, not gated: only the functions above read guest input)")
    low = below(files, fail_under)
    for f in low:
        print(f"input coverage: {f.path} is at {f.percent:.2f}%, below {fail_under:g}%", file=sys.stderr)
    return 1 if low or rc else 0


# -- the C paths -----------------------------------------------------------------------------------


@dataclass
class CFile:
    lines: dict[int, int]  # line -> times run
    branches: dict[tuple[int, int], int]  # (line, branch index) -> times taken


def build_instrumented(tmp: Path) -> Path:
    """vsproxy._fastpath built with --coverage into ``tmp``; the package copied beside it.
    Returns the directory to put first on PYTHONPATH."""
    from cffi import FFI

    from vsproxy._fastpath_build import C_DIR as c_dir
    from vsproxy._fastpath_build import SOURCES

    sources = [str(c_dir / name) for name in SOURCES]
    ffi = FFI()
    ffi.cdef((c_dir / "fastpath_cdef.h").read_text())
    ffi.set_source("vsproxy._fastpath", '#include "fastpath.h"', sources=sources, include_dirs=[str(c_dir)],
                   extra_compile_args=["-O0", "--coverage"], extra_link_args=["--coverage"])
    build = tmp / "build"
    so = Path(ffi.compile(tmpdir=str(build), verbose=False))
    pkg = tmp / "pkg"
    shutil.copytree(ROOT / "vsproxy", pkg / "vsproxy",
                    ignore=shutil.ignore_patterns("__pycache__", "_fastpath.*.so", "_c"))
    shutil.copy2(so, pkg / "vsproxy" / so.name)
    return pkg


def gcov_files(build: Path, work: Path) -> dict[str, CFile]:
    """gcov's JSON for every object that ran, merged per source file (a header is counted once
    over every file that includes it: a line is run if any of them ran it)."""
    merged: dict[str, CFile] = {}
    for gcda in sorted(build.rglob("*.gcda")):
        subprocess.run(["gcov", "--json-format", "--branch-counts", "--branch-probabilities", str(gcda)],
                       cwd=work, check=True, capture_output=True)
    for out in sorted(work.glob("*.gcov.json.gz")):
        data = json.loads(gzip.decompress(out.read_bytes()))
        for f in data["files"]:
            name = f["file"]
            if "/_c/" not in name:
                continue
            cf = merged.setdefault(Path(name).name, CFile({}, {}))
            for line in f["lines"]:
                n = line["line_number"]
                cf.lines[n] = cf.lines.get(n, 0) + int(line["count"])
                for i, b in enumerate(line.get("branches", [])):
                    if b.get("throw"):
                        continue
                    cf.branches[(n, i)] = cf.branches.get((n, i), 0) + int(b["count"])
    return merged


def run_c(tmp: Path) -> int:
    missing = [tool for tool in ("gcc", "gcov") if shutil.which(tool) is None]
    if missing:
        print(f"input coverage: --c needs {' and '.join(missing)} (tests/run.sh installs gcc)", file=sys.stderr)
        return 1
    pkg = build_instrumented(tmp)
    env = {k: v for k, v in os.environ.items() if k != "VSPROXY_NO_C"}
    env["PYTHONPATH"] = str(pkg) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # Run from an empty directory: ``python -m`` puts the working directory first on the path, and
    # the vsproxy processes the tests start inherit it; from the checkout it would be the
    # uninstrumented package there.
    run = tmp / "run"
    run.mkdir()
    check = subprocess.run([sys.executable, "-c", "import vsproxy._fastpath as f; print(f.__file__)"], env=env,
                           capture_output=True, text=True, cwd=run)
    if not check.stdout.startswith(str(pkg)):
        print(f"input coverage: the instrumented C is not the one loaded ({check.stdout.strip()})", file=sys.stderr)
        return 1
    rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--rootdir={ROOT}",
                         *(str(ROOT / t) for t in C_TESTS)], cwd=run, env=env).returncode
    work = tmp / "gcov"
    work.mkdir()
    files = gcov_files(tmp / "build", work)
    if not files:
        print("input coverage: gcov found no data from the C paths", file=sys.stderr)
        return 1
    print("C paths (gcc --coverage, driven by their Python tests), per file:")
    tl = th = tb = tt = 0
    for name, cf in sorted(files.items()):
        hit = sum(1 for c in cf.lines.values() if c)
        taken = sum(1 for c in cf.branches.values() if c)
        tl, th, tb, tt = tl + len(cf.lines), th + hit, tb + len(cf.branches), tt + taken
        print(f"  {name:<16} lines {hit:>4}/{len(cf.lines):<4} {100 * hit / max(1, len(cf.lines)):6.2f}%   "
              f"branches taken {taken:>4}/{len(cf.branches):<4} {100 * taken / max(1, len(cf.branches)):6.2f}%")
    print(f"  {'all':<16} lines {th:>4}/{tl:<4} {100 * th / max(1, tl):6.2f}%   "
          f"branches taken {tt:>4}/{tb:<4} {100 * tt / max(1, tb):6.2f}%")
    return 1 if rc else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fail-under", type=float, default=FAIL_UNDER, metavar="PERCENT",
                    help=f"the least branch coverage each module may have (default {FAIL_UNDER:g})")
    ap.add_argument("--c", action="store_true", help="also measure the C paths with gcov (printed, not enforced)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vsp-cov-") as d:
        tmp = Path(d)
        rc = run_python(args.fail_under, tmp)
        if args.c:
            rc |= run_c(tmp)
    return rc


if __name__ == "__main__":
    sys.exit(main())
