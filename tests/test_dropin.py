"""vsproxy as a drop-in for vhost-device-vsock (issue 22).

Every command line and YAML file that vhost-device-vsock's README, man page, ``--help`` and
own tests show, and the one in QEMU's nitro-enclave documentation, copied verbatim into
``EXAMPLES`` (each with the place it came from), goes through ``vsproxy --check`` with the
resolved values asserted, and through a short real start: its /tmp paths moved into a
temporary folder, a simulated guest on every vhost-user socket, bytes both ways on every host
side. AF_VSOCK forms start with ``--vsock-via-unix`` (the socket factory the tests inject):
nothing here opens an AF_VSOCK socket.

Sources (rust-vmm/vhost-device at d7ec5e4a800bc728fd213465be51c460a2ce46c7):
  README    vhost-device-vsock/README.md
  MAN       vhost-device-vsock/vhost-device-vsock.1 (EXAMPLES)
  HELP      vhost-device-vsock/src/main.rs, the ``--vm`` doc comment clap prints in --help
  TESTS     vhost-device-vsock/src/main.rs, mod tests (test_vsock_config_setup_*)
  QEMU      qemu/qemu docs/system/i386/nitro-enclave.rst, "Running a nitro-enclave VM"
Where the README gives a template (``--guest-cid=<CID assigned to the guest>``), the values
are filled in and the entry says so.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass

import pytest
from helpers import EchoServer, VsproxyProcess, hybrid_connect, unix_server, wait_for
from test_routing import echo_guest, roundtrip

from vsproxy.simguest import SimGuest
from vsproxy.simguest.errors import SimGuestError
from vsproxy.vsock.core import DEFAULT_BUF_ALLOC


@dataclass(frozen=True)
class Dev:
    """What vhost-device-vsock resolves the example to (its main.rs tests assert these fields)."""

    cid: int
    socket: str
    uds: str | None = None
    forward_cid: int | None = None
    forward_listen: tuple[int, ...] = ()
    tx: int | None = None  # None: not given, so vsproxy's default (README: why it is not 65536)
    queue: int = 1024
    groups: str = "(none)"


@dataclass(frozen=True)
class Example:
    name: str
    source: str
    argv: tuple[str, ...]
    devices: tuple[Dev, ...]
    yaml: str | None = None  # written to a file; CONFIG in argv is its path


# -- the table ---------------------------------------------------------------------------------
README_YAML = """\
vms:
    - guest_cid: 3
      socket: /tmp/vhost3.socket
      uds_path: /tmp/vm3.vsock
      tx_buffer_size: 65536
      queue_size: 1024
      groups: group1+groupA
    - guest_cid: 4
      socket: /tmp/vhost4.socket
      uds_path: /tmp/vm4.vsock
      tx_buffer_size: 32768
      queue_size: 256
      groups: group2+groupB
    - guest_cid: 5
      socket: /tmp/vhost5.socket
      forward-cid: 1
      forward-listen: 9001+9002
      tx_buffer_size: 32768
      queue_size: 1024
"""

MAN_YAML = """\
vms:
    - guest_cid: 3
      socket: /tmp/vhost3.socket
      uds_path: /tmp/vm3.sock
      tx_buffer_size: 65536
      queue_size: 1024
      groups: group1+groupA
    - guest_cid: 4
      socket: /tmp/vhost4.socket
      uds_path: /tmp/vm4.sock
      tx_buffer_size: 32768
      queue_size: 256
      groups: group2+groupB
