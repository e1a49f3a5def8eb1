#!/usr/bin/env bash
# aarch64 under qemu user-mode (tests/test_aarch64.py): debootstrap builds the arm64 Debian root, and
# Debian trixie's qemu-user 10 (statically linked, so it runs on bookworm) is unpacked to /opt/qemu-user-10.
# Bookworm's own qemu 7.2 crashes in `import onnxruntime` (it passes the host's x86 /proc/cpuinfo through).
# The Debian mirror is the one this machine's apt uses (tests/apt_sources.py; $FEDMOE_DEBIAN_MIRROR overrides).
# Idempotent: does nothing once both are in place.
set -euo pipefail
QEMU_DIR=/opt/qemu-user-10
if ! command -v debootstrap >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi
if [ ! -x "$QEMU_DIR/usr/bin/qemu-aarch64" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    mkdir -p "$work/lists/partial"
    mirror=$(python3 "$(dirname "$0")/../../tests/apt_sources.py")
    echo "deb $mirror trixie main" >"$work/sources.list"
    apt_trixie=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=/dev/null" -o APT::Sandbox::User=root
                -o "Dir::State::Lists=$work/lists")
    apt-get "${apt_trixie[@]}" update -qq
    (cd "$work" && apt-get "${apt_trixie[@]}" download -qq qemu-user)
    mkdir -p "$QEMU_DIR"
    dpkg-deb -x "$work"/qemu-user_*.deb "$QEMU_DIR"
fi
"$QEMU_DIR/usr/bin/qemu-aarch64" --version | head -1
