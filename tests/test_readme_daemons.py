"""Every long-running `vsproxy` command the README shows starts as written and serves a guest.

Each command of the README's ``sh`` blocks that starts a proxy (``vsproxy --socket ...``,
``vsproxy --vm ...``, pipes included) runs with its /tmp, /run and /var/tmp paths moved into a
fresh directory: every vhost-user socket it names appears, a simulated guest on the first one
opens a connection, and SIGTERM ends it with status 0 and no traceback. `vsproxy --tui` needs a
terminal and runs in tests/test_tui_tmux.py instead.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vsproxy.simguest import SimGuest, SimGuestError

ROOT = Path(__file__).resolve().parent.parent


def readme_daemon_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```sh\n(.*?)\n```", text, re.S):
        for cmd in re.sub(r"\\\n\s*", "", block).splitlines():
            if re.match(r"vsproxy (--socket|--vm) ", cmd) and "--tui" not in cmd:
                out.append(cmd)
    return out


COMMANDS = readme_daemon_commands()


def vsproxy_pids(sid: int) -> list[int]:
    """The vsproxy processes of the session ``sid`` (the shell running a README line)."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(fields[3]) == sid and int(d) != sid and any(a.endswith(b"vsproxy") for a in argv[:3]):
            pids.append(int(d))
    return pids


def test_the_readme_shows_the_daemon_commands_this_file_runs() -> None:
    assert len(COMMANDS) >= 6, COMMANDS
    assert any("--pcap-lossless" in c for c in COMMANDS) and any("| tshark" in c for c in COMMANDS)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_a_readme_daemon_command_starts_serves_a_guest_and_stops_cleanly(cmd: str, workdir: str) -> None:
    moved = re.sub(r"(?<![\w.])/(tmp|run|var/tmp)/", workdir + "/", cmd)
    sockets = [p for p in re.findall(r"(?:--socket |socket=)(\S+?)(?:[,\s]|$)", moved)]
    assert sockets, moved
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    log = open(os.path.join(workdir, "log"), "wb")
    proc = subprocess.Popen(["bash", "-c", moved], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not all(os.path.exists(s) for s in sockets):
            assert proc.poll() is None and time.monotonic() < deadline, Path(workdir, "log").read_text()
            time.sleep(0.05)
        with SimGuest(sockets[0], timeout=10) as g:
            try:  # whatever the command serves at CID 2 port 1: a connection or an RST
                g.connect(1, cid=2, timeout=5).close()
            except (SimGuestError, ConnectionError):
                pass
            assert g.stats.rx_packets > 0  # vsproxy answered
    finally:
        # vsproxy first (a pipeline's reader then sees EOF and finishes), then what is left of
        # the session started here
        for pid in vsproxy_pids(proc.pid) or [proc.pid]:
            os.kill(pid, signal.SIGTERM)
        try:
            rc = proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait(5)
        log.close()
    out = Path(workdir, "log").read_text(errors="replace")
    assert "Traceback" not in out, out
    assert rc in (0, -signal.SIGTERM, 128 + signal.SIGTERM) or "| tshark" in moved, (rc, out)
    if "| tshark" in moved:
        # tshark decoded the live stream: the guest's REQUEST and vsproxy's RST
        assert re.search(r"vSocket .*Op: Request", out) and re.search(r"vSocket .*Op: Rst", out), out