"""

TESTS_YAML_BOTH = """\
vms:
    - guest_cid: 4
      socket: /tmp/vhost4.socket
      uds_path: /tmp/vm4.vsock
      tx_buffer_size: 32768
      queue_size: 256
      groups: group1+group2
    - guest_cid: 5
      socket: /tmp/vhost5.socket
      forward_cid: 1
      forward_listen: 1234+4321
      tx_buffer_size: 32768"""

TESTS_YAML_DEFAULTS = """\
vms:
    - socket: /tmp/vhost4.socket
      uds_path: /tmp/vm4.vsock"""

VM4_UDS = Dev(4, "/tmp/vhost4.socket", uds="/tmp/vm4.vsock")
VM4_FWD = Dev(4, "/tmp/vhost4.socket", forward_cid=1, forward_listen=(9001, 9002))

EXAMPLES = [
    Example("readme-uds-backend", "README 'Unix Domain Socket Backend' Example; also 'Working example' shell1",
            ("--vm", "guest-cid=4,uds-path=/tmp/vm4.vsock,socket=/tmp/vhost4.socket"), (VM4_UDS,)),
    Example("readme-vsock-backend", "README 'VSOCK Backend' Example; also 'Using the vsock backend' shell1",
            ("--vm", "guest-cid=4,forward-cid=1,forward-listen=9001+9002,socket=/tmp/vhost4.socket"), (VM4_FWD,)),
    Example("qemu-nitro-enclave", "QEMU nitro-enclave.rst 'Running a nitro-enclave VM'",
            ("--vm", "guest-cid=4,forward-cid=1,forward-listen=9001+9002,socket=/tmp/vhost4.socket"), (VM4_FWD,)),
    Example("readme-usage-uds-flags", "README 'Usage' single-device flags, template with values filled in",
            ("--guest-cid=4", "--socket=/tmp/vhost4.socket", "--uds-path=/tmp/vm4.vsock", "--tx-buffer-size=65536",
             "--queue-size=1024", "--groups=group1+groupA"),
            (Dev(4, "/tmp/vhost4.socket", uds="/tmp/vm4.vsock", tx=65536, groups="group1+groupA"),)),
    Example("readme-usage-uds-vm", "README 'Usage' --vm form (guest_cid spelled with _), values filled in",
            ("--vm", "guest_cid=4,socket=/tmp/vhost4.socket,uds-path=/tmp/vm4.vsock,tx-buffer-size=65536,"
             "queue-size=512,groups=group1+group2"),
            (Dev(4, "/tmp/vhost4.socket", uds="/tmp/vm4.vsock", tx=65536, queue=512, groups="group1+group2"),)),
    Example("readme-usage-vsock-flags", "README 'Usage' vsock backend flags, template with values filled in",
            ("--guest-cid=4", "--socket=/tmp/vhost4.socket", "--forward-cid=1", "--forward-listen=9001+9002",
             "--tx-buffer-size=65536", "--queue-size=1024"),
            (Dev(4, "/tmp/vhost4.socket", forward_cid=1, forward_listen=(9001, 9002), tx=65536),)),
    Example("readme-usage-vsock-vm", "README 'Usage' vsock backend --vm form, values filled in",
            ("--vm", "guest_cid=4,socket=/tmp/vhost4.socket,forward-cid=1,forward-listen=9001+9002,"
             "tx-buffer-size=65536,queue-size=1024,groups=group1"),
            (Dev(4, "/tmp/vhost4.socket", forward_cid=1, forward_listen=(9001, 9002), tx=65536, groups="group1"),)),
    Example("readme-multiple-vm", "README 'Specify the --vm argument multiple times'",
            ("--vm", "guest-cid=3,socket=/tmp/vhost3.socket,uds-path=/tmp/vm3.vsock,groups=group1+groupA",
             "--vm", "guest-cid=4,socket=/tmp/vhost4.socket,uds-path=/tmp/vm4.vsock,tx-buffer-size=32768,"
             "queue-size=256",
             "--vm", "guest-cid=5,socket=/tmp/vhost5.socket,forward-cid=1,forward-listen=9001+9002,"
             "tx-buffer-size=32768,queue-size=1024"),
            (Dev(3, "/tmp/vhost3.socket", uds="/tmp/vm3.vsock", groups="group1+groupA"),
             Dev(4, "/tmp/vhost4.socket", uds="/tmp/vm4.vsock", tx=32768, queue=256),
             Dev(5, "/tmp/vhost5.socket", forward_cid=1, forward_listen=(9001, 9002), tx=32768))),
    Example("readme-config-file", "README 'Configuration file example' (uds_path beside forward-cid)",
            ("--config=CONFIG",),
            (Dev(3, "/tmp/vhost3.socket", uds="/tmp/vm3.vsock", tx=65536, groups="group1+groupA"),
             Dev(4, "/tmp/vhost4.socket", uds="/tmp/vm4.vsock", tx=32768, queue=256, groups="group2+groupB"),
             Dev(5, "/tmp/vhost5.socket", forward_cid=1, forward_listen=(9001, 9002), tx=32768)),
            yaml=README_YAML),
    Example("readme-working-example-sizes", "README 'Working example', with the TX buffer and vring sizes",
            ("--vm", "guest-cid=4,uds-path=/tmp/vm4.vsock,socket=/tmp/vhost4.socket,tx-buffer-size=65536,"
             "queue-size=1024"),
            (Dev(4, "/tmp/vhost4.socket", uds="/tmp/vm4.vsock", tx=65536),)),
    Example("readme-siblings", "README 'Sibling VM communication' shell1",
            ("--vm", "guest-cid=3,uds-path=/tmp/vm3.vsock,socket=/tmp/vhost3.socket,groups=group1+group2",
             "--vm", "guest-cid=4,uds-path=/tmp/vm4.vsock,socket=/tmp/vhost4.socket,groups=group1"),
            (Dev(3, "/tmp/vhost3.socket", uds="/tmp/vm3.vsock", groups="group1+group2"),
             Dev(4, "/tmp/vhost4.socket", uds="/tmp/vm4.vsock", groups="group1"))),
    Example("man-multiple-vm", "MAN EXAMPLES, --vm given twice",
            ("--vm", "guest-cid=3,socket=/tmp/vhost3.socket,uds-path=/tmp/vm3.vsock,groups=group1+groupA",
             "--vm", "guest-cid=4,socket=/tmp/vhost4.socket,uds-path=/tmp/vm4.vsock,tx-buffer-size=32768,"
             "queue-size=256"),
            (Dev(3, "/tmp/vhost3.socket", uds="/tmp/vm3.vsock", groups="group1+groupA"),
             Dev(4, "/tmp/vhost4.socket", uds="/tmp/vm4.vsock", tx=32768, queue=256))),
    Example("man-config-file", "MAN EXAMPLES, configuration file in yaml format", ("--config=CONFIG",),
            (Dev(3, "/tmp/vhost3.socket", uds="/tmp/vm3.sock", tx=65536, groups="group1+groupA"),
             Dev(4, "/tmp/vhost4.socket", uds="/tmp/vm4.sock", tx=32768, queue=256, groups="group2+groupB")),
            yaml=MAN_YAML),
    Example("help-vm-uds", "HELP --vm Example, first line (clap wraps it after uds-path=/tmp/vm3.vsock,)",
            ("--vm", "guest-cid=3,socket=/tmp/vhost3.socket,uds-path=/tmp/vm3.vsock,tx-buffer-size=65536,"
             "queue-size=1024,groups=group1+group2"),
            (Dev(3, "/tmp/vhost3.socket", uds="/tmp/vm3.vsock", tx=65536, groups="group1+group2"),)),
    Example("help-vm-vsock", "HELP --vm Example, second line",
            ("--vm", "guest-cid=3,socket=/tmp/vhost3.socket,forward-cid=1,forward-listen=9001,queue-size=1024"),
            (Dev(3, "/tmp/vhost3.socket", forward_cid=1, forward_listen=(9001,)),)),
    Example("tests-vm-args", "TESTS test_vsock_config_setup_from_vm_args_vsock (its temp dir as /tmp)",
            ("--vm", "socket=/tmp/vhost3.socket,uds_path=/tmp/vm3.vsock",
             "--vm", "socket=/tmp/vhost4.socket,uds-path=/tmp/vm4.vsock,guest-cid=4,tx_buffer_size=65536,"
             "queue_size=1024,groups=group1",
             "--vm", "groups=group2+group3,guest-cid=5,socket=/tmp/vhost5.socket,uds_path=/tmp/vm5.vsock,"
             "tx-buffer-size=32768,queue_size=256",
             "--vm", "guest-cid=6,socket=/tmp/vhost6.socket,forward-cid=1,forward-listen=1234+4321,queue-size=2048"),
            (Dev(3, "/tmp/vhost3.socket", uds="/tmp/vm3.vsock"),
             Dev(4, "/tmp/vhost4.socket", uds="/tmp/vm4.vsock", tx=65536, groups="group1"),
             Dev(5, "/tmp/vhost5.socket", uds="/tmp/vm5.vsock", tx=32768, queue=256, groups="group2+group3"),
             Dev(6, "/tmp/vhost6.socket", forward_cid=1, forward_listen=(1234, 4321), queue=2048))),
    Example("tests-file-both", "TESTS test_vsock_config_setup_from_file_vsock, first file", ("--config=CONFIG",),
            (Dev(4, "/tmp/vhost4.socket", uds="/tmp/vm4.vsock", tx=32768, queue=256, groups="group1+group2"),
             Dev(5, "/tmp/vhost5.socket", forward_cid=1, forward_listen=(1234, 4321), tx=32768)),
            yaml=TESTS_YAML_BOTH),
    Example("tests-file-defaults", "TESTS test_vsock_config_setup_from_file_unix, defaults-only file",
            ("--config=CONFIG",), (Dev(3, "/tmp/vhost4.socket", uds="/tmp/vm4.vsock"),), yaml=TESTS_YAML_DEFAULTS),
    Example("issue-no-guest-cid", "issue 22: --socket S --uds-path U without --guest-cid (CID 3)",
            ("--socket", "/tmp/vhost3.socket", "--uds-path", "/tmp/vm3.vsock"),
            (Dev(3, "/tmp/vhost3.socket", uds="/tmp/vm3.vsock"),)),
]


# -- helpers -----------------------------------------------------------------------------------
def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vsproxy", *args], capture_output=True, text=True, timeout=30)


def parse_check(text: str) -> list[dict[str, list[str]]]:
    """``vsproxy --check``'s table: one dict per device, label -> its value lines."""
    devices: list[dict[str, list[str]]] = []
    label = ""
    for line in text.splitlines():
        if line.startswith("device "):
            devices.append({"name": [line.removeprefix("device ")]})
        elif re.match(r"    \d+\. ", line) and devices:
            devices[-1].setdefault("rules", []).append(line.strip())
        elif line.startswith("  ") and devices:
            key, _, value = line.strip().partition("  ")
            if line[2] != " ":
                label = key
            else:  # a continuation line (more host sides)
                value = line.strip()
            devices[-1].setdefault(label, []).append(value.strip())
    return devices


