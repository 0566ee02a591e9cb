"""Several enclaves on one vsproxy, from one file: vhost-device-vsock's YAML (a ``vms:`` list,
vsproxy's keys) where an entry that names an EIF is an enclave vsproxy starts on QEMU's
nitro-enclave machine. Its own keys (either spelling): ``eif-path``, ``memory`` (MiB),
``cpu-count``, ``console-log``; an enclave without ``socket`` gets one in a private directory.
Every other key is vsproxy's (``guest-cid``, ``uds-path``, ``remap=3=CID``, ``forward``,
``allow-out``, ...), so each enclave has its own CID and its own parent: its own hybrid socket,
or its own ``remap`` of CID 3 (``--nitro``, which enclave run sets, remaps 3 to the host for a
device that does not remap it itself). Entries without ``eif-path`` are ordinary devices (a
parent VM that QEMU starts elsewhere, say)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

ENCLAVE_KEYS = ("eif-path", "memory", "cpu-count", "console-log")


class EnclaveConfigError(Exception):
    """One line for the user."""


@dataclass
class EnclaveSpec:
    name: str
    cid: int
    socket: str
    eif_path: str
    memory: int | None
    cpu_count: int | None
    console_log: str | None


def _positive(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EnclaveConfigError(f"{where}: expected a positive number, got {value!r}")
    return value


def split(data: object, path: str, sockdir: str) -> tuple[dict[str, Any], list[EnclaveSpec]]:
    """The file's contents for vsproxy (the enclave keys taken out, sockets filled in) and the
    enclaves to start. ``data``: the parsed YAML."""
    if not isinstance(data, dict) or set(data) - {"vms"} or not isinstance(data.get("vms"), list):
        raise EnclaveConfigError(f"{path}: expected a 'vms:' list (vhost-device-vsock's format)")
    vms: list[dict[str, Any]] = []
    enclaves: list[EnclaveSpec] = []
    for i, raw in enumerate(data["vms"]):
        where = f"{path} vms[{i}]"
        if not isinstance(raw, dict):
            raise EnclaveConfigError(f"{where}: must be a mapping")
        vm = {str(k).replace("_", "-"): v for k, v in raw.items()}
        own = {k: vm.pop(k) for k in ENCLAVE_KEYS if k in vm}
        if own and "eif-path" not in own:
            raise EnclaveConfigError(f"{where}: {', '.join(own)} without eif-path")
        if "eif-path" in own:
            cid = vm.get("guest-cid")
            if isinstance(cid, bool) or not isinstance(cid, int) or not 4 <= cid < 0xFFFFFFFF:
                raise EnclaveConfigError(f"{where}: an enclave needs guest-cid 4..2^32-2 (3 is the parent), "
                                         f"got {cid!r}")
            name = str(vm.get("name") or f"enclave{cid}")
            vm.setdefault("name", name)
            vm.setdefault("socket", os.path.join(sockdir, f"{name}.sock"))
            enclaves.append(EnclaveSpec(
                name, cid, str(vm["socket"]), str(own["eif-path"]),
                _positive(own["memory"], f"{where} memory") if "memory" in own else None,
                _positive(own["cpu-count"], f"{where} cpu-count") if "cpu-count" in own else None,
                str(own["console-log"]) if "console-log" in own else None))
        vms.append(vm)
    if not enclaves:
        raise EnclaveConfigError(f"{path}: no entry names an eif-path: nothing to start")
    return {"vms": vms}, enclaves
