#!/usr/bin/env bash
# Builds vmbuild's "guest kit": a small Linux test guest made from Debian
# packages that boots under QEMU TCG in a couple of seconds.
#
#   scripts/guest-kit.sh [--out DIR] [--force]
#
# DIR defaults to ${VMBUILD_GUEST_KIT:-/var/cache/vmbuild/guest-kit}. The kit:
#   DIR/vmlinux     uncompressed ELF kernel (PVH entry; boot with qemu -kernel)
#   DIR/bzImage     the package's vmlinuz (for SeaBIOS/bzImage boots; slower)
#   DIR/initrd.img  uncompressed newc cpio: busybox-static, guest/init as /init,
#                   virtio/9p/virtiofs/ext4 modules (+ /etc/vmbuild/modules: load
#                   order, "NAME PATH DEPS" per line, DEPS comma-separated or -)
#   DIR/config      the kernel's build config
#   DIR/kit.json    metadata; written last, so its presence means "complete"
#
# Idempotent: when DIR/kit.json matches the current inputs (kernel package
# version, sha256 of guest/init, of this script and of the busybox binary) it
# just prints DIR. Progress goes to stderr, the kit directory to stdout.
#
# Environment: VMBUILD_GUEST_KIT (default DIR), VMBUILD_KERNEL_SUITE (Debian
# suite to take linux-image-amd64 from; default bookworm, deliberately not
# bookworm-backports nor bookworm-security), VMBUILD_BUSYBOX (default
# /bin/busybox, must be static), SOURCE_DATE_EPOCH (mtime inside the initrd,
# default 0).
set -euo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
ROOT=$(dirname "$(dirname "$SELF")")
INIT_SRC=$ROOT/guest/init
SUITE=${VMBUILD_KERNEL_SUITE:-bookworm}
META_PKG=linux-image-amd64
BUSYBOX=${VMBUILD_BUSYBOX:-/bin/busybox}
EPOCH=${SOURCE_DATE_EPOCH:-0}
# Wanted modules; their dependencies (modinfo -F depends) are added, and
# modules built into the kernel (modules.builtin) are skipped.
MODULES=(failover net_failover virtio_ring virtio virtio_pci_modern_dev
  virtio_pci_legacy_dev virtio_pci virtio_net virtio_blk virtio_console
  netfs fscache 9pnet 9pnet_virtio 9p fuse virtiofs crc32c_generic ext4
  virtio_rng virtio_mmio 9pnet_fd
  ahci sr_mod isofs)
# ahci, sr_mod and isofs: the windows-cygwin stand-in target reads the configuration
# ISO from the q35 machine's CD-ROM as Windows' setup does (loaded only when asked).
# The nested KVM host (scripts/nested-kvm-host.sh) boots this kit under TCG with
# -cpu max, which offers AMD SVM, and runs the host's files from an overlay. Its
# modules go into a second cpio (nested-modules.cpio, appended to initrd.img by that
# script) so that every other boot of the kit does not carry them.
NESTED_MODULES=(kvm_amd overlay tun veth)
# Kernel command line that boots this kit fastest under TCG (measured; see
# guest/README.md). Recorded in kit.json for callers.
# cryptomgr.notests skips the crypto self-tests (~0.35 s under TCG); the usual
# tweaks (tsc=reliable, no_timer_check, 8250.nr_uarts=1, i8042.*,
# random.trust_cpu=on, mitigations=off, -cpu max) measured no gain.
RECOMMENDED_APPEND="console=ttyS0 panic=-1 quiet cryptomgr.notests"
RECOMMENDED_QEMU="-accel tcg -M q35 -m 512 -nodefaults -display none -serial stdio -no-reboot"

OUT=${VMBUILD_GUEST_KIT:-/var/cache/vmbuild/guest-kit}
FORCE=0

