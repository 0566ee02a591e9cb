"""Writing captures for tests: a committed capture's packets, edited, as a new pcapng file
(vsproxy's own block writers), so a test can make the one difference it is about."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from vsproxy.capture import format as fmt
from vsproxy.capture.reader import Record, dissect, records
from vsproxy.vsock import header as H

Packet = tuple[Record, H.Header, bytes]
Edit = Callable[[Record, H.Header, bytes], Iterable[Packet]]


def read(path: Path) -> list[Packet]:
    out = []
    with open(path, "rb") as f:
        for rec in records(f):
            p = dissect(rec)
            assert p.hdr is not None
            out.append((rec, p.hdr, p.payload))
    return out


def write(path: Path, packets: Iterable[Packet]) -> Path:
    names: list[str] = []
    blocks = [fmt.pcapng_shb("test")]
    for rec, hdr, payload in packets:
        if rec.interface not in names:
            names.append(rec.interface)
            blocks.append(fmt.pcapng_idb(rec.interface))
        frame = fmt.vsockmon_frame(H.pack(*hdr._replace(len=len(payload))), payload)
        blocks.append(fmt.pcapng_epb(names.index(rec.interface), rec.ts, frame, inbound=bool(rec.inbound),
                                     comment=rec.comment))
    path.write_bytes(b"".join(blocks))
    return path


def edited(src: Path, dst: Path, edit: Edit) -> Path:
    """``src`` with each packet replaced by what ``edit`` makes of it (none, itself, several)."""
    return write(dst, [p for rec, hdr, payload in read(src) for p in edit(rec, hdr, payload)])
