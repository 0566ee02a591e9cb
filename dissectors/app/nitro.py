"""AWS Nitro Enclaves boot heartbeat: the enclave sends one byte 0xB7 to its parent (CID 3)
on port 9000 and the parent echoes it (aws-nitro-enclaves-cli, Linux
samples/nitro_enclaves/ne_ioctl_sample.c: NE_IMAGE_LOAD_HEARTBEAT_VALUE 0xb7)."""

from __future__ import annotations

from typing import ClassVar

from dissectors.app.base import AppDissector, Step, Undecodable

HEARTBEAT = 0xB7
HEARTBEAT_PORT = 9000


class NitroHeartbeat(AppDissector):
    name: ClassVar[str] = "nitro"
    label: ClassVar[str] = "Nitro"
    ports: ClassVar[frozenset[int]] = frozenset({HEARTBEAT_PORT})

    @classmethod
    def detect(cls, first: bytes) -> bool | None:
        # The whole stream is the one byte: anything longer is some other protocol.
        return first == bytes([HEARTBEAT])

    def parse(self, buf: bytearray, eom: bool) -> Step | None:
        if not buf:
            return None
        if buf[0] != HEARTBEAT:
            raise Undecodable(f"bad heartbeat byte {buf[0]:#04x}")
        return 1, self.message("Nitro heartbeat 0xB7", ("heartbeat", "0xb7"))
