#!/bin/bash
# Build QEMU 10 with the nitro-enclave machine, for the enclave end-to-end tests.
#
#   tests/guest/qemu-nitro.sh [CACHE_DIR]
#   default CACHE_DIR: ${VSPROXY_CACHE:-$HOME/.cache/vsproxy}
#
# Debian's packaged QEMU 10 (bookworm-backports) lacks the nitro-enclave machine: it is built
# without libcbor, which the machine's Kconfig needs (with gnutls). This builds the same QEMU
# (Debian's orig tarball of 10.0.2 from bookworm-backports' deb-src) for x86_64 only, with
# libcbor, gnutls and vhost-user, into CACHE_DIR/qemu-nitro, and prints the path of its
# qemu-system-x86_64 (with the firmware it needs beside it: the +ds tarball has none, so it
# comes from Debian's packages). Debian's +ds tarball leaves out the meson wheel QEMU's configure wants,
# so meson comes from PyPI into a venv of its own. Cached: does nothing when the built binary
# already lists the machine. About 7 minutes on a 2-core machine, the first time.
set -euo pipefail

CACHE="${1:-${VSPROXY_CACHE:-$HOME/.cache/vsproxy}}"
mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd)"
DEST="$CACHE/qemu-nitro"
BIN="$DEST/bin/qemu-system-x86_64"
VERSION=10.0.2
SUITE=bookworm-backports
DEPS=(seabios dpkg-dev gcc pkg-config ninja-build python3-venv libglib2.0-dev libpixman-1-dev zlib1g-dev
	libcbor-dev libgnutls28-dev libfdt-dev xz-utils)
export DEBIAN_FRONTEND=noninteractive

log() { echo "qemu-nitro.sh: $*" >&2; }

has_machine() {
	[ -x "$BIN" ] && [ -f "$DEST/share/qemu/bios-microvm.bin" ] &&
		"$BIN" -machine help 2>/dev/null | grep -q '^nitro-enclave '
}

exec 9>"$CACHE/.qemu-nitro.lock"
flock 9

if has_machine; then
	echo "$BIN"
	exit 0
fi

missing=()
for p in "${DEPS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
	log "installing build dependencies: ${missing[*]}"
	apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

# ---- the source: Debian's orig tarball, from bookworm-backports' deb-src --------------------
src_list=/etc/apt/sources.list.d/vsproxy-bookworm-backports-src.sources
if [ ! -f "$src_list" ]; then
	log "adding deb-src for $SUITE to $src_list"
	{
		echo "Types: deb-src"
		echo "URIs: http://deb.debian.org/debian"
		echo "Suites: $SUITE"
		echo "Components: main"
		echo "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"
	} >"$src_list"
	apt-get update -q >&2
fi
SRC="$CACHE/qemu-nitro-src"
mkdir -p "$SRC"
tarball="$SRC/qemu_$VERSION+ds.orig.tar.xz"
if [ ! -s "$tarball" ]; then
	log "downloading qemu $VERSION source"
	# only the orig tarball is needed: a mirror may lag on the .dsc of a newer Debian revision
	(cd "$SRC" && apt-get source --download-only -q qemu/"$SUITE" >&2) || true
	[ -s "$tarball" ] || { log "could not download $tarball"; exit 1; }
fi
tree="$SRC/qemu-$VERSION"
if [ ! -f "$tree/configure" ]; then
	log "unpacking"
	rm -rf "$tree"
	tar -C "$SRC" -xf "$tarball"
	# the +ds tarball has none of the firmware blobs: build none (run it with -L at the
	# firmware of Debian's qemu-system-data, which tests/guest/qemu10.sh unpacks)
	sed -i 's/unpack_edk2_blobs = bzip2.found()/unpack_edk2_blobs = false/' "$tree/meson.build"
fi

# ---- meson and pycotap (the +ds tarball has no python/wheels) ----------------------------
venv="$SRC/venv"
if [ ! -x "$venv/bin/meson" ] || ! "$venv/bin/python3" -c "import pycotap" 2>/dev/null; then
	log "installing meson into $venv"
	[ -x "$venv/bin/python3" ] || python3 -m venv "$venv"
	"$venv/bin/pip" install -q --disable-pip-version-check 'meson>=1.5,<1.9' 'pycotap>=1.1' >&2
fi

# ---- configure, build, install ----------------------------------------------------------------
build="$tree/build-nitro"
rm -rf "$build" "$DEST"
mkdir -p "$build"
log "configuring (x86_64-softmmu with the nitro-enclave machine and what it selects, nothing else)"
# Only the machine and the devices its Kconfig selects (microvm, virtio-mmio,
# vhost-user-vsock, virtio-nsm): a fraction of a default build.
mkdir -p "$tree/configs/devices/x86_64-softmmu"
printf 'CONFIG_NITRO_ENCLAVE=y\nCONFIG_MICROVM=y\n' >"$tree/configs/devices/x86_64-softmmu/nitro.mak"
(cd "$build" && ../configure --prefix="$DEST" --python="$venv/bin/python3" --target-list=x86_64-softmmu \
	--without-default-features --without-default-devices --with-devices-x86_64=nitro \
	--enable-libcbor --enable-gnutls --enable-vhost-user --enable-fdt=system --enable-tcg \
	--disable-docs --disable-werror --disable-install-blobs --disable-download >&2)
log "building with $(nproc) jobs"
ninja -C "$build" -j "$(nproc)" >&2
ninja -C "$build" install >&2
# Firmware: the +ds tarball has none. The machine (microvm's) boots with bios-microvm.bin
# (Debian's seabios, which qemu-system-x86 depends on) and loads the kernel with QEMU 10's
# option ROMs, from Debian's qemu-system-data 10 (tests/guest/qemu10.sh unpacks it).
data="$(dirname "$(dirname "$(bash "$(dirname "$0")/qemu10.sh" "$CACHE")")")/share/qemu"
mkdir -p "$DEST/share/qemu"
cp -L "$data"/*.bin "$data"/qboot.rom "$DEST/share/qemu/"
cp -L /usr/share/seabios/bios-microvm.bin "$DEST/share/qemu/"
if ! has_machine; then
	log "built, but $BIN does not list the nitro-enclave machine"
	exit 1
fi
rm -rf "$build"
echo "$BIN"
