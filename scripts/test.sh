#!/usr/bin/env bash
# Runs every test of vmbuild on a Debian 12 host, as root: installs what the tests need
# (QEMU 10, busybox, ...), builds the guest kit once (cached), then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-host-deps.sh
kit=$(scripts/guest-kit.sh)
export VMBUILD_GUEST_KIT=$kit

log=$(mktemp)
VMBUILD_SKIP_LOG=$(mktemp)
export VMBUILD_SKIP_LOG
trap 'rm -f "$log" "$VMBUILD_SKIP_LOG"' EXIT
# Two test threads: the QEMU/TCG tests are CPU-bound and this is sized for 2 cores.
status=0
cargo test --workspace --locked --no-fail-fast --lib --bins --tests -- --test-threads=2 2>&1 | tee "$log" || status=$?

# One closing line for the whole suite (cargo prints one per test binary). Tests that
# probe for what this host may lack (a KVM that runs Linux, /dev/kvm) call
# vmbuild_tests::skip, which appends a line to $VMBUILD_SKIP_LOG: those count as skipped,
# not passed.
skipped_by_probe=$(wc -l <"$VMBUILD_SKIP_LOG")
cat "$VMBUILD_SKIP_LOG"
awk -v s="$skipped_by_probe" '/^test result:/ { p += $4; f += $6; i += $8 }
     END { printf "vmbuild tests: %d passed, %d failed, %d skipped\n", p - s, f, i + s }' "$log"
exit "$status"
