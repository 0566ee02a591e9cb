"""README.md's "Replay" section runs as written: each command in its sh and console blocks is run
here (paths under /tmp/ moved to a test directory, the example's TCP port 8080 to a free one)
with the services the text describes, and prints what the README shows. And the replay
benchmark runs (--quick) and prints its figures."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from replay_servers import http_server, keys_handler, seqpacket_server

from vsproxy.replay.transcript import load_transcript
from vsproxy.simguest import SimGuest

ROOT = Path(__file__).resolve().parent.parent
REQUEST = load_transcript(str(ROOT / "captures" / "http-over-vsock.pcapng")).conversations[0].sent(True)
RESPONSE = load_transcript(str(ROOT / "captures" / "http-over-vsock.pcapng")).conversations[0].sent(False)


def section() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Replay\n(.*?)^## ", text, re.S | re.M)
    assert m, "README.md has no Replay section"
    return m.group(1)


def sh_commands() -> list[str]:
    return [line for block in re.findall(r"```sh\n(.*?)```", section(), re.S) for line in block.splitlines()]


def console_examples() -> list[tuple[str, str]]:
    out = []
    for block in re.findall(r"```console\n(.*?)```", section(), re.S):
        for part in re.split(r"^(?=\$ )", block, flags=re.M):
            if part.startswith("$ "):
                command, _, output = part.partition("\n")
                out.append((command[2:], output))
    return out


def example(prefix: str) -> tuple[str, str]:
    found = [(c, o) for c, o in console_examples() if c.startswith(prefix)]
    assert found, f"README's Replay section has no example starting {prefix!r}"
    return found[0]


def run(command: str, subst: dict[str, str]) -> subprocess.CompletedProcess[str]:
    for a, b in subst.items():
        command = command.replace(a, b)
    argv = shlex.split(command)
    assert argv[0] == "vsproxy"
    return subprocess.run([sys.executable, "-m", "vsproxy", *argv[1:]], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def shows(proc: subprocess.CompletedProcess[str], output: str, subst: dict[str, str]) -> None:
    for a, b in subst.items():
        output = output.replace(a, b)
    assert (proc.stdout + proc.stderr).rstrip("\n") == output.rstrip("\n")


@contextmanager
def vsproxy(command: str, subst: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    for a, b in subst.items():
        command = command.replace(a, b)
    argv = shlex.split(command)
    m = re.search(r"(?:--socket |socket=)([^ ,]+)", command)
    assert m, command
    sock = m.group(1)
    p = subprocess.Popen([sys.executable, "-m", "vsproxy", *argv[1:]], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            assert p.poll() is None and time.monotonic() < deadline, "vsproxy did not start"
            time.sleep(0.02)
        yield p
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        p.communicate(timeout=10)


def test_the_section_shows_every_kind_of_replay() -> None:
    commands = [c for c, _ in console_examples()] + sh_commands()
    for kind in ("vsproxy diff ", "--replay-server ", "vsproxy replay client ", "vsproxy replay guest "):
        assert any(kind in c for c in commands), kind


@pytest.mark.parametrize("n", [0, 1])
def test_diff_examples(n: int) -> None:
    command, output = [(c, o) for c, o in console_examples() if c.startswith("vsproxy diff captures/")
                       and "/tmp/" not in c][n]
    proc = run(command, {})
    assert proc.returncode == (0 if output.startswith("same") else 1)
    shows(proc, output, {})


def test_server_replay_example(workdir: str) -> None:
    (command,) = [c for c in sh_commands() if "--replay-server" in c]
    subst = {"/tmp/": f"{workdir}/"}
    with vsproxy(command, subst) as p:
        sock = f"{workdir}/vhost5.sock"
        with SimGuest(sock, timeout=10) as g:
            s = g.connect(8080)
            s.sendall(REQUEST)
            s.shutdown_write()
            assert s.recv_all(timeout=10) == RESPONSE
            s.close(timeout=5)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=10)
    line = re.search(r"`(replay captures/http-over-vsock\.pcapng at 2:8080: [^`]*)`", section())
    assert line, "the README shows the counters line"
    assert line.group(1) in err.decode()


def test_client_replay_examples(workdir: str) -> None:
    command, output = example("vsproxy replay client captures/http-over-vsock.pcapng")
    with http_server(keys_handler()) as where:
        subst = {"127.0.0.1:8080": where.removeprefix("tcp:")}
        proc = run(command, subst)
    assert proc.returncode == 0
    shows(proc, output, subst)
    command, output = example("vsproxy replay client captures/seqpacket.pcapng")
    subst = {"/tmp/": f"{workdir}/"}
    replies = {b"HELLO": b"HELLO from the host", b"GET region": b"region=us-east-1", b"BYE": b"BYE"}
    with seqpacket_server(f"{workdir}/vm5.vsock_5005", replies):
        proc = run(command, subst)
    assert proc.returncode == 1
    shows(proc, output, subst)


def test_guest_replay_example(workdir: str) -> None:
    (command,) = [c for c in sh_commands() if "--pcap /tmp/again.pcapng" in c]
    subst = {"/tmp/": f"{workdir}/"}
    replay_cmd, replay_out = example("vsproxy replay guest ")
    diff_cmd, diff_out = example("vsproxy diff captures/seqpacket.pcapng /tmp/again.pcapng")
    with seqpacket_server(f"{workdir}/vm5.vsock_5005"), vsproxy(command, subst):
        proc = run(replay_cmd, subst)
        assert proc.returncode == 0
        shows(proc, replay_out, subst)
        time.sleep(0.1)  # the last packet (vsproxy's RST) is written right after it is sent
        proc = run(diff_cmd, subst)
    assert proc.returncode == 0
    shows(proc, diff_out, subst)


def test_replay_benchmark_runs_and_prints_its_figures() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/bench_replay.py", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert re.search(r"guest replay asap, 8 MiB guest->host .*: [\d.]+ s, \d+ MiB/s .*; ok\)", out), out
    assert re.search(r"simulated guest's own guest->host rate .*: \d+ MiB/s; replay is \d+% of it", out), out
    assert re.search(r"replay process peak RSS \d+ MiB for a \d+ MiB capture; first to last byte at the host "
                     r"[\d.]+ s, \d+ MiB/s", out), out
    assert re.search(r"client replay of 300 short connections: [\d.]+ s .*exit 0: .*300 same", out), out
    assert re.search(r"server replay, 200 request/answer exchanges .*median \d+ us, p90 \d+ us", out), out
    assert re.search(r"replay/echo [\d.]+x median", out), out


def test_show_examples() -> None:
    shown = [(c, o) for c, o in console_examples() if c.startswith("vsproxy replay show ")]
    assert len(shown) >= 2
    for command, output in shown:
        proc = run(command, {})
        assert proc.returncode == 0, proc.stderr
        shows(proc, output, {})
