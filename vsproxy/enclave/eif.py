"""Enclave Image Files (EIF): build, read, check and measure them, sans-I/O (bytes in, bytes out).

The layout is aws-nitro-enclaves-image-format's, as QEMU's ``hw/core/eif.c`` reads it (all
big-endian): a 548-byte header (magic ``.eif``, version u16 >= 4, flags u16 = 0, default_mem
u64, default_cpus u64, reserved u16, section_cnt u16 <= 32, section_offsets[32] u64,
section_sizes[32] u64, unused u32, crc32 u32), then the sections, each a 12-byte header (type
u16, flags u16 = 0, size u64) and its data. The CRC32 (zlib's) runs over the header without its
last 4 bytes, then over every section header and its data in table order.

The measurements are those the nitro-enclave machine extends into the NSM's PCRs at reset and
nitro-cli's ``describe-eif`` prints: three SHA-384 digests, each extended from zero
(``PCR = SHA384(48 zero bytes || digest)``):

- PCR0, the image: kernel, command line and every ramdisk, in section order;
- PCR1, the bootstrap: kernel, command line and the first ramdisk;
- PCR2, the application: every ramdisk after the first.

Signature and metadata sections take part in the CRC only.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

MAGIC = b".eif"
VERSION = 4
MAX_SECTIONS = 32
HEADER = struct.Struct(">4sHHQQHH32Q32QII")
SECTION_HEADER = struct.Struct(">HHQ")
assert HEADER.size == 548 and SECTION_HEADER.size == 12
SHA384_LEN = 48


class SectionType(IntEnum):
    INVALID = 0
    KERNEL = 1
    CMDLINE = 2
    RAMDISK = 3
    SIGNATURE = 4
    METADATA = 5


class EifError(ValueError):
    """A damaged or unusable EIF; the message is one line for the user."""


@dataclass(frozen=True, slots=True)
class Section:
    type: int  # SectionType, or an unknown type number as found
    offset: int  # of its 12-byte header in the file
    data: bytes

    @property
    def name(self) -> str:
        try:
            return SectionType(self.type).name.lower()
        except ValueError:
            return f"unknown({self.type})"


@dataclass(frozen=True, slots=True)
class Measurements:
    pcr0: bytes  # SHA-384 values of the PCRs after the machine's reset
    pcr1: bytes
    pcr2: bytes
    image_hash: bytes  # the digests extended into them
    bootstrap_hash: bytes
    app_hash: bytes


@dataclass(frozen=True, slots=True)
class Eif:
    version: int
    flags: int
    default_mem: int
    default_cpus: int
    crc32: int
    sections: tuple[Section, ...]

    def of_type(self, t: SectionType) -> list[Section]:
        return [s for s in self.sections if s.type == t]

    @property
    def kernel(self) -> bytes:
        return self.of_type(SectionType.KERNEL)[0].data

    @property
    def cmdline(self) -> str:
        return self.of_type(SectionType.CMDLINE)[0].data.decode(errors="replace")

    @property
    def ramdisks(self) -> list[bytes]:
        return [s.data for s in self.of_type(SectionType.RAMDISK)]

    def measurements(self) -> Measurements:
        image, bootstrap, app = hashlib.sha384(), hashlib.sha384(), hashlib.sha384()
        first_ramdisk = True
        for s in self.sections:
            if s.type in (SectionType.KERNEL, SectionType.CMDLINE):
                image.update(s.data)
                bootstrap.update(s.data)
            elif s.type == SectionType.RAMDISK:
                image.update(s.data)
                (bootstrap if first_ramdisk else app).update(s.data)
                first_ramdisk = False
        digests = image.digest(), bootstrap.digest(), app.digest()
        pcr0, pcr1, pcr2 = (extend_pcr(bytes(SHA384_LEN), d) for d in digests)
        return Measurements(pcr0, pcr1, pcr2, *digests)


def extend_pcr(pcr: bytes, data: bytes) -> bytes:
    """The NSM's PCR extension: SHA384(pcr || data)."""
    return hashlib.sha384(pcr + data).digest()


