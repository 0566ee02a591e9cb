"""Capturing keeps connections on the C pump: C writes the records of what it does for the
connections it runs (their data both ways, the guest's credit updates, the updates it sends),
with the connection's mark as their comment, in ring order; nothing is lost or reordered."""

from __future__ import annotations

import itertools
import os
import re
import socket
import threading

import pytest
from helpers import VsproxyProcess

from vsproxy.capture.reader import dissect, records
from vsproxy.simguest import SimGuest
from vsproxy.vsock import header as H


class EchoServer(threading.Thread):
    """A host service that echoes everything back, in 64 KiB reads."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(1)
        self.start()

    def run(self) -> None:
        c, _ = self.srv.accept()
        with c:
            while data := c.recv(65536):
                c.sendall(data)
        self.srv.close()


def counter(report: str, name: str) -> int:
    m = re.search(rf"\b{name}=(\d+)", report)
    assert m, f"{name} not in the report: {report}"
    return int(m.group(1))


@pytest.mark.c_paths
def test_a_remapped_bulk_echo_captured_runs_on_the_c_pump_and_every_byte_both_ways_is_captured_in_order(
        workdir: str) -> None:
    a = os.path.join(workdir, "a.sock")
    uds = os.path.join(workdir, "h.sock")
    pcap = os.path.join(workdir, "out.pcapng")
    vp = VsproxyProcess(["--socket", a, "--guest-cid", "5", "--uds-path", uds, "--remap", "3=2", "--pcap", pcap], a,
                        os.path.join(workdir, "vsproxy.log"))
    echo = EchoServer(f"{uds}_5000")
    sent = bytes(range(251)) * 4177 * 8  # ~8 MiB, a pattern that shows any reordering
    got = bytearray()
    try:
        with SimGuest(a, timeout=30) as g:
            s = g.connect(5000, cid=3)
            for off in range(0, len(sent), 256 * 1024):  # a window at a time, read back as it comes
                s.sendall(sent[off : off + 256 * 1024])
                while len(got) < min(off + 256 * 1024, len(sent)) - 512 * 1024:
                    got += s.recv(1 << 20, timeout=20)
            while len(got) < len(sent):
                got += s.recv(1 << 20, timeout=20)
            report = vp.report()  # while the session lives: its device counters
            s.close()
        final = vp.report()
    finally:
        vp.stop()
        echo.join(10)
    assert bytes(got) == sent
    assert counter(final, "dropped") == 0, vp.log()[-6000:]  # the capture missed nothing
    # the C pump ran the connection (sent the guest's data, took its credit updates) while capturing
    assert counter(report, "c_pump_sends") > 0
    assert counter(report, "c_pump_updates") + counter(report, "c_pump_kicks") > 0
    with open(pcap, "rb") as f:
        pkts = [dissect(r) for r in records(f)]
    # (header, payload, comment) of every packet of the connection
    conn = [(p.hdr, p.payload, p.record.comment) for p in pkts
            if p.hdr is not None and p.hdr.type == H.Type.STREAM and 5000 in (p.hdr.dst_port, p.hdr.src_port)]
    to_host = b"".join(data for h, data, _ in conn if h.op == H.Op.RW and h.src_cid == 5)
    to_guest = b"".join(data for h, data, _ in conn if h.op == H.Op.RW and h.dst_cid == 5)
    assert to_host == sent and to_guest == sent  # every byte, once, in order, both ways
    # the guest sees CID 3; every data packet and every credit update of the guest carries the
    # connection's mark: rewritten to the real peer, as the Python path writes it
    assert {h.dst_cid for h, _, _ in conn if h.src_cid == 5} == {3}
    from_guest = [c for h, _, c in conn if h.src_cid == 5 and h.op in (H.Op.RW, H.Op.CREDIT_UPDATE)]
    rw_to_guest = [c for h, _, c in conn if h.dst_cid == 5 and h.op == H.Op.RW]
    assert len(from_guest) > 100 and len(rw_to_guest) > 100
    assert set(from_guest + rw_to_guest) == {"rewritten (remap 3=2): real peer 2:5000"}
    # the guest's credit never goes backwards in the capture (records stand in ring order)
    fwd = [h.fwd_cnt for h, _, _ in conn if h.src_cid == 5]
    assert all((b - a) % (1 << 32) < 1 << 31 for a, b in itertools.pairwise(fwd))
