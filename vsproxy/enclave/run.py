"""``vsproxy enclave run``: an EIF on QEMU's nitro-enclave machine, with vsproxy as its vsock
device, in one command; and ``vsproxy eif build|describe``.

vsproxy runs in this process with what an enclave needs (``--nitro``: the heartbeat answered on
3:9000, CID 3, the parent, remapped to the host for every other port) plus every vsproxy option
given after the enclave's own (``--forward``, ``--uds-path``, ``--service``, ``--pcap``,
``--control``, allowlists, ...); QEMU runs as a child on vsproxy's socket. When the enclave
powers off (QEMU exits) vsproxy stops; on Ctrl-C or SIGTERM both stop. The exit status is
QEMU's (0 when the enclave powered off), 2 for a usage or setup error.

The option names are nitro-cli's where they apply (``run-enclave --eif-path --enclave-cid
--memory --cpu-count --debug-mode``): ``--debug-mode`` puts the enclave's console on this
terminal, as ``nitro-cli console`` would show it; without it the console goes to
``--console-log FILE`` (or nowhere).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vsproxy.enclave import eif as E
from vsproxy.enclave.config import EnclaveConfigError, EnclaveSpec
from vsproxy.enclave.config import split as split_config

DEFAULT_CID = 16
DEFAULT_MEMORY = 512  # MiB, when neither --memory nor the EIF says
NITRO_QEMU_CACHE = Path(os.environ.get("VSPROXY_CACHE", str(Path.home() / ".cache" / "vsproxy"))) / "qemu-nitro"
HOW_TO_GET_QEMU = (
    "The machine needs QEMU 9.2 or later built "
    "with libcbor and gnutls; Debian's packaged QEMU 10 (bookworm-backports) is built without libcbor and "
    "lacks it. Build one with tests/guest/qemu-nitro.sh from vsproxy's source tree (Debian's QEMU 10.0.2 source, "
    "about 7 minutes on 2 cores; it lands in ~/.cache/vsproxy/qemu-nitro), or configure QEMU with "
    "--enable-libcbor --enable-gnutls --enable-vhost-user, then pass --qemu PATH")


class EnclaveError(Exception):
    """One line for the user; exit status 2."""


def has_nitro_machine(qemu: str) -> bool:
    try:
        out = subprocess.run([qemu, "-machine", "help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return any(line.split()[:1] == ["nitro-enclave"] for line in out.stdout.splitlines())


def find_qemu(explicit: str | None) -> str:
    """The QEMU to run: ``--qemu`` (which must have the machine), else the first of PATH's
    qemu-system-x86_64 and the one tests/guest/qemu-nitro.sh builds that has it."""
    if explicit is not None:
        path = shutil.which(explicit) or explicit
        if not os.access(path, os.X_OK):
            raise EnclaveError(f"--qemu {explicit}: not an executable")
        if not has_nitro_machine(path):
            raise EnclaveError(f"--qemu {explicit}: this QEMU has no nitro-enclave machine. "
                               + HOW_TO_GET_QEMU)
        return path
    tried = []
    for cand in (shutil.which("qemu-system-x86_64"), str(NITRO_QEMU_CACHE / "bin" / "qemu-system-x86_64")):
        if cand is None or not os.access(cand, os.X_OK):
            continue
        tried.append(cand)
        if has_nitro_machine(cand):
            return cand
    raise EnclaveError(f"no QEMU with the nitro-enclave machine found (tried {', '.join(tried) or 'none on PATH'}). "
                       + HOW_TO_GET_QEMU)


@dataclass
class EnclaveOptions:
    eif_path: str
    enclave_cid: int = DEFAULT_CID
    memory: int | None = None  # MiB
    cpu_count: int | None = None
    debug_mode: bool = False
    console_log: str | None = None
    acpi: bool = False
    accel: str = "tcg"
    name: str = "enclave"


def qemu_argv(qemu: str, opts: EnclaveOptions, image: E.Eif, socket_path: str) -> list[str]:
    """The nitro-enclave machine on vsproxy's socket, booting the EIF."""
    memory = opts.memory or (image.default_mem >> 20) or DEFAULT_MEMORY
    cpus = opts.cpu_count or image.default_cpus or 1
    machine = f"nitro-enclave,vsock=c0,id={opts.name}"
    if opts.acpi:
        machine += ",acpi=on"  # guest kernels without CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES find the devices in ACPI
    if opts.debug_mode:
        serial = "stdio"
    elif opts.console_log:
        serial = f"file:{opts.console_log}"
    else:
        serial = "null"
    return [qemu, "-accel", opts.accel, "-M", machine, "-m", f"{memory}M", "-smp", str(cpus), "-nodefaults",
            "-no-reboot", "-display", "none", "-serial", serial, "-chardev", f"socket,id=c0,path={socket_path}",
            "-kernel", opts.eif_path]


