#!/usr/bin/env bash
# Installs everything the tests need (Debian packages, the QEMU 10 build from
# bookworm-backports, a QEMU 10 with the nitro-enclave machine built from Debian's source,
# the guest image, a virtual environment), then runs ruff,
# mypy --strict and every test, the real-QEMU end-to-end tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
need=(qemu-system-x86 busybox-static gcc python3-venv python3-dev xz-utils cpio tshark tmux)
missing=()
for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
    # tshark's package asks whether non-root users may capture: answer no, without a prompt
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
# The C extensions must build here: a failed build fails the install instead of falling back to Python.
VSPROXY_REQUIRE_C=1 .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
bash tests/guest/build.sh
bash tests/guest/qemu10.sh >/dev/null
# QEMU 10 with the nitro-enclave machine (Debian's lacks it): built once, cached (about 7 min)
bash tests/guest/qemu-nitro.sh >/dev/null
# a guest whose kernel has the NSM driver (bookworm-backports' 6.12), to read QEMU's PCRs: cached
bash tests/guest/build-nsm.sh >/dev/null
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/mypy tests/e2e/*.py
.venv/bin/pytest "$@"
# Branch coverage of the code that reads guest and front-end input, from its own tests only: the
# per-module table, failing below 95%; then the C paths' figures under gcov (printed).
.venv/bin/python tests/input_coverage.py --fail-under 95 --c
# Every test again on the pure-Python paths (the reference the C is tested against), the real
# guests included; the C paths' own tests are skipped there, and only there (tests/conftest.py).
VSPROXY_NO_C=1 .venv/bin/pytest -q "$@"
# Two minutes of mixed traffic through one vsproxy (C paths on), checked as it goes.
.venv/bin/python benchmarks/soak.py --seconds 120