def assert_resolved(table: list[dict[str, list[str]]], expected: tuple[Dev, ...], moved: str = "/tmp") -> None:
    def at(path: str) -> str:
        return path.replace("/tmp", moved, 1)

    assert len(table) == len(expected)
    for got, want in zip(table, expected, strict=True):
        assert got["guest CID"] == [str(want.cid)]
        assert got["vhost-user socket"] == [at(want.socket)]
        assert got["queue-size"][0].split()[0] == str(want.queue)
        assert got["tx-buffer-size"] == [str(want.tx if want.tx is not None else DEFAULT_BUF_ALLOC)]
        assert got["groups"] == [want.groups]
        sides = got["host sides"]
        expected_sides = 0
        if want.uds is not None:
            expected_sides += 1
            assert any(s.startswith(f"hybrid unix {at(want.uds)}:") for s in sides), sides
        if want.forward_cid is not None:
            expected_sides += 1
            assert any(s.startswith("AF_VSOCK:") and s.endswith(f"go to {want.forward_cid}:P") for s in sides), sides
        if want.forward_listen:
            expected_sides += 1
            ports = ", ".join(str(p) for p in want.forward_listen)
            assert f"AF_VSOCK listen on host ports {ports} -> the same guest port" in sides, sides
        assert len(sides) == expected_sides, sides


