#!/usr/bin/env bash
# Runs every test of vmbuild on a Debian 12 host, as root: installs what the tests need
# (QEMU 10, busybox, ...), builds the guest kit once (cached), then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-host-deps.sh
kit=$(scripts/guest-kit.sh)
export VMBUILD_GUEST_KIT=$kit

# Two cores: QEMU/TCG tests are CPU-bound, so two test threads keep each guest fast enough.
cargo test --workspace --locked -- --test-threads=2
