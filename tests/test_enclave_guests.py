"""Enclave-shaped guests get the C paths: two memory regions (QEMU's microvm and nitro-enclave
machines, the second region behind a non-zero mmap_offset and a hole of guest addresses), ring
size 1024, legacy virtio without VERSION_1. vsproxy runs as a real process driven by the
simulated guest; bytes go both ways, hash-checked, and the C pump's counters show that C ran the
connections (with ``VSPROXY_NO_C=1`` they stay at zero: the same transfers on the Python paths)."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable

import pytest
from helpers import VsproxyProcess, echo_many, hybrid_connect, send_then_shut, unix_server

from vsproxy import fastpath
from vsproxy.simguest import SimGuest
from vsproxy.simguest.memory import SECOND_REGION_GPA

Start = Callable[..., VsproxyProcess]
MiB = 1 << 20
C_COUNTERS = ("c_pump_updates", "c_pump_kicks", "c_pump_sends", "c_pump_reads")


def counters(report: str) -> dict[str, int]:
    return {name: int(m.group(1)) for name in (*C_COUNTERS, "bad_chains")
            if (m := re.search(rf"\b{name}=(\d+)", report))}


GUESTS = {
    "microvm": {"regions": 2, "ring_size": 1024},
    "nitro-enclave-legacy": {"regions": 2, "ring_size": 1024, "version_1": False},
    "two-regions-ring-128": {"regions": 2},
    "two-regions-big-rx-buffers": {"regions": 2, "rx_buf_size": 64 * 1024 + 44},
    "one-region-ring-1024": {"ring_size": 1024},
}


@pytest.mark.parametrize("options", list(GUESTS.values()), ids=list(GUESTS))
def test_enclave_shaped_guests_run_on_the_c_paths_both_ways_hash_checked(
        start_vsproxy: Start, workdir: str, options: dict[str, object]) -> None:
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    echo = unix_server(f"{uds}_5000")
    payloads = [os.urandom(3 * MiB) for _ in range(2)]
    h2g = os.urandom(6 * MiB)
    with SimGuest(vp.socket_path, timeout=60, **options) as g:  # type: ignore[arg-type]
        if options.get("regions") == 2:  # the guest's buffers are in both regions
            drv = g.driver
            gpas = [*drv.rx_gpas, drv.tx_base]
            assert min(gpas) < SECOND_REGION_GPA <= max(gpas)
        # guest -> host -> guest: C sends the guest's data and fills the rx ring with the echo
        socks = [g.connect(5000) for _ in payloads]
        got = echo_many(g, socks, payloads, timeout=120)
        for s in socks:
            s.close()
        assert [hashlib.sha256(x).digest() for x in got] == [hashlib.sha256(p).digest() for p in payloads]
        # host -> guest through the hybrid socket: C takes the guest's credit updates and refills
        host, gs = hybrid_connect(uds, g, 6200)
        sender = send_then_shut(host, h2g)
        received = bytearray()
        gs.drain(len(h2g), sink=received.extend)
        sender.join()
        assert hashlib.sha256(received).digest() == hashlib.sha256(h2g).digest()
        gs.close()
        host.close()
        c = counters(vp.report())
    echo.close()
    assert c["bad_chains"] == 0
    if fastpath.AVAILABLE:
        assert c["c_pump_sends"] > 0, c  # runs of guest data C sent to the host socket itself
        assert c["c_pump_updates"] + c["c_pump_kicks"] > 0, c  # credit updates C took, refilling from the host
    else:  # VSPROXY_NO_C=1: the same transfers on the Python paths, and nothing ran in C
        assert all(c[name] == 0 for name in C_COUNTERS), c