def _cid(text: str) -> int:
    if not text.isdigit() or not 4 <= int(text) < 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"{text!r}: an enclave CID is 4..2^32-2 (3 is the parent, never the enclave)")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return int(text)


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vsproxy enclave run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every other option is vsproxy's (vsproxy --help): --forward PORT=tcp:HOST:HPORT, --uds-path, "
               "--service, --allow-out, --pcap, --control, -v, ...")
    p.add_argument("--eif-path", metavar="FILE", help="the enclave image")
    p.add_argument("--config", metavar="FILE.yaml",
                   help="several enclaves (and other devices) from one file, instead of --eif-path: a 'vms:' list "
                        "whose entries with eif-path (and memory, cpu-count, console-log) are enclaves")
    p.add_argument("--enclave-cid", type=_cid, default=DEFAULT_CID, metavar="CID",
                   help=f"the enclave's CID (default {DEFAULT_CID}; never 3, the parent)")
    p.add_argument("--memory", type=_positive, metavar="MiB", help="guest memory (default: the EIF's, else 512)")
    p.add_argument("--cpu-count", type=_positive, metavar="N", help="vCPUs (default: the EIF's, else 1)")
    p.add_argument("--debug-mode", action="store_true", help="the enclave's console on this terminal")
    p.add_argument("--console-log", metavar="FILE", help="without --debug-mode: the console into FILE")
    p.add_argument("--enclave-name", default="enclave", metavar="NAME", help="the machine's id and the device's name")
    p.add_argument("--qemu", metavar="PATH", help="a qemu-system-x86_64 with the nitro-enclave machine")
    p.add_argument("--accel", default="tcg", help="QEMU accelerator (default tcg)")
    p.add_argument("--acpi", action="store_true",
                   help="-M nitro-enclave,acpi=on: for guest kernels that cannot take virtio-mmio devices from the "
                        "command line (Debian's; AWS's enclave kernels can)")
    p.add_argument("--socket", metavar="PATH", help="vsproxy's vhost-user socket (default: in a private temp dir)")
    return p


def run_main(argv: list[str]) -> int:
    from vsproxy import cli  # the vsproxy options, parsed as vsproxy parses them

    ap = run_parser()
    try:
        args, rest = ap.parse_known_args(argv)
    except SystemExit as e:
        return 0 if e.code in (0, None) else 2
    if (args.eif_path is None) == (args.config is None):
        print("vsproxy enclave run: error: give --eif-path (one enclave) or --config (several)", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="vsproxy-enclave-")
    try:
        try:
            if args.config is not None:
                vs_args, specs = _from_config(args.config, tmp)
            else:
                sock = args.socket or os.path.join(tmp, "vhost.sock")
                specs = [EnclaveSpec(args.enclave_name, args.enclave_cid, sock, args.eif_path, args.memory,
                                     args.cpu_count, args.console_log)]
                vs_args = ["--socket", sock, "--guest-cid", str(args.enclave_cid)]
            runs = []
            for spec in specs:
                image = _read_eif(spec.eif_path)
                opts = EnclaveOptions(spec.eif_path, spec.cid, spec.memory, spec.cpu_count, args.debug_mode,
                                      spec.console_log, args.acpi, args.accel, spec.name)
                runs.append((opts, image, spec.socket))
            qemu = find_qemu(args.qemu)
        except (EnclaveError, EnclaveConfigError) as e:
            print(f"vsproxy enclave: {e}", file=sys.stderr)
            return 2
        argvs = [qemu_argv(qemu, opts, image, sock) for opts, image, sock in runs]
        return cli.serve([*vs_args, "--nitro", *rest],
                         lambda: [_start_qemu(a, args.debug_mode, len(argvs) == 1) for a in argvs],
                         prog="vsproxy enclave")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_eif(path: str) -> E.Eif:
    try:
        return E.parse(Path(path).read_bytes())
    except OSError as e:
        raise EnclaveError(f"{path}: {e.strerror or e}") from None
    except E.EifError as e:
        raise EnclaveError(f"{path}: {e}") from None


