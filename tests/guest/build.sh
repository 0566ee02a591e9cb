#!/bin/bash
# Build the vsproxy test guest: CACHE_DIR/{vmlinuz,initramfs.cpio.gz}.
#
#   tests/guest/build.sh [CACHE_DIR]
#   default CACHE_DIR: ${VSPROXY_CACHE:-$HOME/.cache/vsproxy}/guest
#
# Everything comes from Debian 12 packages: the kernel and its virtio/vsock
# modules from the ABI package that linux-image-cloud-amd64 depends on,
# busybox-static for /init and the shell tools, and `gcc -static` builds of
# vsock_tool.c, vsockmon_cap.c and nsm_tool.c.  Idempotent: each step is skipped when its outputs are newer
# than its inputs.  Needs root for apt-get (only when something is missing).
#
# Also writes CACHE_DIR/kernel-version (kernel release), CACHE_DIR/kernel-package
# (package and version), CACHE_DIR/vsock_tool, CACHE_DIR/vsockmon_cap and CACHE_DIR/nsm_tool.
#
# Another kernel (tests/guest/build-nsm.sh sets these, for a guest with the NSM driver):
#   VSPROXY_GUEST_KERNEL=META[/SUITE]   the kernel meta package (default linux-image-cloud-amd64),
#                                       e.g. linux-image-cloud-amd64/bookworm-backports
#   VSPROXY_GUEST_MODULES="m1 m2"       more modules for /init to load, after the virtio/vsock ones
#   VSPROXY_GUEST_REQUIRE="CONFIG_A .." options the kernel's /boot/config must have (=y or =m):
#                                       the build fails, naming the first one missing
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${1:-${VSPROXY_CACHE:-$HOME/.cache/vsproxy}/guest}"
mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd)"
export DEBIAN_FRONTEND=noninteractive

# Modules in insmod order.
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
	virtio_mmio vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport)
KMETA="${VSPROXY_GUEST_KERNEL:-linux-image-cloud-amd64}"
# shellcheck disable=SC2206 # word splitting is the point: a list of names
MODULES+=(${VSPROXY_GUEST_MODULES:-})
# shellcheck disable=SC2206
REQUIRE=(${VSPROXY_GUEST_REQUIRE:-})
# Shipped in the initramfs but not loaded by /init: a script can
# `insmod /lib/modules/vsock_loopback.ko` to test vsock_tool over CID 1, and
# `insmod /lib/modules/vsockmon.ko` (needs only vsock) for
# `ip link add name vsockmon0 type vsockmon` and vsockmon_cap.
# The list is part of the kernel stamp (KDIR/.done): changing it re-extracts the
# modules and so rebuilds the initramfs once.
EXTRA_MODULES=(vsock_loopback vsockmon)

log() { echo "build.sh: $*" >&2; }

# One build at a time per cache directory.
exec 9>"$CACHE/.lock"
flock 9

APT_UPDATED=0
apt_update_once() {
	if [ "$APT_UPDATED" = 0 ]; then
		log "apt-get update"
		apt-get update -q >&2
		APT_UPDATED=1
	fi
}

apt_install() {
	log "apt-get install $*"
	if ! apt-get install -y -q --no-install-recommends "$@" >&2; then
		apt_update_once
		apt-get install -y -q --no-install-recommends "$@" >&2
	fi
}

