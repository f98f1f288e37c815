#!/usr/bin/env bash
# Installs everything vmbuild needs on a Debian 12 host (run as root).
# Idempotent: safe to run again; does nothing that is already done.
set -euo pipefail

log() { printf '[install] %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
  echo "install-host-deps.sh: must run as root (it calls apt-get)" >&2
  exit 2
fi

# QEMU 10 (vhost-user-fs-pci, file: migration, mapped-ram) comes from bookworm-backports.
# Add that suite on the same mirror as the existing bookworm entry.
backports=/etc/apt/sources.list.d/vmbuild-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  mirror=$(grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
           | grep -v security | head -n1 | tr -d ' ' || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  log "adding bookworm-backports from $mirror"
  cat >"$backports" <<SRC
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

stamp=/var/lib/vmbuild/apt-updated
if [[ ! -f $stamp || -n $(find "$backports" -newer "$stamp" 2>/dev/null) ]]; then
  log "apt-get update"
  apt-get update -qq
  mkdir -p /var/lib/vmbuild && touch "$stamp"
fi

export DEBIAN_FRONTEND=noninteractive
need=()
# libc6-dev: the tests build small static guest programs with gcc -static.
# dropbear-bin, e2fsprogs: the snapshot lifecycle's SSH server/client and target disk.
# acpica-tools: iasl checks the embedded VMM's ACPI tables in the tests.
# vde2, vdeplug: vde_switch, vde_plug and dpipe, the peers of vmbuild switch -s in its tests.
# apt, curl, dpkg-dev, debian-archive-keyring: `vmbuild image build` resolves with apt,
# downloads with curl, reads packages with dpkg-deb (the tests build one with dpkg-deb).
# mmdebstrap: the peer of the image benchmark; iperf3: the switch benchmark's traffic;
# diod: the 9P2000.L server benchmark's peer.
# xorriso, wimtools, swtpm, ovmf: the windows-cygwin profile reads the install ISOs and the
# WIM's editions, writes the answer-file ISO, and gives Windows 11 a TPM and UEFI.
# shellcheck: the tests check the first-logon shell script with it.
# dnf, dnf-plugins-core, rpm: images of rpm distributions resolve with `dnf download`
# and check packages with rpmkeys; createrepo-c: the tests make an rpm repository of
# packages they build with rpmbuild.
for p in busybox-static cpio xz-utils zstd kmod iproute2 socat procps qemu-utils \
         gcc libc6-dev libseccomp-dev libcap-ng-dev pkg-config dropbear-bin e2fsprogs \
         acpica-tools vde2 vdeplug apt curl dpkg-dev debian-archive-keyring mmdebstrap \
         dnf dnf-plugins-core rpm createrepo-c iperf3 xorriso wimtools swtpm swtpm-tools shellcheck diod; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if ((${#need[@]})); then
  log "installing ${need[*]}"
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# e2fsprogs 1.47.1 or newer reads a tar for `mke2fs -d`: how `vmbuild image build` makes a
# byte-reproducible image without root. Debian 12 has 1.47.0; backports has 1.47.2.
e2fs_ok() {
  local v
  v=$(mke2fs -V 2>&1 | sed -nE '1s/^mke2fs ([0-9]+\.[0-9]+\.[0-9]+).*/\1/p')
  [[ -n $v ]] && dpkg --compare-versions "$v" ge 1.47.1
}
if ! e2fs_ok; then
  log "installing e2fsprogs from bookworm-backports (mke2fs -d from a tar)"
  apt-get install -y -qq --no-install-recommends -t bookworm-backports \
    e2fsprogs libarchive13 >/dev/null
fi
log "mke2fs: $(mke2fs -V 2>&1 | head -n1)"

# Fedora's signing keys, for `vmbuild image build --distro fedora-*` (bookworm has them
# only in backports).
if ! dpkg -s distribution-gpg-keys >/dev/null 2>&1; then
  log "installing distribution-gpg-keys from bookworm-backports"
  apt-get install -y -qq --no-install-recommends -t bookworm-backports distribution-gpg-keys >/dev/null
fi

qemu_major() { qemu-system-x86_64 --version 2>/dev/null | sed -nE 's/.*version ([0-9]+)\..*/\1/p'; }
if [[ -z $(qemu_major) || $(qemu_major) -lt 10 ]]; then
  log "installing qemu-system-x86 from bookworm-backports"
  apt-get install -y -qq --no-install-recommends -t bookworm-backports \
    qemu-system-x86 qemu-system-data qemu-utils ovmf seabios >/dev/null
fi
log "qemu: $(qemu-system-x86_64 --version | head -n1)"

# libvirt, from the same suite as QEMU: the test that runs `vmbuild fs serve` as a libvirt
# guest's virtiofsd (vmm/tests/libvirt_virtiofs.rs) and libvirt users of that drop-in.
if ! dpkg -s libvirt-daemon-system libvirt-clients >/dev/null 2>&1; then
  log "installing libvirt from bookworm-backports"
  apt-get install -y -qq --no-install-recommends -t bookworm-backports \
    libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu >/dev/null
fi