def build(kernel: bytes, cmdline: str, ramdisks: Sequence[bytes], *, default_mem: int = 0, default_cpus: int = 0,
          metadata: bytes | None = None) -> bytes:
    """An EIF of a kernel, its command line (no trailing NUL) and one or more ramdisks, in that
    order (the first ramdisk is the bootstrap one: PCR1), and an optional metadata section."""
    if not kernel:
        raise EifError("the kernel is empty")
    if not ramdisks:
        raise EifError("an EIF needs at least one ramdisk")
    parts: list[tuple[int, bytes]] = [(SectionType.KERNEL, kernel), (SectionType.CMDLINE, cmdline.encode())]
    parts += [(SectionType.RAMDISK, r) for r in ramdisks]
    if metadata is not None:
        parts.append((SectionType.METADATA, metadata))
    if len(parts) > MAX_SECTIONS:
        raise EifError(f"{len(parts)} sections: an EIF holds at most {MAX_SECTIONS}")
    offsets, sizes, body = [], [], bytearray()
    off = HEADER.size
    for t, data in parts:
        offsets.append(off)
        sizes.append(len(data))
        body += SECTION_HEADER.pack(t, 0, len(data)) + data
        off += SECTION_HEADER.size + len(data)
    pad = MAX_SECTIONS - len(parts)
    head = HEADER.pack(MAGIC, VERSION, 0, default_mem, default_cpus, 0, len(parts), *offsets, *([0] * pad),
                       *sizes, *([0] * pad), 0, 0)
    crc = zlib.crc32(body, zlib.crc32(head[:-4]))
    return head[:-4] + struct.pack(">I", crc) + bytes(body)


def parse(data: bytes) -> Eif:
    """An EIF taken apart and checked as QEMU checks it before booting one; EifError otherwise."""
    if len(data) < HEADER.size:
        if data[:4] != MAGIC[: len(data[:4])]:
            raise EifError("not an EIF: wrong magic")
        raise EifError(f"truncated: {len(data)} bytes, shorter than the {HEADER.size}-byte EIF header")
    fields = HEADER.unpack_from(data)
    magic, version, flags, default_mem, default_cpus, _reserved, count = fields[:7]
    offsets, sizes = fields[7:39], fields[39:71]
    crc_stored = fields[72]
    if magic != MAGIC:
        raise EifError(f"not an EIF: magic {magic!r}, expected {MAGIC!r}")
    if version < 4:
        raise EifError(f"EIF version {version}: version 4 or later is needed")
    if flags != 0:
        raise EifError(f"EIF header flags {flags:#x}: expected 0")
    if count > MAX_SECTIONS:
        raise EifError(f"{count} sections: an EIF holds at most {MAX_SECTIONS}")
    crc = zlib.crc32(data[: HEADER.size - 4])
    sections: list[Section] = []
    seen: set[int] = set()
    for i in range(count):
        off, size = offsets[i], sizes[i]
        if off + SECTION_HEADER.size > len(data):
            raise EifError(f"truncated: section {i} starts at byte {off}, past the end ({len(data)} bytes)")
        stype, sflags, ssize = SECTION_HEADER.unpack_from(data, off)
        if sflags != 0:
            raise EifError(f"section {i}: flags {sflags:#x}, expected 0")
        if ssize != size:
            raise EifError(f"section {i}: size {ssize} in its header, {size} in the EIF header")
        end = off + SECTION_HEADER.size + ssize
        if end > len(data):
            raise EifError(f"truncated: section {i} ({ssize} bytes at byte {off}) runs past the end "
                           f"({len(data)} bytes)")
        if stype in (SectionType.KERNEL, SectionType.CMDLINE) and stype in seen:
            raise EifError(f"more than one {SectionType(stype).name.lower()} section")
        seen.add(stype)
        crc = zlib.crc32(data[off:end], crc)
        sections.append(Section(stype, off, bytes(data[off + SECTION_HEADER.size : end])))
    for need in (SectionType.KERNEL, SectionType.CMDLINE, SectionType.RAMDISK):
        if need not in seen:
            raise EifError(f"no {need.name.lower()} section")
    if crc != crc_stored:
        raise EifError(f"bad CRC: the header says {crc_stored:#010x}, the contents give {crc:#010x}")
    return Eif(version, flags, default_mem, default_cpus, crc_stored, tuple(sections))


def describe(eif: Eif) -> list[str]:
    """What ``vsproxy eif describe`` prints: one line per fact, nitro-cli's names for the PCRs."""
    m = eif.measurements()
    lines = [f"EIF version {eif.version}, {len(eif.sections)} sections, CRC32 {eif.crc32:#010x}"]
    if eif.default_mem or eif.default_cpus:
        lines.append(f"default memory {eif.default_mem >> 20} MiB, default CPUs {eif.default_cpus}")
    for i, s in enumerate(eif.sections):
        lines.append(f"section {i}: {s.name:<9} {len(s.data):>12,} bytes at offset {s.offset}")
    lines.append(f"cmdline: {eif.cmdline}")
    lines += [f"PCR0: {m.pcr0.hex()}", f"PCR1: {m.pcr1.hex()}", f"PCR2: {m.pcr2.hex()}"]
    return lines
