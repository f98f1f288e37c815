#!/usr/bin/env bash
# One command from a fresh Debian 12 machine (as root) to a working vmbuild: installs the
# host dependencies (QEMU 10 from bookworm-backports, ...), builds vmbuild, installs it to
# /usr/local/bin, builds the guest kit, and runs the main jobs on built-in defaults
# (vmbuild run; vmbuild bootstrap + vmbuild build). `vmbuild bench all` then reproduces
# BENCHMARKS.md's tables.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-host-deps.sh
echo "[install] building vmbuild and its benchmark engines (release)" >&2
cargo build --release --locked -p vmbuild -p vmbuild-benches
install -m 755 target/release/vmbuild /usr/local/bin/vmbuild
# `vmbuild bench` runs these from beside itself.
for engine in fs-bench switch-bench snapshot-bench vde-bench image-bench run-bench \
    lifecycle-bench ninep-bench kvm-bench nic-bench linux-kvm-bench; do
  install -m 755 "target/release/$engine" "/usr/local/bin/$engine"
done
# The dax suite runs its KVM guests in a nested KVM host (a TCG guest with SVM).
install -m 755 scripts/nested-kvm-host.sh /usr/local/bin/vmbuild-nested-kvm-host
# The peers `vmbuild bench` compares against: virtiofsd at the version BENCHMARKS.md
# measured (vde_switch, iperf3 and QEMU's 9p come with the host dependencies).
if ! command -v virtiofsd >/dev/null && [[ ! -x ${HOME:-/root}/.cargo/bin/virtiofsd ]]; then
  echo "[install] building virtiofsd 1.14.0, the file-sharing benchmark's peer" >&2
  cargo install --locked virtiofsd --version 1.14.0
fi
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
