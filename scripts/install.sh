#!/usr/bin/env bash
# One command from a fresh Debian 12 machine (as root) to a working vmbuild: installs the
# host dependencies (QEMU 10 from bookworm-backports, ...), builds vmbuild, installs it to
# /usr/local/bin, builds the guest kit, and runs the main job on built-in defaults.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-host-deps.sh
echo "[install] building vmbuild (release)" >&2
cargo build --release --locked -p vmm
install -m 755 target/release/vmbuild /usr/local/bin/vmbuild
kit=$(scripts/guest-kit.sh)
echo "[install] vmbuild installed to /usr/local/bin/vmbuild; guest kit in $kit" >&2

# The main job: a command in a fresh Linux VM, store and xchg shared, exit code back.
echo "[install] running: vmbuild run -- uname -a" >&2
exec /usr/local/bin/vmbuild run -- uname -a
