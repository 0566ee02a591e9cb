"""``vsproxy read FILE``: one line per packet, like ``tcpdump -r`` (``-`` reads stdin).

Reads vsproxy's captures and the kernel's vsockmon ones (pcap or pcapng, LINKTYPE_VSOCK).
"""

from __future__ import annotations

import argparse
import json
import sys

from vsproxy.capture.reader import CaptureError, as_json, dissect, records, summary_line


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vsproxy read", description=__doc__)
    p.add_argument("file", help="a pcap or pcapng file, or - for stdin")
    p.add_argument("--json", action="store_true", help="one JSON object per packet")
    args = p.parse_args(argv)
    try:
        f = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")
    except OSError as e:
        print(f"vsproxy read: {args.file}: {e.strerror}", file=sys.stderr)
        return 2
    count = 0
    try:
        with f:
            for rec in records(f):
                pkt = dissect(rec)
                line = json.dumps(as_json(pkt)) if args.json else summary_line(pkt)
                print(line)
                count += 1
    except CaptureError as e:
        print(f"vsproxy read: {args.file}: {e} (after {count} packets)", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    return 0