def materialise(ex: Example, folder: str, moved: str | None = None) -> list[str]:
    """The example's argv, its YAML written into ``folder`` (and /tmp moved to ``moved``)."""
    argv = [a.replace("/tmp/", f"{moved}/") for a in ex.argv] if moved else list(ex.argv)
    if ex.yaml is not None:
        conf = os.path.join(folder, "vms.yaml")
        with open(conf, "w") as f:
            f.write(ex.yaml.replace("/tmp/", f"{moved}/") if moved else ex.yaml)
        argv = [a.replace("CONFIG", conf) for a in argv]
    return argv


# -- --check on every example ------------------------------------------------------------------
@pytest.mark.parametrize("ex", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_every_vhost_device_vsock_example_resolves_to_the_same_devices(workdir: str, ex: Example) -> None:
    p = run_cli("--check", *materialise(ex, workdir))
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    assert_resolved(parse_check(p.stdout), ex.devices)
    assert p.stdout.rstrip().endswith("configuration OK (--check opened no socket)")


def test_check_creates_no_socket_and_no_file(workdir: str) -> None:
    hybrid = os.path.join(workdir, "vm4.vsock")
    p = run_cli("--check", "--vm", f"guest-cid=4,uds-path={hybrid},socket={workdir}/vhost4.socket",
                "--vm", f"guest-cid=5,socket={workdir}/vhost5.socket,forward-cid=1,forward-listen=9001+9002",
                "--vm", f"guest-cid=6,socket={workdir}/vhost6.socket,listen=tcp:127.0.0.1:0=5000",
                "--control", f"{workdir}/ctl", "--pcap", f"{workdir}/c.pcapng")
    assert p.returncode == 0, p.stderr
    assert [d["name"] for d in parse_check(p.stdout)] == [["cid4"], ["cid5"], ["cid6"]]
    assert f"capture              {workdir}/c.pcapng (pcapng)\n" in p.stdout
    assert f"control socket       {workdir}/ctl\n" in p.stdout
    assert os.listdir(workdir) == []  # no vhost-user, hybrid or control socket, no capture file


def test_check_names_the_missing_folders_of_the_capture_and_control_socket(workdir: str) -> None:
    p = run_cli("--check", "--socket", f"{workdir}/v.sock", "--pcap", f"{workdir}/no/c.pcapng",
                "--control", f"{workdir}/nor/ctl", "--pcap-buffer", "10")
    assert p.returncode == 2
    assert p.stderr.splitlines() == [
        "vsproxy: error: --pcap-buffer 10: at least 2097152 bytes (2 MiB)",
        f"vsproxy: error: --pcap {workdir}/no/c.pcapng: directory {workdir}/no does not exist",
        f"vsproxy: error: --control {workdir}/nor/ctl: directory {workdir}/nor does not exist",
        "vsproxy: 3 problems found; nothing was started",
    ]


def test_check_calls_no_socket_constructor(workdir: str, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """In-process, with socket.socket and socketpair made to fail: --check of unix, TCP and
    AF_VSOCK devices (no --vsock-via-unix: the real factory is configured, never used) returns 0."""
    from vsproxy import cli

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("--check made a socket")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "socketpair", refuse)
    rc = cli.main(["--check", "--vm", f"guest-cid=4,uds-path={workdir}/h,socket={workdir}/v4",
                   "--vm", f"guest-cid=5,socket={workdir}/v5,forward-cid=1,forward-listen=9001",
                   "--vm", f"guest-cid=6,socket={workdir}/v6,listen=tcp:127.0.0.1:0=80,forward=80=tcp:127.0.0.1:1",
                   "--control", f"{workdir}/ctl"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "3 devices; configuration OK" in out.out
    assert os.listdir(workdir) == []


def test_check_prints_every_problem_and_exits_2(workdir: str) -> None:
    conf = os.path.join(workdir, "vms.yaml")
    with open(conf, "w") as f:
        f.write("vms:\n  - guest_cdi: 7\n    socket: /tmp/v7.socket\n    uds_path: /tmp/v7.vsock\n"
                "    forward_cid: 1\n")
    p = run_cli("--check", "--vm", "guest-cid=4,socket=/tmp/v4.socket,uds-path=/tmp/v4.vsock,queue_size=70000",
                "--vm", "guest-cid=4,socket=/tmp/v5.socket,forward-listen=9001", "--config", conf,
                "--socket", f"{workdir}/nope/s", "--guest_cid", "9", "--remap", "3:1=2")
    assert p.returncode == 2 and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    expected = [
        "vsproxy: error: unknown option '--guest_cid' (did you mean '--guest-cid'?)",
        "vsproxy: error: --vm #1 queue-size: queue size '70000' is not a number in 1..32768",
        "vsproxy: error: --vm #2: forward-listen needs forward-cid: it listens on host AF_VSOCK ports and belongs to "
        "the AF_VSOCK backend",
        f"vsproxy: error: {conf} vms[0]: unknown key 'guest_cdi' (did you mean 'guest_cid'?)",
        f"vsproxy: error: {conf} vms[0]: uds-path and forward-cid both given: they are two host backends (hybrid "
        "unix sockets, AF_VSOCK) and a device has one, as in vhost-device-vsock",
        "vsproxy: error: --remap: remap '3:1=2' must give a port on both sides or on neither",
        "vsproxy: error: guest CID 4 given to both cid4 and cid4",
        "vsproxy: error: guest CID 3 given to both cid3 and cid3",  # the file's device, guest_cdi unread: CID 3
        f"vsproxy: error: cid3: socket {workdir}/nope/s: directory {workdir}/nope does not exist",
        "vsproxy: 9 problems found; nothing was started",
    ]
    assert lines == expected
    assert sorted(os.listdir(workdir)) == ["vms.yaml"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vm", "guest_cdi=4,socket=S"], "unknown key 'guest_cdi' (did you mean 'guest_cid'?)"),
        (["--vm", "guest-cdi=4,socket=S"], "unknown key 'guest-cdi' (did you mean 'guest-cid'?)"),
        (["--vm", "socket=S,uds_paht=U"], "unknown key 'uds_paht' (did you mean 'uds_path'?)"),
        (["--vm", "socket=S,group=a"], "unknown key 'group' (did you mean 'groups'?)"),
        (["--vm", "socket=S,guest-cid=4,guest_cid=5"], "key 'guest-cid' given twice (as 'guest-cid' and 'guest_cid')"),
        (["--socket", "S", "--uds-pat", "U"], "unknown option '--uds-pat' (did you mean '--uds-path'?)"),
        (["--socket", "S", "--queue_size=8"], "unknown option '--queue_size' (did you mean '--queue-size'?)"),
        (["--socket", "S", "--uds-path", "U", "--forward-cid", "1"],
         "--uds-path and --forward-cid both given: they are two host backends"),
        (["--socket", "S", "--uds-path", "U", "--forward-listen", "9001"],
         "--forward-listen needs --forward-cid: it listens on host AF_VSOCK ports and belongs to the AF_VSOCK "
         "backend (with uds-path, host programs connect in through the hybrid socket's CONNECT line)"),
        (["--vm", "socket=S,uds-path=U,forward-cid=1,forward-listen=9001"], "uds-path and forward-cid both given"),
        (["--vm", "socket=S,forward-cid=1,forward-listen=9001+x"], "port 'x' is not a number"),
        (["--queue-size", "4"], "--queue-size needs --socket"),
        (["--socket", "S", "--queue-size", "0"], "--queue-size: queue size '0' is not a number in 1..32768"),
        (["--socket", "S", "--tx-buffer-size", "65536x"], "--tx-buffer-size: tx-buffer-size '65536x' is not a number"),
    ],
)
def test_misspellings_name_the_nearest_and_conflicts_say_why(workdir: str, args: list[str], message: str) -> None:
    args = [f"{workdir}/s" if a == "S" else a.replace("socket=S", f"socket={workdir}/s") for a in args]
    p = run_cli(*args)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vsproxy: error: ") and message in lines[0], p.stderr
    assert os.listdir(workdir) == []


def test_a_file_value_of_the_wrong_shape_is_named(workdir: str) -> None:
    conf = os.path.join(workdir, "vms.yaml")
    with open(conf, "w") as f:
        f.write("vms:\n  - socket: [/tmp/a, /tmp/b]\n    guest_cid: true\n    uds_path:\n    groups: [g1, g2]\n")
    p = run_cli("--check", "--config", conf)
    assert p.returncode == 2
    assert p.stderr.splitlines() == [
        f"vsproxy: error: {conf} vms[0] socket: expected one value, got list ['/tmp/a', '/tmp/b']",
        f"vsproxy: error: {conf} vms[0] guest-cid: expected one value, got bool True",
        f"vsproxy: error: {conf} vms[0] uds-path: no value",
        "vsproxy: 3 problems found; nothing was started",
    ]


def test_version_is_the_package_metadata() -> None:
    import tomllib
    from importlib.metadata import version

    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)["project"]["version"]
    p = run_cli("--version")
    assert p.returncode == 0
    assert p.stdout == f"vsproxy {version('vsproxy')}\n" == f"vsproxy {declared}\n"


def test_toml_keys_take_both_spellings_and_any_file_name_can_be_yaml(workdir: str) -> None:
    toml = os.path.join(workdir, "vsproxy.toml")
    with open(toml, "w") as f:
        f.write('[[vm]]\nguest_cid = 6\nsocket = "/tmp/v6.socket"\nuds-path = "/tmp/v6.vsock"\nqueue_size = 256\n')
    conf = os.path.join(workdir, "vsock.conf")  # vhost-device-vsock reads any path as YAML
    with open(conf, "w") as f:
        f.write("vms:\n  - socket: /tmp/v3.socket\n    uds_path: /tmp/v3.vsock\n")
    for path, want in ((toml, Dev(6, "/tmp/v6.socket", uds="/tmp/v6.vsock", queue=256)),
                       (conf, Dev(3, "/tmp/v3.socket", uds="/tmp/v3.vsock"))):
        p = run_cli("--check", "--config", path)
        assert p.returncode == 0, p.stderr
        assert_resolved(parse_check(p.stdout), (want,))


def test_check_shows_rules_in_the_order_they_apply(workdir: str) -> None:
    p = run_cli("--check", "--vm", f"name=enclave,guest-cid=5,socket={workdir}/e.sock,remap=3:9000=2:19000,"
                "allow-out=2:8000+2:19000", "--vm", f"name=parent,guest-cid=10,socket={workdir}/p.sock,groups=g",
                "--vm", f"name=friend,guest-cid=11,socket={workdir}/f.sock,groups=g", "--nitro")
    assert p.returncode == 0, p.stderr
    table = {d["name"][0]: d for d in parse_check(p.stdout)}
    assert table["enclave"]["rules"] == [
        "1. service nitro-heartbeat at 3:9000 (every device)",
        "2. remap 3:9000=2:19000 (enclave)",
        "3. remap 3=2 (--nitro) (every device)",
        "4. allow-out: only 2:8000, 2:19000",
        "5. allow-in: default (the host; siblings: none)",
    ]
    assert table["parent"]["rules"][-2:] == [
        "3. allow-out: default (the host, built-in services; siblings: friend (group g))",
        "4. allow-in: default (the host; siblings: friend (group g))",
    ]
    assert table["enclave"]["host sides"] == ["none: the guest's connections to the host get RST"]
    assert "note: enclave give no groups" not in p.stdout  # one ungrouped device: nothing to compare


# -- a short real start of every example -------------------------------------------------------
def exchange_on(dev: Dev, guest: SimGuest, moved: str, vsock_dir: str, servers: list[EchoServer],
                devices: tuple[Dev, ...]) -> None:
    """Bytes both ways on every host side of ``dev``."""
    if dev.uds is not None:
        uds = dev.uds.replace("/tmp", moved, 1)
        host, gs = hybrid_connect(uds, guest, 1234)  # the README's "host$ nc -U ...; CONNECT 1234"
        host.settimeout(10)
        host.sendall(b"from the host")
        assert gs.recv_exactly(13, timeout=10) == b"from the host"
        gs.sendall(b"from the guest")
        got = b""
        while len(got) < 14:
            got += host.recv(64)
        assert got == b"from the guest"
        host.close()
        gs.close()
        servers.append(unix_server(f"{uds}_9000"))  # "host$ nc -l -U /tmp/vm4.vsock_1234"
        s = guest.connect(9000)
        assert roundtrip(s, b"guest to host") == b"guest to host"
        s.close()
    if dev.forward_cid is not None:
        servers.append(unix_server(os.path.join(vsock_dir, f"vsock-{dev.forward_cid}-9000")))
        # vhost-device-vsock forwards every CID: the host, CID 3 (a nitro enclave's parent) and the
        # other devices' CIDs (no group shared with them here)
        def groups(d: Dev) -> set[str]:
            return set() if d.groups == "(none)" else set(d.groups.split("+"))

        others = [d.cid for d in devices if d is not dev and not groups(dev) & groups(d)]
        for cid in sorted({2, 3, *others} - {dev.cid}):
            s = guest.connect(9000, cid=cid)
            assert roundtrip(s, b"\xb7") == b"\xb7"
            s.close()
    if dev.forward_listen:  # the first port: "host$ nc --vsock 1 9001"
        port = dev.forward_listen[0]
        lst = guest.listen(port)
        path = os.path.join(vsock_dir, f"listen-{port}")
        wait_for(lambda: os.path.exists(path), what=path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as host:
            host.settimeout(10)
            host.connect(path)
            gs = lst.accept(timeout=10)
            host.sendall(b"host dials in")
            assert gs.recv_exactly(13, timeout=10) == b"host dials in"
            gs.sendall(b"guest answers")
            got = b""
            while len(got) < 13:
                got += host.recv(64)
            assert got == b"guest answers"
            gs.close()


def start_and_exchange(workdir: str, ex: Example) -> None:
    """``ex`` with its /tmp paths moved into ``workdir``: checked, started, a simulated guest on
    each socket exchanging bytes on every host side, stopped."""
    moved = os.path.join(workdir, "tmp")
    vsock_dir = os.path.join(workdir, "vsock")
    os.mkdir(moved)
    os.mkdir(vsock_dir)
    argv = materialise(ex, workdir, moved)
    check = run_cli("--check", *argv)
    assert check.returncode == 0, check.stderr
    assert_resolved(parse_check(check.stdout), ex.devices, moved)
    uses_vsock = any(d.forward_cid is not None for d in ex.devices)
    extra = ["--vsock-via-unix", vsock_dir] if uses_vsock else []  # never AF_VSOCK on this machine
    sockets = [d.socket.replace("/tmp", moved, 1) for d in ex.devices]
    assert "/tmp/" not in " ".join(argv).replace(moved + "/", "MOVED/").replace(workdir, "WORKDIR")  # all moved
    vp = VsproxyProcess([*argv, *extra], sockets[0], os.path.join(workdir, "vsproxy.log"))
    servers: list[EchoServer] = []
    try:
        wait_for(lambda: all(os.path.exists(s) for s in sockets), what="every vhost-user socket")
        for dev, path in zip(ex.devices, sockets, strict=True):
            with SimGuest(path, ring_size=min(128, dev.queue)) as g:
                assert g.guest_cid == dev.cid
                exchange_on(dev, g, moved, vsock_dir, servers, ex.devices)
        log = vp.log()
        assert "Traceback" not in log and " ERROR " not in log, log
    finally:
        for srv in servers:
            srv.close()
        assert vp.stop() == 0


@pytest.mark.parametrize("ex", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_every_vhost_device_vsock_example_starts_and_carries_bytes(workdir: str, ex: Example) -> None:
    start_and_exchange(workdir, ex)


def test_readme_siblings_sharing_a_group_connect(workdir: str) -> None:
    """README 'Sibling VM communication': guest_cid4$ nc-vsock 3 1234 reaches guest_cid3's listener."""
    moved = os.path.join(workdir, "tmp")
    os.mkdir(moved)
    ex = next(e for e in EXAMPLES if e.name == "readme-siblings")
    argv = materialise(ex, workdir, moved)
    vp = VsproxyProcess(argv, f"{moved}/vhost3.socket", os.path.join(workdir, "vsproxy.log"))
    try:
        wait_for(lambda: os.path.exists(f"{moved}/vhost4.socket"), what="the second socket")
        with echo_guest(f"{moved}/vhost3.socket", 1234) as (_, seen), SimGuest(f"{moved}/vhost4.socket") as g4:
            s = g4.connect(1234, cid=3)
            assert roundtrip(s, b"sibling") == b"sibling"
            s.close()
        assert seen[0][0] == 4
        assert "allowed by group group1" in vp.log()
    finally:
        assert vp.stop() == 0


def test_devices_without_groups_are_told_apart_from_vhost_device_vsock_default_group(workdir: str) -> None:
    """vhost-device-vsock puts a device without groups in 'default', so all such devices reach
    each other; vsproxy fences them (a deliberate difference) and says so, naming the fix."""
    ex = next(e for e in EXAMPLES if e.name == "tests-vm-args")  # cid3, cid6 without groups
    p = run_cli("--check", *ex.argv)
    note = ("note: cid3, cid6 give no groups: vhost-device-vsock would put them in group 'default' and let their "
            "guests connect to each other; vsproxy keeps siblings apart unless they share a group (add "
            "groups=default to each to match)")
    assert note in p.stdout.splitlines()
    same = run_cli("--check", *(a if "groups=" in a else a.replace("socket=", "groups=default,socket=")
                                for a in ex.argv))
    assert "note:" not in same.stdout and same.returncode == 0
    fenced = run_cli("--check", "--vm", "guest-cid=5,socket=/tmp/e.sock,remap=3=10", "--vm",
                     "guest-cid=10,socket=/tmp/p.sock")  # a remap says whom it reaches: nothing to point out
    assert "note:" not in fenced.stdout and fenced.returncode == 0
    moved = os.path.join(workdir, "tmp")
    os.mkdir(moved)
    a, b = f"{moved}/a.sock", f"{moved}/b.sock"
    vp = VsproxyProcess(["--vm", f"guest-cid=5,socket={a}", "--vm", f"guest-cid=6,socket={b}"], a,
                        os.path.join(workdir, "vsproxy.log"))
    try:
        wait_for(lambda: "vsproxy: cid5, cid6 give no groups" in vp.log(), what="the note at start")
        with SimGuest(a) as g, pytest.raises(ConnectionResetError):
            g.connect(7000, cid=6)  # fenced, as the note says
    finally:
        assert vp.stop() == 0


# -- queue-size: a limit on the ring the front-end sets ----------------------------------------
def test_a_ring_larger_than_queue_size_ends_the_session_with_a_clear_error(workdir: str) -> None:
    sock = os.path.join(workdir, "v.sock")
    vp = VsproxyProcess(["--socket", sock, "--uds-path", os.path.join(workdir, "u"), "--queue-size", "256"], sock,
                        os.path.join(workdir, "vsproxy.log"))
    try:
        with pytest.raises(SimGuestError), SimGuest(sock, ring_size=512, timeout=5) as refused:
            refused.connect(1234)  # the first thing that needs an answer from the backend
        wait_for(lambda: "front-end session ended" in vp.log(), what="the session to end")
        assert ("cid3: front-end session ended: protocol error: SET_VRING_NUM: vring 0 size 512 is above this "
                "device's queue-size 256 (raise it with --queue-size or queue-size=)") in vp.log()
        assert vp.proc.poll() is None  # the device serves the next front-end
        with SimGuest(sock, ring_size=256) as g:  # the limit itself is allowed
            assert g.guest_cid == 3
            assert g.ring_size == 256
        assert "Traceback" not in vp.log()
    finally:
        assert vp.stop() == 0


def test_default_queue_size_is_1024_as_vhost_device_vsock(workdir: str) -> None:
    sock = os.path.join(workdir, "v.sock")
    vp = VsproxyProcess(["--socket", sock], sock, os.path.join(workdir, "vsproxy.log"))
    try:
        with SimGuest(sock, ring_size=1024) as g:  # virtio-mmio's ring, as on QEMU's nitro-enclave machine
            assert g.guest_cid == 3
        # one front-end at a time: the next is refused until vsproxy has seen this one go
        wait_for(lambda: "front-end session ended: front-end disconnected" in vp.log(), what="the first session's end")
        with pytest.raises(SimGuestError), SimGuest(sock, ring_size=2048, timeout=5) as refused:
            refused.connect(1234)
        wait_for(lambda: "size 2048 is above this device's queue-size 1024" in vp.log(), what="the refusal")
    finally:
        assert vp.stop() == 0


def test_single_device_flags_without_a_backend_still_serve(workdir: str) -> None:
    """vhost-device-vsock needs uds-path or forward-cid; vsproxy also runs a device with neither
    (siblings, services, TCP forwards): a deliberate difference, shown by --check."""
    sock = os.path.join(workdir, "v.sock")
    p = run_cli("--check", "--socket", sock)
    assert p.returncode == 0 and "none: the guest's connections to the host get RST" in p.stdout
    vp = VsproxyProcess(["--socket", sock], sock, os.path.join(workdir, "vsproxy.log"))
    try:
        with SimGuest(sock) as g, pytest.raises(ConnectionResetError):
            g.connect(9000)
    finally:
        assert vp.stop() == 0


# -- the README's "Coming from vhost-device-vsock" commands ------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_blocks() -> list[tuple[str, str]]:
    """(language, text) of each fenced block in the README's drop-in section, in order."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text[text.index("## Coming from vhost-device-vsock"):]
    section = section[:section.index("\n## ", 1)]
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w+)\n(.*?)\n```", section, re.S)]


def test_readme_dropin_check_commands_print_what_the_readme_shows() -> None:
    blocks = readme_blocks()
    pairs = [(cmd, out) for (lang, cmd), (nlang, out) in itertools.pairwise(blocks) if lang == "sh" and nlang == "text"]
    assert len(pairs) == 2
    for cmd, shown in pairs:
        argv = shlex.split(cmd.replace("\\\n", " "))
        assert argv[:2] == ["vsproxy", "--check"]  # only --check runs verbatim: it opens nothing
        p = run_cli(*argv[1:])
        assert (p.stdout + p.stderr).rstrip("\n") == shown
        assert p.returncode == (2 if "error:" in shown else 0)


def test_readme_dropin_swap_command_starts_and_carries_bytes(workdir: str) -> None:
    runs = [cmd for (lang, cmd), (nlang, _) in itertools.pairwise([*readme_blocks(), ("", "")])
            if lang == "sh" and nlang != "text"]
    assert len(runs) == 1
    argv = shlex.split(runs[0])
    ex = next(e for e in EXAMPLES if e.name == "readme-uds-backend")
    assert argv == ["vsproxy", *ex.argv]  # vhost-device-vsock's README line with the binary name swapped
    start_and_exchange(workdir, ex)


def test_readme_tx_buffer_benchmark_command_runs() -> None:
    """The README's tx-buffer-size figures come from this command (here with --quick)."""
    p = subprocess.run([os.path.join(ROOT, ".venv", "bin", "python"), "benchmarks/bench_throughput.py", "--quick",
                        "--only", "g2h:65536", "--vsproxy-arg=--tx-buffer-size=65536"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [line.split() for line in p.stdout.splitlines() if line.startswith("guest->host")]
    assert rows and all(r[1] == "65536" and r[6] == "MB/s" for r in rows), p.stdout
