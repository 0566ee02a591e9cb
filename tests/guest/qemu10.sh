#!/bin/bash
# Fetch QEMU 10 from Debian bookworm-backports without replacing the system QEMU.
#
#   tests/guest/qemu10.sh [CACHE_DIR]
#   default CACHE_DIR: ${VSPROXY_CACHE:-$HOME/.cache/vsproxy}
#
# Downloads qemu-system-x86, qemu-system-common and qemu-system-data from
# bookworm-backports (adding that suite to /etc/apt/sources.list.d, on the
# Debian mirror already configured for bookworm, if it is missing), unpacks them
# with dpkg-deb -x into CACHE_DIR/qemu10 and prints the path of
# qemu-system-x86_64.  Run it with `-L CACHE_DIR/qemu10/usr/share/qemu`.
# Cached: does nothing when the unpacked binary already reports version 10.x.
set -euo pipefail

CACHE="${1:-${VSPROXY_CACHE:-$HOME/.cache/vsproxy}}"
mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd)"
DEST="$CACHE/qemu10"
BIN="$DEST/usr/bin/qemu-system-x86_64"
PKGS=(qemu-system-x86 qemu-system-common qemu-system-data)
SUITE=bookworm-backports
export DEBIAN_FRONTEND=noninteractive

log() { echo "qemu10.sh: $*" >&2; }

is_qemu10() {
	[ -x "$BIN" ] && "$BIN" -L "$DEST/usr/share/qemu" --version 2>/dev/null |
		head -n1 | grep -q 'QEMU emulator version 10\.'
}

exec 9>"$CACHE/.qemu10.lock"
flock 9

if is_qemu10; then
	echo "$BIN"
	exit 0
fi

# ---- make sure apt knows bookworm-backports -------------------------------
apt_files() {
	ls /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null || true
}

suite_configured() {
	local f
	for f in $(apt_files); do
		case "$f" in
		*.sources) awk -v s="$SUITE" 'tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == s) found = 1 }
			END { exit !found }' "$f" && return 0 ;;
		*) grep -Eq "^[[:space:]]*deb[[:space:]].*[[:space:]]$SUITE([[:space:]]|$)" "$f" && return 0 ;;
		esac
	done
	return 1
}

# Print "URI KEYRING" of the first configured source for plain bookworm.
bookworm_mirror() {
	local f
	for f in $(apt_files); do
		case "$f" in
		*.sources)
			# deb822 stanzas are separated by blank lines.
			awk 'function flush() {
					if (uri != "" && isbw) { print uri, (key == "" ? "-" : key); found = 1; exit }
					uri = ""; key = ""; isbw = 0
				}
				/^[[:space:]]*$/ { flush(); next }
				tolower($1) == "uris:" { uri = $2 }
				tolower($1) == "signed-by:" { key = $2 }
				tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == "bookworm") isbw = 1 }
				END { if (!found) flush() }' "$f"
			;;
		*)
			awk '$1 == "deb" {
					i = 2
					key = "-"
					if ($2 ~ /^\[/) {
						while (i <= NF && $i !~ /\]$/) { if ($i ~ /signed-by=/) { key = $i; sub(/.*signed-by=/, "", key); sub(/\]$/, "", key) } i++ }
						if ($i ~ /signed-by=/) { key = $i; sub(/.*signed-by=/, "", key); sub(/\]$/, "", key) }
						i++
					}
					if ($(i + 1) == "bookworm") { print $i, key; exit }
				}' "$f"
			;;
		esac
	done | head -n1
}

if ! suite_configured; then
	read -r uri key < <(bookworm_mirror) || true
	if [ -z "${uri:-}" ]; then
		log "no Debian bookworm source configured in /etc/apt; cannot add $SUITE"
		exit 1
	fi
	src=/etc/apt/sources.list.d/vsproxy-bookworm-backports.sources
	log "adding $SUITE from $uri to $src"
	{
		echo "Types: deb"
		echo "URIs: $uri"
		echo "Suites: $SUITE"
		echo "Components: main"
		[ "$key" != "-" ] && echo "Signed-By: $key"
	} >"$src"
	apt-get update -q >&2
elif ! apt-cache policy qemu-system-x86 2>/dev/null | grep -q "$SUITE"; then
	apt-get update -q >&2
fi

# ---- download and unpack ------------------------------------------------------
tmp="$(mktemp -d "$CACHE/.qemu10.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
args=()
for p in "${PKGS[@]}"; do args+=("$p/$SUITE"); done
log "downloading ${args[*]}"
(cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "${args[@]}" >&2)
rm -rf "$DEST.new"
mkdir -p "$DEST.new"
for deb in "$tmp"/*.deb; do
	log "unpacking $(basename "$deb")"
	dpkg-deb -x "$deb" "$DEST.new"
done
rm -rf "$DEST"
mv "$DEST.new" "$DEST"

if ! is_qemu10; then
	log "$BIN does not report QEMU 10.x:"
	"$BIN" -L "$DEST/usr/share/qemu" --version >&2 || true
	exit 1
fi
"$BIN" -L "$DEST/usr/share/qemu" --version | head -n1 >&2
echo "$BIN"
