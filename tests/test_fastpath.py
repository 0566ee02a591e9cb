"""The C tx fast path against the Python walker, its reference.

For any ring (Linux-shaped packets mixed with hostile chains) the C batch must take the same
heads in the same order, hand back as a run exactly the RW packets the Python path would
accept as such (same payload bytes), and leave everything else to Python."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_virtq import Rig

from vsproxy import fastpath
from vsproxy.fastpath import Run, Slow, TxFastPath
from vsproxy.simguest.ring import Buf
from vsproxy.virtq import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, Chain
from vsproxy.vsock import header as H

GUEST = 5


def test_c_fast_path_is_built() -> None:
    # CI builds it (tests/run.sh installs gcc and the Python headers); a missing build fails here.
    assert fastpath.AVAILABLE, "vsproxy._fastpath was not built: pip install -e . with a C compiler"


Expected = list[tuple[str, tuple[int, int, int] | None, bytes, list[int]]]


def reference(rig: Rig, heads: list[int]) -> Expected:
    """What the Python walker makes of these heads, grouped as the C path groups them."""
    out: Expected = []
    for head in heads:
        result = rig.q._walk(head)
        fast = False
        if isinstance(result, Chain) and len(result.readable) == 2 and len(result.readable[0]) == H.HDR_SIZE:
            h = H.unpack(result.readable[0])
            payload = result.readable[1]
            fast = (h.src_cid == GUEST and h.type == 1 and h.op == H.Op.RW and 0 < h.len <= len(payload)
                    and h.len <= H.MAX_PKT_PAYLOAD)
        if not fast:
            out.append(("slow", None, b"", [head]))
            continue
        key = (h.src_port, h.dst_cid, h.dst_port)
        data = bytes(payload[: h.len])
        if out and out[-1][0] == "run" and out[-1][1] == key:
            kind, k, prev, hs = out[-1]
            out[-1] = (kind, k, prev + data, [*hs, head])
        else:
            out.append(("run", key, data, [head]))
    return out


def from_c(items: list[Run | Slow]) -> Expected:
    out: Expected = []
    for it in items:
        if isinstance(it, Slow):
            out.append(("slow", None, b"", [it.head]))
        else:
            out.append(("run", (it.src_port, it.dst_cid, it.dst_port), b"".join(bytes(s) for s in it.segments),
                        it.heads))
    return out


def add_packet(rig: Rig, src_port: int, payload: bytes, *, op: int = H.Op.RW, src_cid: int = GUEST,
               length: int | None = None, type_: int = 1) -> None:
    n = len(payload) if length is None else length
    hdr = H.pack(src_cid, 2, src_port, 5000, n, type_, op, 0, 65536, 0)
    rig.ring.add_chain([Buf(rig.buf(hdr), H.HDR_SIZE), Buf(rig.buf(payload), len(payload))])


@pytest.mark.parametrize("indirect", [True, False])
def test_runs_group_consecutive_packets_of_one_stream(indirect: bool) -> None:
    rig = Rig(indirect=indirect, num=64)
    try:
        for i in range(5):
            add_packet(rig, 100, bytes([i]) * 10)
        add_packet(rig, 200, b"big" * 1000)  # above the copy threshold: zero-copy segment
        add_packet(rig, 100, b"z", src_cid=9)  # spoofed: Python handles it
        add_packet(rig, 100, b"\0", op=H.Op.SHUTDOWN, length=0)
        add_packet(rig, 100, b"abc", length=10)  # len beyond the buffer
        fast = TxFastPath(rig.q, GUEST, 64)
        items = fast.batch()
        heads = [h for e in from_c(items) for h in e[3]]
        assert from_c(items) == reference(rig, heads)
        kinds = [e[0] for e in from_c(items)]
        assert kinds == ["run", "run", "slow", "slow", "slow"]
        assert rig.q.pending() == 0
    finally:
        rig.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    packets=st.lists(
        st.tuples(
            st.sampled_from([100, 200]),
            st.binary(min_size=1, max_size=1500),
            st.sampled_from([H.Op.RW, H.Op.RW, H.Op.RW, H.Op.CREDIT_UPDATE]),
            st.sampled_from([GUEST, GUEST, GUEST, 7]),
            st.sampled_from([None, None, 0, 70000, 3]),
        ),
        max_size=12,
    ),
    garbage=st.lists(
        st.tuples(st.integers(0, 15), st.integers(0, 5 << 20), st.integers(0, 70000),
                  st.sampled_from([0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_INDIRECT, 2, 7]), st.integers(0, 20)),
        max_size=4,
    ),
)
def test_c_batch_matches_the_python_walker(
    packets: list[tuple[int, bytes, int, int, int | None]],
    garbage: list[tuple[int, int, int, int, int]],
) -> None:
    rig = Rig(indirect=True, num=16)
    try:
        for port, payload, op, cid, length in packets:
            add_packet(rig, port, payload, op=op, src_cid=cid, length=length)
        for slot, addr, length, flags, nxt in garbage:  # hostile descriptors and avail entries
            rig.ring.write_desc(slot, addr, length, flags, nxt)
        rig.ring.set_avail_idx(len(packets) + len(garbage))
        for k, (slot, *_rest) in enumerate(garbage):
            rig.ring.set_avail_entry(len(packets) + k, slot)
        n = len(packets) + len(garbage)
        avail = [rig.q._avail16[2 + (i & 15)] for i in range(n)]
        fast = TxFastPath(rig.q, GUEST, 16)
        items = fast.batch()
        got = from_c(items)
        heads = [h for e in got for h in e[3]]
        assert heads == avail  # the same chains, in ring order
        assert got == reference(rig, heads)
    finally:
        rig.close()