def _from_config(path: str, tmp: str) -> tuple[list[str], list[EnclaveSpec]]:
    """vsproxy's options for the file (a copy without the enclave keys) and its enclaves."""
    import yaml

    if not path.endswith((".yaml", ".yml")):
        raise EnclaveConfigError(f"{path}: an enclave configuration is YAML (a 'vms:' list), named .yaml or .yml")
    try:
        with open(path, "rb") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise EnclaveConfigError(f"{path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise EnclaveConfigError(f"{path}: {str(e).splitlines()[0]}") from None
    vsproxy_part, specs = split_config(data, path, tmp)
    copy = os.path.join(tmp, "vsproxy.yaml")
    with open(copy, "w") as f:
        yaml.safe_dump(vsproxy_part, f)
    return ["--config", copy], specs


def _start_qemu(argv: list[str], debug: bool, only: bool) -> subprocess.Popen[bytes]:
    """QEMU as a child. In debug mode its console is this terminal, the keyboard too when it is
    the only enclave (then a Ctrl-C reaches both, and both stop); otherwise it runs in its own
    session, and vsproxy stops it when the Ctrl-C stops vsproxy."""
    interactive = debug and only
    return subprocess.Popen(argv, stdin=None if interactive else subprocess.DEVNULL, start_new_session=not interactive)


# -- vsproxy eif build | describe ---------------------------------------------------------------
def eif_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="vsproxy eif", description="Build or describe an Enclave Image File (EIF).")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write an EIF from a kernel, its command line and ramdisks")
    b.add_argument("--kernel", required=True, metavar="FILE")
    b.add_argument("--ramdisk", required=True, action="append", metavar="FILE",
                   help="repeatable: the first is the bootstrap ramdisk (PCR1), the rest the application's (PCR2)")
    b.add_argument("--cmdline", required=True, metavar="TEXT")
    b.add_argument("--memory", type=_positive, default=0, metavar="MiB", help="the EIF's default memory")
    b.add_argument("--cpu-count", type=_positive, default=0, metavar="N", help="the EIF's default vCPUs")
    b.add_argument("-o", "--output", required=True, metavar="OUT.eif")
    d = sub.add_parser("describe", help="sections, sizes, command line and the PCR0-2 measurements")
    d.add_argument("file", metavar="FILE")
    d.add_argument("--json", action="store_true", help="as JSON (nitro-cli describe-eif's Measurements names)")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return 0 if e.code in (0, None) else 2
    try:
        if args.command == "build":
            kernel = Path(args.kernel).read_bytes()
            ramdisks = [Path(r).read_bytes() for r in args.ramdisk]
            data = E.build(kernel, args.cmdline, ramdisks, default_mem=args.memory << 20,
                           default_cpus=args.cpu_count)
            Path(args.output).write_bytes(data)
            image = E.parse(data)
            print("\n".join(E.describe(image)))
            return 0
        image = E.parse(Path(args.file).read_bytes())
    except OSError as e:
        print(f"vsproxy eif: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 2
    except E.EifError as e:
        print(f"vsproxy eif: {getattr(args, 'file', None) or args.output}: {e}", file=sys.stderr)
        return 2
    if args.json:
        import json

        m = image.measurements()
        print(json.dumps({"Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": m.pcr0.hex(),
                                           "PCR1": m.pcr1.hex(), "PCR2": m.pcr2.hex()},
                          "Cmdline": image.cmdline,
                          "Sections": [{"Type": s.name, "Offset": s.offset, "Size": len(s.data)}
                                       for s in image.sections]}, indent=2))
    else:
        print("\n".join(E.describe(image)))
    return 0
