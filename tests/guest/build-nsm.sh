#!/bin/bash
# Build the test guest with a kernel that has the Nitro Secure Module driver:
# CACHE_DIR/{vmlinuz,initramfs.cpio.gz}, as tests/guest/build.sh builds the default guest.
#
#   tests/guest/build-nsm.sh [CACHE_DIR]
#   default CACHE_DIR: ${VSPROXY_CACHE:-$HOME/.cache/vsproxy}/nsm-guest
#
# Debian 12's own kernel (6.1) has no NSM driver (drivers/misc/nsm.c came in Linux 6.8), so a
# guest cannot read the PCRs QEMU's nitro-enclave machine computes. bookworm-backports' cloud
# kernel (6.12) has it as a module (CONFIG_NSM=m), and CONFIG_VIRTIO_MMIO=m for the machine's
# devices (without CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES: boot it with -M nitro-enclave,acpi=on,
# `vsproxy enclave run --acpi`). /init loads virtio_mmio, the vsock modules and nsm from the
# initramfs; /bin/nsm_tool reads /dev/nsm. The kernel deb (about 34 MB) is downloaded once.
# Fails, naming what is missing, when the suite or an option is not there: never falls back to
# a kernel without the driver.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="${VSPROXY_CACHE:-$HOME/.cache/vsproxy}"
CACHE="${1:-$ROOT/nsm-guest}"
# tests/guest/qemu10.sh adds bookworm-backports to apt's sources when it is missing (cached:
# nothing to do after its first run)
bash "$HERE/qemu10.sh" "$ROOT" >/dev/null
VSPROXY_GUEST_KERNEL=linux-image-cloud-amd64/bookworm-backports \
	VSPROXY_GUEST_MODULES=nsm \
	VSPROXY_GUEST_REQUIRE="CONFIG_NSM CONFIG_VIRTIO_MMIO CONFIG_VIRTIO_VSOCKETS CONFIG_ACPI" \
	exec bash "$HERE/build.sh" "$CACHE"