# ---- 1. host tools -------------------------------------------------------
need=()
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' || need+=(busybox-static)
command -v gcc >/dev/null || need+=(gcc libc6-dev)
[ -e /usr/include/linux/vm_sockets.h ] || need+=(linux-libc-dev)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v xz >/dev/null || need+=(xz-utils)
if [ ${#need[@]} -gt 0 ]; then
	apt_install "${need[@]}"
fi
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || { log "no $BUSYBOX after installing busybox-static"; exit 1; }

# ---- 2. kernel package ---------------------------------------------------
resolve_kernel_pkg() {
	apt-cache depends "$KMETA" 2>/dev/null |
		awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}
KPKG="$(resolve_kernel_pkg || true)"
if [ -z "$KPKG" ]; then
	apt_update_once
	KPKG="$(resolve_kernel_pkg || true)"
fi
DEBDIR="$CACHE/debs"
mkdir -p "$DEBDIR"
KDEB=""
if [ -n "$KPKG" ]; then
	KVER_PKG="$(apt-cache policy "$KPKG" | awk '$1 == "Candidate:" { print $2 }')"
	# apt-get download names the file with the epoch's ':' as '%3a'.
	KDEB="$DEBDIR/${KPKG}_${KVER_PKG//:/%3a}_amd64.deb"
	if [ ! -s "$KDEB" ]; then
		log "downloading $KPKG $KVER_PKG"
		(cd "$DEBDIR" && apt-get download -q -o APT::Sandbox::User=root "$KPKG=$KVER_PKG" >&2)
		# Keep only the current kernel deb.
		for old in "$DEBDIR"/linux-image-*.deb; do
			[ "$old" = "$KDEB" ] || rm -f "$old"
		done
	fi
else
	# Offline and no package lists: fall back to a deb downloaded earlier.
	KDEB="$(ls -t "$DEBDIR"/linux-image-*-cloud-amd64_*.deb 2>/dev/null | head -n1 || true)"
	[ -n "$KDEB" ] || { log "cannot resolve $KMETA"; exit 1; }
	KPKG="$(basename "$KDEB" | cut -d_ -f1)"
	KVER_PKG="$(basename "$KDEB" | cut -d_ -f2)"
	log "using cached $KDEB"
fi
[ -s "$KDEB" ] || { log "kernel deb $KDEB missing after download"; exit 1; }

# ---- 3. vmlinuz and modules out of the deb -------------------------------
KDIR="$CACHE/kernel"
STAMP="$KPKG $KVER_PKG ${MODULES[*]} ${EXTRA_MODULES[*]}"
[ ${#REQUIRE[@]} -eq 0 ] || STAMP+=" ${REQUIRE[*]}"
if [ ! -e "$KDIR/.done" ] || [ "$KDEB" -nt "$KDIR/.done" ] || [ "$(cat "$KDIR/.done")" != "$STAMP" ]; then
	log "extracting $KDEB"
	tmp="$(mktemp -d "$CACHE/.extract.XXXXXX")"
	trap 'rm -rf "$tmp"' EXIT
	dpkg-deb -x "$KDEB" "$tmp/root"
	krel="$(ls "$tmp/root/lib/modules" | head -n1)"
	[ -n "$krel" ] || { log "no lib/modules in $KDEB"; exit 1; }
	for opt in "${REQUIRE[@]}"; do
		grep -Eq "^$opt=(y|m)\$" "$tmp/root/boot/config-$krel" ||
			{ log "$KPKG $KVER_PKG lacks $opt (its /boot/config-$krel: $(grep -E "^(# )?$opt[= ]" "$tmp/root/boot/config-$krel" || echo "no such option"))"; exit 1; }
	done
	rm -rf "$KDIR.new"
	mkdir -p "$KDIR.new/modules"
	cp "$tmp/root/boot/vmlinuz-$krel" "$KDIR.new/vmlinuz"
	cp "$tmp/root/lib/modules/$krel/modules.builtin" "$KDIR.new/modules/" 2>/dev/null || : >"$KDIR.new/modules/modules.builtin"
	for m in "${MODULES[@]}" "${EXTRA_MODULES[@]}"; do
		f="$(find "$tmp/root/lib/modules/$krel" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" | head -n1)"
		if [ -z "$f" ]; then
			if grep -q "/$m.ko" "$KDIR.new/modules/modules.builtin"; then
				log "module $m is built in"
				continue
			fi
			case " ${EXTRA_MODULES[*]} " in
			*" $m "*) log "optional module $m not found in $KDEB"; continue ;;
			esac
			log "module $m not found in $KDEB"
			exit 1
		fi
		case "$f" in
		*.ko.xz) xz -dc "$f" >"$KDIR.new/modules/$m.ko" ;;
		*.ko.zst) zstd -dc "$f" >"$KDIR.new/modules/$m.ko" ;;
		*.ko.gz) gzip -dc "$f" >"$KDIR.new/modules/$m.ko" ;;
		*) cp "$f" "$KDIR.new/modules/$m.ko" ;;
		esac
	done
	echo "$krel" >"$KDIR.new/release"
	echo "$STAMP" >"$KDIR.new/.done"
	rm -rf "$KDIR"
	mv "$KDIR.new" "$KDIR"
	rm -rf "$tmp"
	trap - EXIT
