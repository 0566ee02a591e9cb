"""The simulated guest's sender of recorded payload (``sg_send``, ``VsockDriver.send_stored``):
packets whose bytes lie scattered in a file reach a host socket through vsproxy exactly, each
as one packet of its recorded length, with indirect tables and with plain chains, with fewer
tx descriptors than it would lend, within a small window; the guest's accounting and rings are
left as the Python driver expects; a file that ends early is an OSError."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

import pytest
from helpers import VsproxyProcess, unix_server, wait_for

from vsproxy.simguest import SimGuest
from vsproxy.simguest.cblast import ffi
from vsproxy.vsock import header as H

pytestmark = pytest.mark.c_paths

Start = Callable[..., VsproxyProcess]


def scattered(path: str, sizes: list[int], seed: int) -> tuple[bytes, list[int]]:
    """Write chunks of ``sizes`` with junk between them (as a capture's headers); what they hold
    in order and where each starts."""
    rng = random.Random(seed)
    data, offs = bytearray(), []
    with open(path, "wb") as f:
        for n in sizes:
            f.write(rng.randbytes(rng.randint(0, 100)))
            offs.append(f.tell())
            chunk = rng.randbytes(n)
            f.write(chunk)
            data += chunk
    return bytes(data), offs


def grouped(sent: list[int], given: list[int]) -> bool:
    """``sent`` is ``given`` with some packets cut in parts (as Linux cuts what the credit does not
    hold), none merged or reordered."""
    k = 0
    for n in given:
        while n > 0:
            if k == len(sent) or sent[k] > n:
                return False
            n -= sent[k]
            k += 1
    return k == len(sent)


def arrays(offs: list[int], sizes: list[int], flags: list[int]) -> tuple[Any, Any, Any]:
    return ffi.new("uint64_t[]", offs), ffi.new("uint32_t[]", sizes), ffi.new("uint32_t[]", flags)


@pytest.mark.parametrize(("indirect", "ring_size", "buf_alloc"), [(True, 128, 262144), (False, 128, 262144),
                                                                   (True, 8, 262144), (True, 128, 70000)],
                         ids=["indirect", "chains", "small-ring", "small-window"])
def test_stored_packets_reach_the_host_exactly_and_one_each(start_vsproxy: Start, workdir: str, indirect: bool,
                                                           ring_size: int, buf_alloc: int) -> None:
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds, "--pcap", f"{workdir}/c.pcapng", "--flush")
    sink = unix_server(f"{uds}_5000", sink=True)
    rng = random.Random(ring_size + buf_alloc)
    sizes = [rng.choice([1, 2, 500, 4096, 65535, 65536]) for _ in range(300)]
    src = f"{workdir}/src.bin"
    want, offs = scattered(src, sizes, 3)
    fd = os.open(src, os.O_RDONLY)
    try:
        with SimGuest(vp.socket_path, indirect=indirect, ring_size=ring_size, buf_alloc=buf_alloc) as g:
            s = g.connect(5000)
            cid = g.guest_cid
            drv = g.driver
            assert drv.can_send_stored(s.conn, max(sizes))
            g.stats.tx_packets = g.stats.tx_bytes = 0
            drv.send_stored(s.conn, fd, *arrays(offs, sizes, [0] * len(sizes)), len(sizes))
            s.sendall(b"!")  # the Python sender goes on after C, in order
            s.shutdown_write()
            s.close(timeout=10)
            assert g.stats.tx_bytes == len(want) + 1 and g.stats.tx_packets >= len(sizes) + 1
            assert not g.stats.protocol_errors
    finally:
        os.close(fd)
        sink.close()
        vp.stop()
    wait_for(lambda: len(sink.received) == 1, what="the host connection to end")
    assert sink.received[0] == want + b"!"
    from vsproxy.capture.reader import dissect, records

    with open(f"{workdir}/c.pcapng", "rb") as f:
        sent = [len(p.payload) for p in map(dissect, records(f))
                if p.hdr is not None and p.hdr.op == H.Op.RW and p.hdr.src_cid == cid]
    # each as one packet as given, or cut where the credit did not hold it and waiting did not
    # bring more (a small window: often), never merged
    assert grouped(sent, [*sizes, 1]), sent
    if buf_alloc >= 2 * max(sizes):
        assert len(sent) < len(sizes) * 1.1, "most packets leave whole"


def test_a_file_shorter_than_its_packets_is_an_oserror(start_vsproxy: Start, workdir: str) -> None:
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    sink = unix_server(f"{uds}_5000", sink=True)
    src = f"{workdir}/short.bin"
    with open(src, "wb") as f:
        f.write(b"x" * 1000)
    fd = os.open(src, os.O_RDONLY)
    try:
        with SimGuest(vp.socket_path) as g:
            s = g.connect(5000)
            with pytest.raises(OSError, match="the file ended inside packet 1"):
                g.driver.send_stored(s.conn, fd, *arrays([0, 900], [500, 500], [0, 0]), 2)
            s.close(timeout=10)  # the connection and the rings still work
    finally:
        os.close(fd)
        sink.close()
        vp.stop()
    wait_for(lambda: len(sink.received) == 1, what="the host connection to end")
    assert sink.received[0] == b"x" * 500
