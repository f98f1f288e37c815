#!/usr/bin/env bash
# One command from a fresh Debian 12 machine (as root) to a working vmbuild: installs the
# host dependencies (QEMU 10 from bookworm-backports, ...), builds vmbuild, installs it to
# /usr/local/bin, builds the guest kit, and runs the main jobs on built-in defaults
# (vmbuild run; vmbuild bootstrap + vmbuild build).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-host-deps.sh
echo "[install] building vmbuild (release)" >&2
cargo build --release --locked -p vmbuild
install -m 755 target/release/vmbuild /usr/local/bin/vmbuild
kit=$(scripts/guest-kit.sh)
echo "[install] vmbuild installed to /usr/local/bin/vmbuild; guest kit in $kit" >&2

# The main jobs on built-in defaults: a command in a fresh Linux VM; then the snapshot
# lifecycle: install a linux target once and suspend it, revive it to run a command.
echo "[install] running: vmbuild run -- uname -a" >&2
/usr/local/bin/vmbuild run -- uname -a
snap=/var/lib/vmbuild/snapshots/linux
echo "[install] running: vmbuild bootstrap --out $snap --replace" >&2
/usr/local/bin/vmbuild bootstrap --out "$snap" --replace
echo "[install] running: vmbuild build --snapshot $snap -- uname -a" >&2
exec /usr/local/bin/vmbuild build --snapshot "$snap" --timings -- uname -a