fi
KREL="$(cat "$KDIR/release")"

# ---- 4. guest programs ------------------------------------------------------
TOOL="$CACHE/vsock_tool"
CAP="$CACHE/vsockmon_cap"
NSMTOOL="$CACHE/nsm_tool"
for prog in "$TOOL" "$CAP" "$NSMTOOL"; do
	src="$HERE/$(basename "$prog").c"
	if [ ! -x "$prog" ] || [ "$src" -nt "$prog" ]; then
		log "compiling $(basename "$prog")"
		gcc -static -O2 -Wall -o "$prog.new" "$src"
		mv "$prog.new" "$prog"
	fi
done

# ---- 5. initramfs ---------------------------------------------------------
OUT="$CACHE/initramfs.cpio.gz"
stale=0
if [ ! -s "$OUT" ]; then
	stale=1
else
	for f in "$HERE/init" "$HERE/build.sh" "$TOOL" "$CAP" "$NSMTOOL" "$BUSYBOX" "$KDIR/.done"; do
		[ "$f" -nt "$OUT" ] && stale=1
	done
fi
if [ "$stale" = 1 ]; then
	log "building initramfs"
	stage="$(mktemp -d "$CACHE/.stage.XXXXXX")"
	trap 'rm -rf "$stage"' EXIT
	mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,root,lib/modules,vsproxy}
	cp "$BUSYBOX" "$stage/bin/busybox"
	for applet in $("$BUSYBOX" --list-full); do
		[ -e "$stage/$applet" ] || ln -s /bin/busybox "$stage/$applet"
	done
	cp "$TOOL" "$stage/bin/vsock_tool"
	cp "$CAP" "$stage/bin/vsockmon_cap"
	cp "$NSMTOOL" "$stage/bin/nsm_tool"
	cp "$HERE/init" "$stage/init"
	chmod 755 "$stage/init" "$stage/bin/vsock_tool" "$stage/bin/vsockmon_cap" "$stage/bin/nsm_tool"
	for m in "${MODULES[@]}"; do
		if [ -f "$KDIR/modules/$m.ko" ]; then
			cp "$KDIR/modules/$m.ko" "$stage/lib/modules/"
		fi
		echo "$m" >>"$stage/etc/vsproxy-modules"
	done
	for m in "${EXTRA_MODULES[@]}"; do
		[ -f "$KDIR/modules/$m.ko" ] && cp "$KDIR/modules/$m.ko" "$stage/lib/modules/"
	done
	cp "$KDIR/modules/modules.builtin" "$stage/lib/modules/"
	echo "$KREL" >"$stage/etc/vsproxy-kernel"
	# The kernel opens /dev/console for init before devtmpfs is mounted.
	mknod -m 600 "$stage/dev/console" c 5 1 2>/dev/null || true
	mknod -m 666 "$stage/dev/null" c 1 3 2>/dev/null || true
	(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort |
		"$BUSYBOX" cpio -o -H newc -R 0:0 2>/dev/null) | gzip -9n >"$OUT.new"
	mv "$OUT.new" "$OUT"
	rm -rf "$stage"
	trap - EXIT
fi

# vmlinuz and the stamps beside the initramfs.
if [ ! -e "$CACHE/vmlinuz" ] || [ "$KDIR/vmlinuz" -nt "$CACHE/vmlinuz" ] ||
	! cmp -s "$KDIR/vmlinuz" "$CACHE/vmlinuz"; then
	cp "$KDIR/vmlinuz" "$CACHE/vmlinuz.new"
	mv "$CACHE/vmlinuz.new" "$CACHE/vmlinuz"
fi
[ "$(cat "$CACHE/kernel-version" 2>/dev/null)" = "$KREL" ] || echo "$KREL" >"$CACHE/kernel-version"
[ "$(cat "$CACHE/kernel-package" 2>/dev/null)" = "$KPKG $KVER_PKG" ] || echo "$KPKG $KVER_PKG" >"$CACHE/kernel-package"

echo "$CACHE/vmlinuz"
echo "$CACHE/initramfs.cpio.gz"
