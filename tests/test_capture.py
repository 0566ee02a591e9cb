"""Captures that tshark reads: vsockmon frames, pcapng interfaces, directions and marks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import VsproxyProcess, unix_server, wait_for

from vsproxy.capture import format as fmt
from vsproxy.simguest import SimGuest
from vsproxy.vsock import header as H


def tshark(path: str, *fields: str, filt: str | None = None) -> list[list[str]]:
    exe = shutil.which("tshark")
    assert exe, "tshark is required (tests/run.sh installs it)"
    cmd = [exe, "-r", path, "-T", "fields", "-E", "separator=|"] + [x for f in fields for x in ("-e", f)]
    if filt:
        cmd += ["-Y", filt]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return [line.split("|") for line in p.stdout.splitlines()]


def test_frame_layout_is_vsockmon() -> None:
    hdr = H.pack(5, 2, 1024, 9000, 3, 1, H.Op.RW, 0, 65536, 7)
    frame = fmt.vsockmon_frame(hdr, b"abc")
    assert len(frame) == 32 + 44 + 3
    assert fmt.VSOCKMON.unpack_from(frame) == (5, 2, 1024, 9000, fmt.AF_VSOCK_OP_PAYLOAD, 2, 44)
    assert frame[32:76] == hdr and frame[76:] == b"abc"
    ctrl = fmt.vsockmon_frame(H.pack(5, 2, 1024, 9000, 0, 1, H.Op.REQUEST, 0, 65536, 0), b"")
    assert fmt.VSOCKMON.unpack_from(ctrl)[4] == fmt.AF_VSOCK_OP_CONNECT and len(ctrl) == 76


@pytest.mark.parametrize("pcap_format", ["pcapng", "pcap"])
def test_tshark_reads_what_crossed_with_the_guests_values(workdir: str, pcap_format: str) -> None:
    uds = os.path.join(workdir, "h.sock")
    cap = os.path.join(workdir, f"out.{pcap_format}")
    sock = os.path.join(workdir, "a.sock")
    vp = VsproxyProcess(["--socket", sock, "--guest-cid", "5", "--uds-path", uds, "--pcap", cap,
                         "--pcap-format", pcap_format], sock, os.path.join(workdir, "log"))
    echo = unix_server(f"{uds}_5000")
    try:
        with SimGuest(sock) as g:
            s = g.connect(5000)
            s.sendall(b"GET /v1/keys HTTP/1.1\r\n\r\n")
            assert s.recv_exactly(25, timeout=10) == b"GET /v1/keys HTTP/1.1\r\n\r\n"
            s.close()
            port = s.local_port
    finally:
        assert vp.stop() == 0
        echo.close()
    rows = tshark(cap, "vsock.src_cid", "vsock.dst_cid", "vsock.src_port", "vsock.dst_port", "vsock.virtio.op",
                  "vsock.payload")
    ops = [(r[0], r[1], r[4]) for r in rows]
    assert ops[0] == ("5", "2", "1") and ops[1] == ("2", "5", "2")  # REQUEST, RESPONSE
    rw = [r for r in rows if r[4] == "5"]
    assert {(r[0], r[2], r[3]) for r in rw if r[0] == "5"} == {("5", str(port), "5000")}
    payloads = [bytes.fromhex(r[5].replace(":", "")) for r in rw]
    assert payloads == [b"GET /v1/keys HTTP/1.1\r\n\r\n"] * 2
    assert ("5", "2", "4") in ops and ("2", "5", "3") in ops  # the guest's close and our RST
    read = subprocess.run([sys.executable, "-m", "vsproxy", "read", cap], capture_output=True, text=True, timeout=60)
    assert read.returncode == 0 and len(read.stdout.splitlines()) == len(rows)  # vsproxy read agrees with tshark
    assert f"5:{port} > 2:5000 REQUEST" in read.stdout
    if pcap_format == "pcapng":
        flags = tshark(cap, "frame.interface_name", "frame.packet_flags_direction", "vsock.src_cid")
        assert {f[0] for f in flags} == {"cid5"}
        assert all((int(f[1], 16) == 1) == (f[2] == "5") for f in flags)  # from the guest: inbound


def test_marks_for_spoofed_denied_and_rewritten_packets(workdir: str) -> None:
    a, b = os.path.join(workdir, "a.sock"), os.path.join(workdir, "b.sock")
    uds = os.path.join(workdir, "h.sock")
    cap = os.path.join(workdir, "marks.pcapng")
    vp = VsproxyProcess(["--vm", f"guest-cid=5,socket={a},uds-path={uds},remap=3=2", "--vm", f"guest-cid=6,socket={b}",
                         "--pcap", cap], a, os.path.join(workdir, "log"))
    echo = unix_server(f"{uds}_5000")
    try:
        with SimGuest(a) as g:
            g.send_raw(H.pack(9, 2, 1, 5000, 0, 1, H.Op.REQUEST, 0, 65536, 0))  # spoofed
            with pytest.raises(ConnectionResetError):
                g.connect(7000, cid=6)  # denied sibling
            s = g.connect(5000, cid=3)  # remapped to the host
            s.sendall(b"x")
            s.recv_exactly(1, timeout=10)
            s.close()
    finally:
        vp.stop()
        echo.close()
    rows = tshark(cap, "frame.comment", "vsock.src_cid", "vsock.dst_cid", "vsock.virtio.op", "frame.interface_name")
    comments = [r[0] for r in rows if r[0]]
    assert any(c.startswith("spoofed: src_cid 9") for c in comments)
    assert any(c.startswith("denied by default: sibling cid6 not allowed for cid5") for c in comments)
    rewritten = [r for r in rows if r[0].startswith("rewritten (remap 3=2")]
    assert rewritten and all("real peer 2:5000" in r[0] for r in rewritten)
    assert {r[2] for r in rewritten if r[1] == "5"} == {"3"}  # as the guest sent them: to CID 3
    # the denied REQUEST is followed by vsproxy's RST and nothing appears on the sibling's interface
    assert not [r for r in rows if r[4] == "cid6"]


def test_live_pipe_to_tshark(workdir: str) -> None:
    uds = os.path.join(workdir, "h.sock")
    sock = os.path.join(workdir, "a.sock")
    exe = shutil.which("tshark")
    assert exe
    proxy = subprocess.Popen([sys.executable, "-m", "vsproxy", "--socket", sock, "--guest-cid", "5", "--uds-path", uds,
                              "--pcap", "-", "--flush", "-q"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proxy.stdout is not None
    ts = subprocess.Popen([exe, "-l", "-i", "-", "-T", "fields", "-e", "vsock.virtio.op"], stdin=proxy.stdout,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    proxy.stdout.close()
    echo = None
    try:
        wait_for(lambda: os.path.exists(sock), what="vsproxy socket")
        echo = unix_server(f"{uds}_5000")
        with SimGuest(sock) as g:
            s = g.connect(5000)
            s.sendall(b"live")
            s.recv_exactly(4, timeout=10)
            s.close()
        time.sleep(0.5)
    finally:
        proxy.send_signal(signal.SIGTERM)
        proxy.wait(10)
        out, _ = ts.communicate(timeout=30)
        if echo is not None:
            echo.close()
    assert out.split()[:3] == ["1", "2", "5"]  # REQUEST, RESPONSE, RW, seen live through the pipe


def test_killed_writer_leaves_a_readable_file_and_rotation_splits_files(workdir: str) -> None:
    uds = os.path.join(workdir, "h.sock")
    sock = os.path.join(workdir, "a.sock")
    cap = os.path.join(workdir, "rot.pcapng")
    vp = VsproxyProcess(["--socket", sock, "--guest-cid", "5", "--uds-path", uds, "--pcap", cap, "--flush",
                         "--pcap-rotate-size", "2000"], sock, os.path.join(workdir, "log"))
    echo = unix_server(f"{uds}_5000")
    try:
        with SimGuest(sock) as g:
            for _ in range(5):
                s = g.connect(5000)
                s.sendall(b"m" * 300)
                s.recv_exactly(300, timeout=10)
                s.close()
        time.sleep(0.3)
        vp.proc.kill()  # no clean shutdown
        vp.proc.wait()
    finally:
        echo.close()
        vp.stop()
    files = sorted(f for f in os.listdir(workdir) if f.startswith("rot.pcapng."))
    assert len(files) >= 3
    total = 0
    for f in files:
        rows = tshark(os.path.join(workdir, f), "vsock.virtio.op")
        total += len(rows)
    assert total >= 5 * 6  # REQUEST, RESPONSE, two RW, SHUTDOWN, RST for each of five connections


def test_full_capture_buffer_drops_and_counts_without_touching_the_data_path() -> None:
    from vsproxy.capture.writer import CaptureOptions, CaptureWriter

    hdr = H.pack(5, 2, 1, 2, 3, 1, H.Op.RW, 0, 0, 0)
    record = len(b"".join(fmt.pcapng_epb_parts(0, 0.0, *fmt.vsockmon_parts(hdr, b"abc"), inbound=True)))
    w = CaptureWriter(CaptureOptions(os.devnull, queue_bytes=2 << 16), ["dev"])
    w._closing = True  # stop the writer thread so the chunks fill
    w._wake.set()
    w._thread.join(5)
    for _ in range(1500):
        w.tap("dev", False, hdr, [b"abc"])
    kept = 2 * ((1 << 16) // record)  # two 64 KiB chunks of whole records
    assert w.counters.dropped == 1500 - kept
    held = [*w._full, w._filling]
    assert sum(c.records for c in held) == kept and sum(c.used for c in held) == kept * record
    assert w._out is not None
    w._out.close()


def test_socket_pcap_to_missing_directory_is_a_clear_error(workdir: str) -> None:
    p = subprocess.run([sys.executable, "-m", "vsproxy", "--socket", os.path.join(workdir, "a.sock"), "--guest-cid",
                        "5", "--pcap", os.path.join(workdir, "no", "x.pcapng")], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 2 and "--pcap" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize(("idle", "policy"), [(True, os.SCHED_IDLE), (False, os.SCHED_OTHER)])
def test_pcap_idle_runs_the_writer_thread_in_idle_time_only(idle: bool, policy: int) -> None:
    from vsproxy.capture.writer import CaptureOptions, CaptureWriter

    w = CaptureWriter(CaptureOptions(os.devnull, idle=idle), ["dev"])
    try:
        tid = w._thread.native_id
        assert tid is not None
        wait_for(lambda: os.sched_getscheduler(tid) == policy, 5, f"writer thread policy {policy}")
    finally:
        w.close()
    assert not w._thread.is_alive()


def test_a_capture_reader_that_stops_reading_never_blocks_the_data_path(workdir: str) -> None:
    """``--pcap -`` into a pipe nobody reads: the writer blocks on the pipe, its 2 MiB buffer
    fills, and 16 MiB still cross vsproxy; the capture drops what did not fit, counted, and
    what it did write is whole records."""
    import io
    import re

    from helpers import echo_many

    from vsproxy.capture.reader import records

    uds = os.path.join(workdir, "h.sock")
    sock = os.path.join(workdir, "a.sock")
    log_path = os.path.join(workdir, "log")

    def counters() -> re.Match[str] | None:
        with open(log_path, "rb") as f:
            return re.search(r"capture: packets=(\d+) bytes=(\d+) dropped=(\d+)", f.read().decode(errors="replace"))

    payload = os.urandom(16 << 20)
    with open(log_path, "wb") as log, subprocess.Popen(
        [sys.executable, "-m", "vsproxy", "--socket", sock, "--guest-cid", "5", "--uds-path", uds, "--pcap", "-",
         "--pcap-buffer", str(2 << 20)], stdout=subprocess.PIPE, stderr=log) as proxy:
        assert proxy.stdout is not None
        try:
            wait_for(lambda: os.path.exists(sock), what="vsproxy socket")
            echo = unix_server(f"{uds}_5000")
            try:
                with SimGuest(sock) as g:
                    s = g.connect(5000)
                    start = time.monotonic()
                    (got,) = echo_many(g, [s], [payload], timeout=120)
                    elapsed = time.monotonic() - start
                    s.close()
            finally:
                echo.close()
            proxy.send_signal(signal.SIGUSR1)
            wait_for(lambda: counters() is not None, 10, "the counters report")
        finally:
            proxy.send_signal(signal.SIGTERM)
        stream = proxy.stdout.read()  # now the pipe is read: the writer finishes what it holds
        proxy.wait(30)
    assert got == payload and elapsed < 60
    m = counters()
    assert m is not None and int(m.group(3)) > 0, m  # dropped, and counted
    recs = list(records(io.BytesIO(stream)))  # whole records: no CaptureError
    assert 0 < len(recs) < 2 * len(payload) // 3776  # fewer than crossed: some were dropped


def test_a_pcap_buffer_below_two_mib_is_a_clear_error(workdir: str) -> None:
    p = subprocess.run([sys.executable, "-m", "vsproxy", "--socket", os.path.join(workdir, "a.sock"), "--guest-cid",
                        "5", "--pcap", os.path.join(workdir, "x.pcapng"), "--pcap-buffer", "1000"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "--pcap-buffer 1000: at least" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("fmt_name", ["pcapng", "pcap"])
def test_size_rotation_splits_a_chunk_of_many_records_at_record_boundaries(workdir: str, fmt_name: str) -> None:
    import io

    from vsproxy.capture.reader import records
    from vsproxy.capture.writer import CaptureOptions, CaptureWriter

    path = os.path.join(workdir, f"r.{fmt_name}")
    w = CaptureWriter(CaptureOptions(path, fmt_name, rotate_bytes=4000), ["dev"])
    sizes = [1 + (i * 37) % 900 for i in range(60)] + [9000]  # the last is larger than a file
    blob = bytearray()
    for i, n in enumerate(sizes):
        h = H.pack(5, 2, 1, 2, n, 1, H.Op.RW, 0, 0, i)
        head, body = fmt.vsockmon_parts(h, bytes([i]) * n)
        blob += b"".join(fmt.pcap_record_parts(1.0, head, body) if fmt_name == "pcap" else
                         fmt.pcapng_epb_parts(0, 1.0, head, body, inbound=True))
    w.commit(blob, len(sizes))  # one commit: the writer must cut it between records
    w.close()
    files = sorted((f for f in os.listdir(workdir) if f.startswith(f"r.{fmt_name}.")),
                   key=lambda f: int(f.split(".")[-1]))
    assert len(files) > 5
    seen = []
    for f in files:
        with open(os.path.join(workdir, f), "rb") as fh:
            data = fh.read()
        recs = list(records(io.BytesIO(data)))
        assert recs  # every file holds whole records, and at least one
        assert len(data) <= 4000 or len(recs) == 1  # only a record larger than a file stands alone
        seen += [H.unpack(r.frame, 32).fwd_cnt for r in recs]
    assert seen == list(range(len(sizes)))  # every record once, in order
    assert w.counters.packets == len(sizes) and w.counters.dropped == 0


def test_time_rotation_starts_new_files_and_keeps_every_record(workdir: str) -> None:
    import io

    from vsproxy.capture.reader import records
    from vsproxy.capture.writer import CaptureOptions, CaptureWriter

    path = os.path.join(workdir, "t.pcapng")
    w = CaptureWriter(CaptureOptions(path, rotate_seconds=0.3, max_files=0), ["dev"])
    for i in range(3):
        hdr = H.pack(5, 2, 1, 2, 4, 1, H.Op.RW, 0, 0, i)
        w.tap("dev", False, hdr, [b"tick"])
        time.sleep(0.9)  # past the rotation interval and the writer's half-second turn
    w.close()
    files = sorted((f for f in os.listdir(workdir) if f.startswith("t.pcapng.")), key=lambda f: int(f.split(".")[-1]))
    assert len(files) >= 3
    seen = []
    for f in files:
        with open(os.path.join(workdir, f), "rb") as fh:
            seen += [H.unpack(r.frame, 32).fwd_cnt for r in records(io.BytesIO(fh.read()))]
    assert seen == [0, 1, 2]
