from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import VsproxyProcess


@pytest.fixture
def workdir() -> Iterator[str]:
    # unix socket paths must stay short (108 bytes): pytest's tmp_path can be too deep
    with tempfile.TemporaryDirectory(prefix="vsp-") as d:
        yield d


@pytest.fixture
def start_vsproxy(workdir: str) -> Iterator[Callable[..., VsproxyProcess]]:
    procs: list[VsproxyProcess] = []

    def start(*extra: str, cid: int = 5, name: str = "vhost.sock") -> VsproxyProcess:
        sock = os.path.join(workdir, name)
        p = VsproxyProcess(["--socket", sock, "--guest-cid", str(cid), *extra], sock,
                           os.path.join(workdir, f"{name}.log"))
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With VSPROXY_NO_C=1 the C paths are off by request: their own tests cannot run, every other
    test runs on the Python reference paths. Without it, those tests fail loudly if C is missing."""
    if not os.environ.get("VSPROXY_NO_C"):
        return
    off = pytest.mark.skip(reason="VSPROXY_NO_C=1: the C paths are off by request")
    for item in items:
        if item.get_closest_marker("c_paths") is not None:
            item.add_marker(off)
