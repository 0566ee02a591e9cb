"""Fixtures for the real-guest end-to-end tests (see harness.py).

  guest_image     session: GuestImage (kernel, initramfs), built once by
                  tests/guest/build.sh into $VSPROXY_CACHE/guest
                  (default ~/.cache/vsproxy/guest)
  qemus           session: {"qemu7": Qemu, "qemu10": Qemu}
  qemu_binaries   session: {"qemu7": (path, extra_args), "qemu10": (path, extra_args)}
  qemu_by_name    session: qemu_by_name("qemu10") -> Qemu
  sockdir         a short, fresh directory under /tmp for unix sockets
  workdir         the same, for a test's sockets, logs and captures
  guest           test_captures_e2e.Guest: QEMU 10 (-M pc) and the guest image
  start_vsproxy   factory: start_vsproxy(args=(), *, guest_cid=5, name="vhost.sock")
                  -> Popen running `python -m vsproxy --socket SOCK --guest-cid N
                  ARGS...` once SOCK exists (10 s timeout); .socket_path and
                  .log_path are set on it.  Stopped (SIGTERM, then SIGKILL, by
                  pid) at teardown.

Both QEMUs are required: when one is missing (e.g. tests/guest/qemu10.sh cannot
fetch QEMU 10), every test that needs it fails with the reason; none is skipped.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

# Importable whatever pytest's import mode is.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

QEMU_NAMES = harness.QEMU_NAMES


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: boots a real QEMU guest (slow, TCG)")


@pytest.fixture(scope="session")
def guest_image() -> harness.GuestImage:
    return harness.build_guest()


def _require_qemu(name: str) -> harness.Qemu:
    try:
        return harness.require_qemu(name)
    except harness.QemuMissing as e:
        msg = str(e)
    pytest.fail(msg, pytrace=False)  # outside the except: no chained traceback


@pytest.fixture(scope="session")
def qemus() -> dict[str, harness.Qemu]:
    return {name: _require_qemu(name) for name in QEMU_NAMES}


@pytest.fixture(scope="session")
def qemu_binaries(qemus: dict[str, harness.Qemu]) -> dict[str, tuple[str, list[str]]]:
    return {name: q.as_tuple() for name, q in qemus.items()}


@pytest.fixture(scope="session")
def qemu_by_name() -> Callable[[str], harness.Qemu]:
    """qemu_by_name("qemu10") -> Qemu; fails the calling test (never skips) when it is missing."""
    return _require_qemu


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = harness.short_tempdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = harness.short_tempdir("vsp-e2e-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def guest(guest_image: harness.GuestImage, qemu_by_name: Callable[[str], harness.Qemu]) -> Any:
    from test_captures_e2e import QEMU, Guest  # (that module holds what boots its guests)

    return Guest(qemu_by_name(QEMU), guest_image)


StartVsproxy = Callable[..., harness.VsproxyProcess]


@pytest.fixture
def start_vsproxy(sockdir: Path) -> Iterator[StartVsproxy]:
    procs: list[harness.VsproxyProcess] = []

    def start(
        args: Sequence[str] = (), *, guest_cid: int = 5, name: str = "vhost.sock", timeout: float = 10.0
    ) -> harness.VsproxyProcess:
        sock = sockdir / name
        p = harness.start_vsproxy(list(args), socket_path=sock, guest_cid=guest_cid, timeout=timeout)
        procs.append(p)
        return p

    yield start
    for p in reversed(procs):
        harness.stop_process(p)
