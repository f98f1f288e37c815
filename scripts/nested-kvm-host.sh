#!/usr/bin/env bash
# Runs a command on a "nested KVM host": a QEMU TCG guest with -cpu max (which offers
# AMD SVM with nested paging), whose kernel loads kvm_amd, so that /dev/kvm there runs
# Linux guests, even where this host's own KVM cannot (kvm_pvm). It is how vmbuild's
# tests and benchmarks that need a KVM which runs Linux run on such hosts.
#
#   scripts/nested-kvm-host.sh [options] -- COMMAND [ARG]...
#
# Inside, COMMAND sees this host's files: its root file system, read-only over 9p,
# under a tmpfs overlay (writes stay in the guest and vanish with it), with fresh
# /proc, /sys, /dev, /tmp and /run, in the same working directory. Results come back
# through --work DIR, shared read-write at the same path. COMMAND's stdout and stderr
# both arrive on this script's stdout (the guest's serial console), in order.
#
# Options:
#   --work DIR        share DIR read-write at the same path (repeatable)
#   --env NAME=VALUE  set in COMMAND's environment (repeatable); PATH, HOME, TERM,
#                     RUST_LOG, RUST_BACKTRACE and VMBUILD_* are passed on as they are
#   --memory MIB      the nested host's memory (default 6144)
#   --cpus N          its vCPUs (default 1: with 2, multi-threaded TCG and two QEMU+KVM
#                     guests at once crashed the nested host's kernel within seconds,
#                     "stack guard page was hit" in qemu-system-x86, 2026-12-01; with 1
#                     the same ran clean; the embedded VMM's guests ran clean either way)
#   --timeout SECS    stop it after SECS (default 3600): exit 124
#   --retries N       boot again when the nested host itself died or froze before
#                     COMMAND finished (default 1; TCG guests have been seen to
#                     freeze); COMMAND's own failures are never retried. Frozen: no
#                     heartbeat from the guest for $NESTED_FROZEN_AFTER s (default 120)
#   --kit DIR         the guest kit (default $VMBUILD_GUEST_KIT or
#                     /var/cache/vmbuild/guest-kit; scripts/guest-kit.sh builds it)
#   --qemu PATH       qemu-system-x86_64 to use
#   --log FILE        the nested host's whole console, kernel messages included
#
# Exit status: COMMAND's own; 124 timeout; 125 the nested host could not be started
# or did not come up (the reason on stderr). QEMU and temporary files are removed on
# every path out, Ctrl-C included.
set -euo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
die() { printf 'nested-kvm-host: %s\n' "$*" >&2; exit 125; }
usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$SELF" >&2; exit "${1:-2}"; }
log() { printf '[nested-kvm-host] %s\n' "$*" >&2; }

