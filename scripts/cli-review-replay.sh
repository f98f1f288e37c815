#!/usr/bin/env bash
# Re-runs the commands of the new-user CLI review (../shared/reviews/cli-as-a-new-user.md)
# that were broken or confusing, and prints one Markdown row per command: its exit code,
# the first line it printed on stderr, and what it left behind. Run as root after
# scripts/install.sh (or point VMBUILD at a binary). Needs a snapshot for the build rows:
# SNAPSHOT (default /var/lib/vmbuild/snapshots/linux).
set -u
VMBUILD=${VMBUILD:-vmbuild}
SNAPSHOT=${SNAPSHOT:-/var/lib/vmbuild/snapshots/linux}
D=$(mktemp -d /tmp/vmbuild-review-XXXXXX)
trap 'rm -rf "$D"' EXIT
cd "$D" || exit 1
mkdir sh1 sh2 "$(printf 'd\377')"
echo file >afile

# What exists of ours in /run/vmbuild and /tmp, to compare before and after a command.
ours() { ls -d /run/vmbuild/* /tmp/vmbuild-xchg-* /tmp/vswitch-vhost-* 2>/dev/null | sort; }

leftovers() { # leftovers BEFORE
  local left=""
  pgrep -f "qemu-system.*$D" >/dev/null && left+="qemu "
  [ -n "$(comm -13 <(echo "$1") <(ours))" ] && left+="$(comm -13 <(echo "$1") <(ours) | tr '\n' ' ')"
  [ "$(cat "$D/afile" 2>/dev/null)" = file ] || left+="afile-changed "
  echo "${left:-none}"
}

row() { # row TIMEOUT STDIN CMD...
  local t=$1 input=$2
  shift 2
  local start rc err before
  before=$(ours)
  start=$(date +%s.%N)
  timeout --preserve-status -s INT "$t" "$@" <"$input" >"$D/out" 2>"$D/err"
  rc=$?
  err=$(grep -v '^\[guest\]' "$D/err" | head -1 | cut -c1-150 | sed 's/|/\\|/g')
  printf '| `%s` | %s | %.1f s | %s | %s |\n' "$(printf '%q ' "$@" | sed "s|$D|\$D|g; s|$VMBUILD|vmbuild|" | cut -c1-110)" \
    "$rc" "$(echo "$(date +%s.%N) - $start" | bc)" "${err//$D/\$D}" "$(leftovers "$before")"
  rm -f "$D"/*.sock
  echo file >"$D/afile"
}

echo "| command | rc | time | first stderr line | left |"
echo "|---|---|---|---|---|"
# 1: typos before -- are refused, not run as the command
row 60 /dev/null "$VMBUILD" run --memroy 1024 -- true
row 60 /dev/null "$VMBUILD" run -z -- true
row 60 /dev/null "$VMBUILD" build --snapshot "$SNAPSHOT" --share "$D/sh1:/mnt" -- true
# 2, 3: sockets never clobber a file; a live server's socket is in use
row 5 /dev/null "$VMBUILD" fs serve --shared-dir sh1 --socket-path "$D/afile"
row 5 /dev/null "$VMBUILD" switch -M "$D/afile"
row 5 /dev/null "$VMBUILD" switch --vhost-user "$D/afile"
row 5 /dev/null "$VMBUILD" fs serve --socket-dir "$D" --share tag=a,dir=sh1 --share tag=a,dir=sh2
# 4: QEMU's own error, memory bound
row 60 /dev/null "$VMBUILD" run --memory 99999999 -- true
echo "this is no kernel" >notakernel
row 60 /dev/null "$VMBUILD" run --vmm qemu --kernel "$D/notakernel" -- true
# 5: non-UTF-8 directories
row 60 /dev/null "$VMBUILD" run --xchg "$D/$(printf 'd\377')" -- sh -c 'echo ok > /tmp/xchg/f'
# 6: thread pool bound
row 5 /dev/null "$VMBUILD" fs serve --shared-dir sh1 --socket-path "$D/t.sock" --thread-pool-size 1000000
# 7: --shell without a terminal
row 30 /dev/null "$VMBUILD" run --shell
# 8: --timings
row 60 /dev/null "$VMBUILD" run --timings /does-not-exist/t.json -- sh -c 'exit 3'
row 60 /dev/null "$VMBUILD" run --timings echo hi
# 10: --accel kvm where KVM cannot run Linux
row 60 /dev/null "$VMBUILD" run --accel kvm --timeout 60 -- true
# 11: mount-point clashes
row 60 /dev/null "$VMBUILD" run --share "$D/sh1:/mnt/a" --share "$D/sh2:/mnt/a" -- mount
row 60 /dev/null "$VMBUILD" run --share "$D/sh1:/tmp/xchg" -- mount
row 60 /dev/null "$VMBUILD" run --xchg sh1 --share "$D/sh2:/tmp/xchg/inner" -- true
row 60 /dev/null "$VMBUILD" run --store sh1 --store-mount / -- ls /
row 60 /dev/null "$VMBUILD" build --snapshot "$SNAPSHOT" --xchg "$SNAPSHOT" -- true
# the confusing list
row 60 /dev/null "$VMBUILD" run --log "$D" -- true
row 60 /dev/null "$VMBUILD" build --snapshot "$SNAPSHOT" --log /does-not-exist/c.log -- true
row 60 /dev/null "$VMBUILD" bootstrap --profile windows-cygwin --out "$D/w"
row 60 /dev/null "$VMBUILD" bootstrap --out /nonexistent/dir/snap
row 60 /dev/null "$VMBUILD" run --memory -1 -- true
row 60 /dev/null "$VMBUILD" run --cpus -1 -- true
row 60 /dev/null "$VMBUILD" run -- ''
row 60 /dev/null "$VMBUILD" run -- nosuchcmd
row 60 /dev/null "$VMBUILD" build --snapshot "$SNAPSHOT" -w /does-not-exist -- pwd
row 60 /dev/null "$VMBUILD" run --disk-mode rw -- true
row 60 /dev/null "$VMBUILD" run --keep-xchg --xchg sh2 -- true
row 60 /dev/null "$VMBUILD" run --pass-env A=B -- true
row 5 /dev/null "$VMBUILD" fs serve --socket-dir /does-not-exist --share tag=a,dir=sh1
row 5 /dev/null "$VMBUILD" fs serve --socket-dir "$D" --share 'tag=../../etc/x,dir=sh1'
row 5 /dev/null "$VMBUILD" fs serve --print-capabilities
row 5 /dev/null "$VMBUILD" switch -s "$D/vde"
row 5 /dev/null "$VMBUILD" switch --tap uxt0 --tap uxt0
row 5 /dev/null "$VMBUILD" switch -M /does-not-exist/sw.mgmt
row 5 /dev/null "$VMBUILD" switch ctl "$D/nope.mgmt" showinfo
# SIGHUP: stops and cleans up like SIGINT
hup() {
  local before pid
  before=$(ours)
  "$VMBUILD" run -- sleep 20 >/dev/null 2>&1 &
  pid=$!
  sleep 3
  kill -HUP $pid
  wait $pid
  echo "| \`vmbuild run -- sleep 20\`, SIGHUP at 3 s | $? | | | $(leftovers "$before") |"
}
hup