usage() { echo "usage: $0 [--out DIR] [--force]" >&2; exit 2; }
while (($#)); do
  case $1 in
    --out) (($# >= 2)) || usage; OUT=$2; shift 2 ;;
    --out=*) OUT=${1#--out=}; shift ;;
    --force) FORCE=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$SELF" >&2; exit 0 ;;
    *) usage ;;
  esac
done
[[ -n $OUT ]] || usage
OUT=$(realpath -m -- "$OUT")
PARENT=$(dirname "$OUT")

T0=$(date +%s.%N)
log() { printf '[guest-kit] %s\n' "$*" >&2; }
die() { printf 'guest-kit: %s\n' "$*" >&2; exit 1; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

# Field of DIR/kit.json (one "key": "value" per line, as written below).
kit_field() {
  sed -n "s/^  \"$1\": \"\(.*\)\",\{0,1\}\$/\1/p" "$OUT/kit.json" 2>/dev/null | head -n1
}

# Identity of the suite's apt index: when unchanged, the kernel package that
# kit.json records is still the current one, and apt-cache (0.4 s when apt's
# binary cache is disabled, as in Debian's docker images) need not run.
apt_stamp() {
  local f s=
  for f in /var/lib/apt/lists/*_dists_"${SUITE}"_InRelease /var/lib/apt/lists/*_dists_"${SUITE}"_Release; do
    [[ -e $f ]] && s+="$(stat -c '%n:%s:%Y' "$f") "
  done
  printf '%s' "${s% }"
}

# Sets KPKG (linux-image-6.1.0-N-amd64) and KPKG_VER from linux-image-amd64 in $SUITE.
resolve_kernel() {
  local out dep
  out=$(LC_ALL=C apt-cache show "$META_PKG/$SUITE" 2>&1) || { RESOLVE_ERR=$(grep -m1 -E '^(E|W):' <<<"$out" || tail -n1 <<<"$out"); return 1; }
  if ! grep -q '^Package:' <<<"$out"; then
    RESOLVE_ERR="$META_PKG is not in suite '$SUITE' of apt's package lists"
    return 1
  fi
  dep=$(sed -n 's/^Depends: //p' <<<"$out" | head -n1 | tr ',' '\n' \
        | sed -nE 's/^ *(linux-image-[0-9][^ ]*-amd64) \(= ([^)]+)\).*/\1 \2/p' | head -n1)
  if [[ -z $dep ]]; then
    RESOLVE_ERR="$META_PKG/$SUITE has no linux-image-*-amd64 dependency"
    return 1
  fi
  KPKG=${dep%% *}
  KPKG_VER=${dep#* }
}

input_hash() {
  printf 'format=1\nsuite=%s\npackage=%s\npackage_version=%s\ninit=%s\nscript=%s\nbusybox=%s\n' \
    "$SUITE" "$KPKG" "$KPKG_VER" "$INIT_SHA" "$SCRIPT_SHA" "$BB_SHA" | sha256sum | cut -d' ' -f1
}

[[ -r $INIT_SRC ]] || die "missing $INIT_SRC"
[[ -x $BUSYBOX ]] || die "missing $BUSYBOX (apt-get install busybox-static)"
INIT_SHA=$(sha "$INIT_SRC")
SCRIPT_SHA=$(sha "$SELF")
BB_SHA=$(sha "$BUSYBOX")
KPKG='' KPKG_VER='' RESOLVE_ERR=''

# Returns 0 if the kit in $OUT is complete and current (may set KPKG*).
kit_is_current() {
  [[ -f $OUT/kit.json && -f $OUT/vmlinux && -f $OUT/initrd.img ]] || return 1
  local stamp
  stamp=$(apt_stamp)
  if [[ -n $stamp && $stamp == "$(kit_field apt_lists_stamp)" ]]; then
    KPKG=$(kit_field kernel_package)
    KPKG_VER=$(kit_field package_version)
  elif ! resolve_kernel; then
    # Offline / no apt lists: keep a kit built from the same init and script.
    KPKG=$(kit_field kernel_package)
    KPKG_VER=$(kit_field package_version)
    [[ $(input_hash) == "$(kit_field input_hash)" ]] || return 1
    log "warning: cannot resolve $META_PKG in $SUITE ($RESOLVE_ERR); using existing kit"
    return 0
  fi
  [[ $(input_hash) == "$(kit_field input_hash)" ]] || return 1
  # Current, but apt's lists changed: remember their new identity so the next
  # call takes the fast path again (best effort).
  if [[ -n $stamp && $stamp != "$(kit_field apt_lists_stamp)" && -w $OUT ]]; then
    local tmp=$OUT/.kit.json.$$
    if sed "s|^  \"apt_lists_stamp\": .*|  \"apt_lists_stamp\": \"$stamp\",|" "$OUT/kit.json" >"$tmp" 2>/dev/null; then
      mv -f "$tmp" "$OUT/kit.json" 2>/dev/null || rm -f "$tmp"
    else
      rm -f "$tmp"
    fi
  fi
  return 0
}

if ((!FORCE)) && kit_is_current; then
  printf '%s\n' "$OUT"
  exit 0
fi

# ---------------------------------------------------------------------------
# Build. Serialise concurrent builders of the same DIR.
mkdir -p "$PARENT"
exec 9>"$PARENT/.$(basename "$OUT").lock"
if ! flock -n 9; then
  log "waiting for another guest-kit build of $OUT"
  flock -w 900 9 || die "timed out waiting for the lock on $OUT"
  if ((!FORCE)) && kit_is_current; then
    printf '%s\n' "$OUT"
    exit 0
  fi
fi

# We hold the lock: leftovers of killed builds are stale.
rm -rf -- "$PARENT/.$(basename "$OUT").new."* "$PARENT/.$(basename "$OUT").old."*
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/guest-kit.XXXXXX")
STAGE=$(mktemp -d "$PARENT/.$(basename "$OUT").new.XXXXXX")
cleanup() { rm -rf -- "$SCRATCH" "$STAGE"; }
trap cleanup EXIT

# --- kernel package ---------------------------------------------------------
apt_updated=0
apt_update() {  # on failure, appends apt-get update's error to RESOLVE_ERR
  ((apt_updated)) && return 1
  apt_updated=1
  log "apt-get update (${RESOLVE_ERR:-package not found})"
  local out
  out=$(LC_ALL=C apt-get update -q 2>&1) && return 0
  RESOLVE_ERR="${RESOLVE_ERR:+$RESOLVE_ERR; }apt-get update failed: $(grep -m1 -E '^(E|W):' <<<"$out" || tail -n1 <<<"$out")"
  return 1
}
fetch_fail() { die "cannot fetch $1 from apt: $2; check /etc/apt/sources.list* and network"; }

if [[ -z $KPKG ]] && ! resolve_kernel; then
  apt_update || fetch_fail "$META_PKG/$SUITE" "${RESOLVE_ERR:-unknown error}"
  resolve_kernel || fetch_fail "$META_PKG/$SUITE" "${RESOLVE_ERR:-unknown error}"
fi
log "kernel package: $KPKG $KPKG_VER (via $META_PKG in $SUITE)"

DL=$SCRATCH/dl
mkdir -p "$DL"
# apt drops privileges to _apt for downloads; let it write here.
if ((EUID == 0)) && getent passwd _apt >/dev/null; then
  chmod 755 "$SCRATCH"; chown _apt "$DL"
fi
download() {
  local out
  out=$(cd "$DL" && LC_ALL=C apt-get download -q "$KPKG=$KPKG_VER" 2>&1) && return 0
  RESOLVE_ERR=$(grep -m1 -E '^E:' <<<"$out" || tail -n1 <<<"$out")
  return 1
}
log "downloading $KPKG=$KPKG_VER"
if ! download; then
  apt_update || fetch_fail "$KPKG" "$RESOLVE_ERR"
  resolve_kernel || fetch_fail "$META_PKG/$SUITE" "$RESOLVE_ERR"
  download || fetch_fail "$KPKG" "$RESOLVE_ERR"
fi
DEB=$(find "$DL" -maxdepth 1 -name '*.deb' | head -n1)
[[ -n $DEB ]] || fetch_fail "$KPKG" "no .deb after apt-get download"

log "extracting $(basename "$DEB")"
X=$SCRATCH/x
dpkg-deb -x "$DEB" "$X"
KREL=$(ls "$X/lib/modules")
[[ $(wc -w <<<"$KREL") == 1 ]] || die "expected one kernel in $DEB, found: $KREL"
[[ $KPKG == "linux-image-$KREL" ]] || log "note: package $KPKG ships kernel release $KREL"
VMLINUZ=$X/boot/vmlinuz-$KREL
[[ -f $VMLINUZ ]] || die "no /boot/vmlinuz-$KREL in $DEB"

# --- vmlinux: the xz payload of vmlinuz ---------------------------------------
log "extracting vmlinux from vmlinuz"
is_elf() { [[ $(head -c4 "$1" | od -An -tx1 | tr -d ' \n') == 7f454c46 ]]; }
found=0
# shellcheck disable=SC2013  # offsets are single words
for off in $(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$VMLINUZ" | cut -d: -f1); do
  # --single-stream: stop after the xz stream, ignore what follows it (tail
  # then dies of SIGPIPE, which is expected).
  if { tail -c +$((off + 1)) "$VMLINUZ" || true; } | xz -dc --single-stream >"$STAGE/vmlinux" 2>/dev/null \
     && is_elf "$STAGE/vmlinux"; then
    found=1; break
  fi
done
((found)) || die "no xz-compressed ELF kernel found in $VMLINUZ"
if command -v readelf >/dev/null && ! LC_ALL=C readelf -n "$STAGE/vmlinux" | grep -q '0x00000012'; then
  log "warning: vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); qemu -kernel vmlinux will not boot it"
fi
cp "$VMLINUZ" "$STAGE/bzImage"
cp "$X/boot/config-$KREL" "$STAGE/config" 2>/dev/null || true

# --- initrd ---------------------------------------------------------------------
R=$SCRATCH/root
MD=$X/lib/modules/$KREL
RMD=$R/lib/modules/$KREL
mkdir -p "$R"/{bin,dev,etc/vmbuild,proc,sys,tmp,run,root,mnt,usr} "$RMD"
ln -s bin "$R/sbin"; ln -s ../bin "$R/usr/bin"; ln -s ../bin "$R/usr/sbin"
ln -s lib "$R/lib64"

# busybox-static
if LC_ALL=C readelf -lW "$BUSYBOX" 2>/dev/null | grep -q 'program interpreter'; then
  die "$BUSYBOX is dynamically linked; install busybox-static"
fi
cp "$BUSYBOX" "$R/bin/busybox"
chmod 755 "$R/bin/busybox"
n=0
while read -r applet; do
  [[ -n $applet && $applet != busybox && $applet != */* ]] || continue
  ln -sf busybox "$R/bin/$applet"; n=$((n + 1))
done < <("$BUSYBOX" --list)
log "busybox: $n applets"

install -m 755 "$INIT_SRC" "$R/init"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$R/etc/passwd"
printf 'root:x:0:\ntty:x:5:\n' >"$R/etc/group"
printf 'vmbuild\n' >"$R/etc/hostname"
if ((EUID == 0)); then mknod -m 600 "$R/dev/console" c 5 1 2>/dev/null || true; fi

# modules: index the package's modules by name (file name, '-' -> '_')
declare -A KO=() BUILTIN=() STATE=() DEPS=()
while IFS= read -r -d '' f; do
  rel=${f#"$MD"/}
  b=${rel##*/}; b=${b%%.ko*}; b=${b//-/_}
  KO[$b]=$rel
done < <(find "$MD/kernel" \( -name '*.ko' -o -name '*.ko.*' \) -print0)
if [[ -f $MD/modules.builtin ]]; then
  while read -r l; do
    b=${l##*/}; b=${b%%.ko*}; BUILTIN[${b//-/_}]=1
  done <"$MD/modules.builtin"
fi
ORDER=() BUILTIN_HIT=() COMPRESSED=none
add_module() {  # depth-first; appends to ORDER after its dependencies
  local m=${1//-/_} rel dst d
  [[ ${STATE[$m]:-} == loaded ]] && return 0
  [[ ${STATE[$m]:-} == visiting ]] && die "module dependency cycle at $m"
  if [[ -n ${BUILTIN[$m]:-} ]]; then
    STATE[$m]=loaded; BUILTIN_HIT+=("$m"); return 0
  fi
  rel=${KO[$m]:-}
  [[ -n $rel ]] || die "module $m is neither in $KPKG nor built in"
  STATE[$m]=visiting
  dst=$RMD/${rel%%.ko*}.ko
  mkdir -p "$(dirname "$dst")"
  case $rel in
    *.ko) cp "$MD/$rel" "$dst" ;;
    *.ko.xz) COMPRESSED=xz; xz -dc "$MD/$rel" >"$dst" ;;
    *.ko.zst) COMPRESSED=zstd; zstd -qdc "$MD/$rel" >"$dst" ;;
    *.ko.gz) COMPRESSED=gzip; gzip -dc "$MD/$rel" >"$dst" ;;
    *) die "unknown module format: $rel" ;;
  esac
  DEPS[$m]=
  for d in $(modinfo -F depends "$dst" | tr ',' ' '); do
    add_module "$d"
    # Only modules the kit carries; built-in ones need no loading.
    [[ -n ${BUILTIN[${d//-/_}]:-} ]] || DEPS[$m]+="${DEPS[$m]:+,}${d//-/_}"
  done
  STATE[$m]=loaded
  ORDER+=("$m")
}
# write_module_index ROOT: the load order (/etc/vmbuild/modules) and depmod's files
# for every module added so far.
write_module_index() {
  local root=$1 rmd=$1/lib/modules/$KREL m rel
  mkdir -p "$root/etc/vmbuild" "$rmd"
  {
    echo "# NAME PATH DEPS, in dependency order (generated by scripts/guest-kit.sh)"
    for m in "${ORDER[@]}"; do
      rel=${KO[$m]}
      echo "$m /lib/modules/$KREL/${rel%%.ko*}.ko ${DEPS[$m]:--}"
    done
  } >"$root/etc/vmbuild/modules"
  for m in "${ORDER[@]}"; do rel=${KO[$m]}; echo "${rel%%.ko*}.ko"; done >"$rmd/modules.order"
  for f in modules.builtin modules.builtin.modinfo; do
    if [[ -f $MD/$f ]]; then cp "$MD/$f" "$rmd/$f"; fi
  done
}
for m in "${MODULES[@]}"; do add_module "$m"; done
write_module_index "$R"
depmod -b "$R" "$KREL"
log "modules (${#ORDER[@]}, load order): ${ORDER[*]}"
if ((${#BUILTIN_HIT[@]})); then log "built into the kernel: ${BUILTIN_HIT[*]}"; fi
log "module files in package: compression $COMPRESSED"
printf 'kernel_release=%s\npackage=%s\npackage_version=%s\n' "$KREL" "$KPKG" "$KPKG_VER" >"$R/etc/vmbuild/kit"

# Uncompressed newc cpio (boots faster under TCG than gzip/zstd), reproducible.
find "$R" -exec touch -h -d "@$EPOCH" {} +
(cd "$R" && find . -mindepth 1 -print0 | LC_ALL=C sort -z \
   | cpio --null -o -H newc -R 0:0 --reproducible --quiet) >"$STAGE/initrd.img"
log "initrd.img: $(du -h "$STAGE/initrd.img" | cut -f1)"

# The nested host's modules: a cpio that, appended to initrd.img, adds their files and
# replaces the load order with the full one (the kernel unpacks both, later wins).
KIT_ORDER=("${ORDER[@]}")
R2=$SCRATCH/nested
RMD=$R2/lib/modules/$KREL
mkdir -p "$RMD"
for m in "${NESTED_MODULES[@]}"; do add_module "$m"; done
write_module_index "$R2"
NESTED_ONLY=("${ORDER[@]:${#KIT_ORDER[@]}}")
log "nested-host modules: ${NESTED_ONLY[*]}"
find "$R2" -exec touch -h -d "@$EPOCH" {} +
(cd "$R2" && find . -mindepth 1 -print0 | LC_ALL=C sort -z \
   | cpio --null -o -H newc -R 0:0 --reproducible --quiet) >"$STAGE/nested-modules.cpio"
log "nested-modules.cpio: $(du -h "$STAGE/nested-modules.cpio" | cut -f1)"

# --- kit.json (last) and move into place -------------------------------------------
json_list() { local s='' x; for x in "$@"; do s+="${s:+, }\"$x\""; done; printf '[%s]' "$s"; }
json_str() { local s=$1; s=${s//\\/\\\\}; s=${s//\"/\\\"}; printf '"%s"' "$s"; }
BB_VER=$("$BUSYBOX" 2>/dev/null | head -n1 | sed -nE 's/^BusyBox (v[^ ]+).*/\1/p' || true)
cat >"$STAGE/kit.json.tmp" <<JSON
{
  "format": 1,
  "kernel_release": $(json_str "$KREL"),
  "kernel_package": $(json_str "$KPKG"),
  "package_version": $(json_str "$KPKG_VER"),
  "suite": $(json_str "$SUITE"),
  "vmlinux": "vmlinux",
  "bzimage": "bzImage",
  "initrd": "initrd.img",
  "vmlinux_sha256": "$(sha "$STAGE/vmlinux")",
  "bzimage_sha256": "$(sha "$STAGE/bzImage")",
  "initrd_sha256": "$(sha "$STAGE/initrd.img")",
  "nested_modules": "nested-modules.cpio",
  "nested_modules_sha256": "$(sha "$STAGE/nested-modules.cpio")",
  "busybox_version": $(json_str "$BB_VER"),
  "modules_compression_in_package": "$COMPRESSED",
  "recommended_append": $(json_str "$RECOMMENDED_APPEND"),
  "recommended_qemu_args": $(json_str "$RECOMMENDED_QEMU"),
  "apt_lists_stamp": $(json_str "$(apt_stamp)"),
  "input_hash": "$(input_hash)",
  "built_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
  "modules": $(json_list "${ORDER[@]}"),
  "builtin_modules": $(json_list ${BUILTIN_HIT[@]+"${BUILTIN_HIT[@]}"})
}
JSON
mv "$STAGE/kit.json.tmp" "$STAGE/kit.json"
chmod 755 "$STAGE"

OLD=
if [[ -e $OUT ]]; then
  OLD=$PARENT/.$(basename "$OUT").old.$$
  mv -T -- "$OUT" "$OLD"
fi
mv -T -- "$STAGE" "$OUT"
if [[ -n $OLD ]]; then rm -rf -- "$OLD"; fi
log "done in $(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s: $OUT"
printf '%s\n' "$OUT"