WORK=() ENVS=() MEMORY=6144 CPUS=1 TIMEOUT=3600 RETRIES=1 LOG=
KIT=${VMBUILD_GUEST_KIT:-/var/cache/vmbuild/guest-kit}
QEMU=${VMBUILD_QEMU:-qemu-system-x86_64}
while (($#)); do
  case $1 in
    --work) (($# >= 2)) || usage; WORK+=("$(realpath -- "$2")"); shift 2 ;;
    --env) (($# >= 2)) || usage; [[ $2 == *=* ]] || die "--env wants NAME=VALUE, got '$2'"; ENVS+=("$2"); shift 2 ;;
    --memory) (($# >= 2)) || usage; MEMORY=$2; shift 2 ;;
    --cpus) (($# >= 2)) || usage; CPUS=$2; shift 2 ;;
    --timeout) (($# >= 2)) || usage; TIMEOUT=$2; shift 2 ;;
    --retries) (($# >= 2)) || usage; RETRIES=$2; shift 2 ;;
    --kit) (($# >= 2)) || usage; KIT=$2; shift 2 ;;
    --qemu) (($# >= 2)) || usage; QEMU=$2; shift 2 ;;
    --log) (($# >= 2)) || usage; LOG=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) printf 'nested-kvm-host: unknown option %s\n' "$1" >&2; usage ;;
  esac
done
(($#)) || { echo "nested-kvm-host: no command (… -- COMMAND)" >&2; usage; }
for n in "$MEMORY" "$CPUS" "$TIMEOUT" "$RETRIES"; do
  [[ $n =~ ^[0-9]+$ ]] || { echo "nested-kvm-host: '$n' is not a number" >&2; exit 2; }
done
for f in vmlinux initrd.img nested-modules.cpio; do
  [[ -r $KIT/$f ]] || die "the guest kit in $KIT has no $f: run scripts/guest-kit.sh"
done
command -v "$QEMU" >/dev/null || die "$QEMU not found: run scripts/install-host-deps.sh"
for w in "${WORK[@]}"; do [[ -d $w ]] || die "--work $w is not a directory"; done
# The nested host mounts fresh file systems on these; a working directory below one of
# them (a checkout in /tmp, say) is shared from here at its own path instead.
case $PWD/ in
  /tmp/*|/var/tmp/*|/run/*|/dev/*|/proc/*|/sys/*) WORK+=("$PWD") ;;
esac

CTL=$(mktemp -d "${TMPDIR:-/tmp}/nested-kvm-host.XXXXXX")
QEMU_PID=
cleanup() {
  [[ -n $QEMU_PID || ! -s $CTL/qemu.pid ]] || QEMU_PID=$(cat "$CTL/qemu.pid" 2>/dev/null)
  if [[ -n $QEMU_PID ]] && kill -0 "$QEMU_PID" 2>/dev/null; then
    kill -TERM "$QEMU_PID" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$QEMU_PID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$QEMU_PID" 2>/dev/null || true
    wait "$QEMU_PID" 2>/dev/null || true
  fi
  rm -rf -- "$CTL"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The kit's init mounts the shares and runs outer.sh in its busybox; outer.sh builds
# the host's view and runs inner.sh (bash, from the host's files) chrooted into it.
cat "$KIT/initrd.img" "$KIT/nested-modules.cpio" >"$CTL/initrd"
{
  printf 'export %q\n' "PATH=$PATH" "HOME=${HOME:-/root}" "TERM=dumb" "NESTED_KVM_HOST=1"
  while IFS='=' read -r -d '' name value; do
    case $name in
      RUST_LOG|RUST_BACKTRACE|VMBUILD_*|CARGO_*) printf 'export %q\n' "$name=$value" ;;
    esac
  done < <(env -0)
  for e in "${ENVS[@]}"; do printf 'export %q\n' "$e"; done
  printf 'cd %q || exit 125\n' "$PWD"
  printf 'exec'; printf ' %q' "$@"; printf '\n'
} >"$CTL/inner.sh"
: >"$CTL/works"
for i in "${!WORK[@]}"; do printf '%s %s\n' "work$i" "${WORK[$i]}" >>"$CTL/works"; done

cat >"$CTL/outer.sh" <<'OUTER'
# Runs in the guest kit's busybox: the host's root (9p, read-only) under a tmpfs
# overlay, fresh kernel file systems, the --work shares at their paths, then inner.sh.
set -e
[ -c /dev/kvm ] || { echo "nested-kvm-host: no /dev/kvm in the nested host (kvm_amd did not load: is -cpu max offering SVM?)"; exit 125; }
mkdir -p /ovl /newroot
mount -t tmpfs -o mode=755 tmpfs /ovl
mkdir -p /ovl/upper /ovl/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/ovl/upper,workdir=/ovl/work /newroot
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp
mount -t tmpfs -o mode=755 tmpfs /newroot/run
mount -t tmpfs -o mode=1777 tmpfs /newroot/var/tmp
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup 2>/dev/null || true
# The guest kit, copied into the overlay's tmpfs: every VM the command starts reads its
# kernel (65 MB) and initramfs, and reading them over 9p cost each boot 1-2 s in both
# VMMs, a cost a host with the kit in its page cache does not pay.
KIT=/var/cache/vmbuild/guest-kit
if [ -d "/host$KIT" ]; then
  for f in vmlinux bzImage initrd.img kit.json config; do
    [ -f "/host$KIT/$f" ] && cat "/host$KIT/$f" >"/newroot$KIT/$f"
  done
fi
while read -r tag path; do
  mkdir -p "/newroot$path"
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none "$tag" "/newroot$path"
done </ctl/works
mkdir -p /newroot/run/nested-kvm-host
mount --bind /ctl /newroot/run/nested-kvm-host
echo "nested-kvm-host: up, /dev/kvm ready" >/dev/kmsg
# A heartbeat the host watches: a TCG guest has been seen to freeze outright.
(while :; do date >/ctl/heartbeat; sleep 5; done) &
# The console is a serial line: no CR added, so the host reads plain lines.
stty -F /dev/console -onlcr 2>/dev/null || stty -onlcr 2>/dev/null || true
set +e
chroot /newroot /bin/bash /run/nested-kvm-host/inner.sh </dev/null
status=$?
echo "$status" >/ctl/status
sync
exit "$status"
OUTER

APPEND="console=ttyS0 panic=-1 quiet cryptomgr.notests vmbuild.quiet"
APPEND+=" vmbuild.modules=kvm_amd,overlay,tun,veth"
APPEND+=" vmbuild.mount=9p:hostroot:/host:ro,cache=loose,msize=512000"
APPEND+=" vmbuild.mount=9p:ctl:/ctl:msize=512000,cache=none"
APPEND+=" vmbuild.cmd=/ctl/outer.sh"

QARGS=(-accel tcg,thread=multi -cpu max -smp "$CPUS" -m "$MEMORY" -M q35
  -nodefaults -display none -no-reboot -serial stdio -pidfile "$CTL/qemu.pid"
  -kernel "$KIT/vmlinux" -initrd "$CTL/initrd" -append "$APPEND"
  -fsdev "local,id=hostroot,path=/,security_model=passthrough,readonly=on,multidevs=remap"
  -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot
  -fsdev "local,id=ctl,path=$CTL,security_model=passthrough"
  -device virtio-9p-pci,fsdev=ctl,mount_tag=ctl)
for i in "${!WORK[@]}"; do
  QARGS+=(-fsdev "local,id=work$i,path=${WORK[$i]},security_model=passthrough"
          -device "virtio-9p-pci,fsdev=work$i,mount_tag=work$i")
done

# Its guest writes a heartbeat every 5 s from outside the command's reach; this long
# without one, the nested host is taken as frozen (the command's own silence, however
# long, is not a freeze).
FROZEN_AFTER=${NESTED_FROZEN_AFTER:-120}
deadline=$(( $(date +%s) + TIMEOUT ))
attempt=0
while :; do
  rm -f "$CTL/status" "$CTL/qemu.pid" "$CTL/heartbeat"
  left=$(( deadline - $(date +%s) ))
  ((left > 0)) || { log "timed out after ${TIMEOUT} s"; exit 124; }
  # The console: plain lines on stdout, the kit's own markers and kernel lines only in
  # --log. QEMU runs in the background so that a signal here can stop it.
  "$QEMU" "${QARGS[@]}" </dev/null 2>"$CTL/qemu.err" \
    | { if [[ -n $LOG ]]; then tee -a "$LOG"; else cat; fi; } \
    | sed -u -e 's/\r$//' -e '/^vmbuild-exit=/d' -e '/^vmbuild-phase=/d' -e '/^\[ *[0-9]*\.[0-9]*\] /d' &
  pipeline=$!
  timed_out=0
  while kill -0 "$pipeline" 2>/dev/null; do
    [[ -n $QEMU_PID || ! -s $CTL/qemu.pid ]] || QEMU_PID=$(cat "$CTL/qemu.pid")
    if (( $(date +%s) >= deadline )); then timed_out=1; break; fi
    if [[ -e $CTL/heartbeat ]] && (( $(date +%s) - $(stat -c %Y "$CTL/heartbeat") > FROZEN_AFTER )); then
      log "the nested host froze (no heartbeat for ${FROZEN_AFTER} s); stopping it"
      kill -KILL "$QEMU_PID" 2>/dev/null || true
      wait "$pipeline" 2>/dev/null || true
      break
    fi
    sleep 1
  done
  if ((timed_out)); then
    log "timed out after ${TIMEOUT} s; stopping the nested host"
    exit 124
  fi
  wait "$pipeline" 2>/dev/null || true
  QEMU_PID=
  if [[ -s $CTL/status ]]; then
    exit "$(cat "$CTL/status")"
  fi
  if [[ -s $CTL/qemu.err ]]; then
    log "QEMU: $(tail -n 5 "$CTL/qemu.err")"
  fi
  if ((attempt >= RETRIES)); then
    die "the nested host ended before the command did (no exit status; see --log)"
  fi
  attempt=$((attempt + 1))
  # scripts/test.sh reads this line: what the command printed before it is discarded.
  log "the nested host ended before the command did; booting it again ($attempt of $RETRIES)"
done
