"""Fixtures for the real-guest end-to-end tests (see harness.py).

  guest_image     session: GuestImage (kernel, initramfs), built once by
                  tests/guest/build.sh into $VSPROXY_CACHE/guest
                  (default ~/.cache/vsproxy/guest)
  qemus           session: {"qemu7": Qemu, "qemu10": Qemu}
  qemu_binaries   session: {"qemu7": (path, extra_args), "qemu10": (path, extra_args)}
  sockdir         a short, fresh directory under /tmp for unix sockets
  start_vsproxy   factory: start_vsproxy(args=(), *, guest_cid=5, name="vhost.sock")
                  -> Popen running `python -m vsproxy --socket SOCK --guest-cid N
                  ARGS...` once SOCK exists (10 s timeout); .socket_path and
                  .log_path are set on it.  Stopped (SIGTERM, then SIGKILL, by
                  pid) at teardown.

Set VSPROXY_E2E_NO_QEMU10=1 to leave QEMU 10 out (its tests are then skipped).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

# Importable whatever pytest's import mode is.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

QEMU_NAMES = ("qemu7", "qemu10")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: boots a real QEMU guest (slow, TCG)")


@pytest.fixture(scope="session")
def guest_image() -> harness.GuestImage:
    return harness.build_guest()


@pytest.fixture(scope="session")
def qemus() -> dict[str, harness.Qemu]:
    return harness.find_qemus(with_qemu10=not os.environ.get("VSPROXY_E2E_NO_QEMU10"))


@pytest.fixture(scope="session")
def qemu_binaries(qemus: dict[str, harness.Qemu]) -> dict[str, tuple[str, list[str]]]:
    return {name: q.as_tuple() for name, q in qemus.items()}


@pytest.fixture
def qemu_by_name(qemus: dict[str, harness.Qemu]) -> Callable[[str], harness.Qemu]:
    """qemu_by_name("qemu10") -> Qemu, skipping the test when it is left out."""

    def get(name: str) -> harness.Qemu:
        if name not in qemus:
            pytest.skip(f"{name} not available (VSPROXY_E2E_NO_QEMU10 set)")
        return qemus[name]

    return get


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = harness.short_tempdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


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
