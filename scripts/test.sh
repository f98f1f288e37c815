#!/usr/bin/env bash
# Runs every test of vmbuild on a Debian 12 host, as root: installs what the tests need
# (QEMU 10, busybox, ...), builds the guest kit once (cached), then the whole test suite.
#
# Tests that need a KVM which runs Linux are marked #[ignore = "needs a KVM that runs
# Linux ..."]. Where this host's KVM boots the guest kit (vmbuild doctor's probes), they
# run here with the rest. Elsewhere (a nested, paging-emulated KVM such as kvm_pvm) they
# run in a nested KVM host made for the purpose (scripts/nested-kvm-host.sh: a TCG guest
# with -cpu max, whose kvm_amd runs Linux), and a failure to make one fails the suite:
# none of them is ever counted as skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-host-deps.sh
kit=$(scripts/guest-kit.sh)
export VMBUILD_GUEST_KIT=$kit

log=$(mktemp)
# The skip log lives in a directory of its own, which the nested KVM host is given
# read-write (--work): a test skipped in there must be counted too.
skipdir=$(mktemp -d)
VMBUILD_SKIP_LOG=$skipdir/skipped
: >"$VMBUILD_SKIP_LOG"
export VMBUILD_SKIP_LOG
trap 'rm -rf "$log" "$skipdir"' EXIT
# Two test threads: the QEMU/TCG tests are CPU-bound and this is sized for 2 cores.
THREADS=(--test-threads=2)
status=0
cargo build --workspace --locked --bins
cargo test --workspace --locked --no-run 2>&1 | tail -n 3

# Does this host's own KVM run Linux, in QEMU and in the embedded VMM?
linux_kvm_here() {
  local report
  report=$(target/debug/vmbuild doctor --json 2>/dev/null) || true
  python3 - "$report" <<'PY'
import json, sys
try:
    findings = {f["check"]: f["status"] for f in json.loads(sys.argv[1])["findings"]}
except Exception:
    sys.exit(1)
ok = findings.get("kvm_runs_linux") == "ok" and findings.get("embedded_runs_linux") == "ok"
sys.exit(0 if ok else 1)
PY
}

nested=0
if linux_kvm_here; then
  echo "[test] this host's KVM runs Linux: every test runs here"
  cargo test --workspace --locked --no-fail-fast --lib --bins --tests -- "${THREADS[@]}" --include-ignored 2>&1 \
    | tee "$log" || status=$?
else
  echo "[test] this host's KVM does not run Linux: the tests that need it run in a nested KVM host"
  nested=1
  cargo test --workspace --locked --no-fail-fast --lib --bins --tests -- "${THREADS[@]}" 2>&1 \
    | tee "$log" || status=$?
fi

if ((nested)); then
  # The test binaries with ignored tests, each run from its package's directory as
  # cargo would.
  # Under the work tree, which the nested host sees (its /tmp is its own).
  plan=$PWD/target/nested-kvm-host.plan
  trap 'rm -rf "$log" "$skipdir" "$plan"' EXIT
  cargo test --workspace --locked --no-run --message-format=json 2>/dev/null | python3 -c '
import json, os, subprocess, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable") or not m["profile"]["test"]:
        continue
    exe = m["executable"]
    listed = subprocess.run([exe, "--list", "--ignored", "--format", "terse"],
                            capture_output=True, text=True).stdout
    if any(l.endswith(": test") for l in listed.splitlines()):
        print(os.path.dirname(m["manifest_path"]), exe)
' >"$plan"
  echo "[test] in the nested KVM host: $(wc -l <"$plan") test binaries" | tee -a "$log"
  [[ -s $plan ]] || { echo "[test] no test binary has tests that need a KVM which runs Linux: the plan is wrong" >&2; exit 1; }
  # One test at a time, each recorded in $results as it ends ("ok|FAILED BINARY TEST"),
  # so that when the nested host freezes (QEMU's TCG has been seen to leave the nested
  # host halted with interrupts blocked for good, after a Linux VM ends, in about one
  # run in three) and is booted again, the run goes on where it stopped instead of from
  # the start. A test that failed is not run again; one that never finished is.
  results=$skipdir/nested-results
  : >"$results"
  script='status=0
[ -s "$1" ] || { echo "nested: cannot read the plan $1"; exit 1; }
i=0
while read -r dir exe; do
  for t in $("$exe" --list --ignored --format terse | sed -n "s/: test\$//p"); do
    i=$((i + 1))
    [ $((i % $4)) -eq "$3" ] || continue
    grep -qxF "ok $exe $t" "$2" && continue
    grep -qxF "FAILED $exe $t" "$2" && { status=1; continue; }
    if (cd "$dir" && "$exe" --ignored --exact "$t" --test-threads=1); then
      echo "ok $exe $t" >>"$2"
    else
      echo "FAILED $exe $t" >>"$2"; status=1
    fi
    sync
  done
done <"$1"
exit $status'
  # Each nested host has one vCPU (see nested-kvm-host.sh --cpus), so one host leaves a
  # core idle: the tests are dealt to one host per core (every SHARDS-th test to each),
  # where memory allows, each host recording its own results.
  mem_gib=$(( $(awk '/^MemAvailable:/ {print $2}' /proc/meminfo) / 1048576 ))
  shards=$(nproc)
  ((shards <= mem_gib / 7)) || shards=$(( mem_gib / 7 ))
  ((shards >= 1)) || shards=1
  ((shards <= 4)) || shards=4
  start=$(date +%s)
  pids=()
  for ((shard = 0; shard < shards; shard++)); do
    : >"$results.$shard"
    (
      set -o pipefail
      NESTED_FROZEN_AFTER=60 scripts/nested-kvm-host.sh --timeout 2400 --retries 5 --work "$skipdir" \
        -- bash -c "$script" nested "$plan" "$results.$shard" "$shard" "$shards" 2>&1 \
        | sed -u "s/^/[nested $shard\/$shards] /" | tee -a "$log"
    ) &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  cat "$results".* >"$results"
  echo "[test] the nested KVM hosts ($shards) took $(( $(date +%s) - start )) s"
  # Every planned test must have ended there, one way or the other.
  while read -r _ exe; do
    for t in $("$exe" --list --ignored --format terse | sed -n 's/: test$//p'); do
      grep -qE "^(ok|FAILED) $exe $t\$" "$results" || { echo "FAILED $exe $t" >>"$results"; echo "[test] never finished in the nested host: $t" | tee -a "$log"; status=1; }
    done
  done <"$plan"
  nested_passed=$(grep -c '^ok ' "$results" || true)
  nested_failed=$(grep -c '^FAILED ' "$results" || true)
  grep '^FAILED ' "$results" | sed 's/^/[test] nested: /' | tee -a "$log" || true
fi

# One closing line for the whole suite (cargo prints one per test binary). Tests that
# probe for what this host may lack call vmbuild_tests::skip and return, which appends a
# line to $VMBUILD_SKIP_LOG: each such test (counted once, however often it logged)
# counts as skipped, not passed. Tests ignored here that ran in the nested host count
# once, as what they did there.
skipped_by_probe=$(cut -d: -f2 "$VMBUILD_SKIP_LOG" | sort -u | grep -c . || true)
cat "$VMBUILD_SKIP_LOG"
awk -v s="$skipped_by_probe" -v nested="$nested" -v np="${nested_passed:-0}" -v nf="${nested_failed:-0}" '
  # What ran in the nested host is counted from its results (np, nf), not its log.
  /^\[test\] in the nested KVM host/ { inside = 1 }
  /^test result:/ { if (!inside) { p += $4; f += $6; i += $8 } }
  END {
    skipped = i + s
    if (nested) skipped -= np + nf
    if (skipped < 0) skipped = 0
    printf "vmbuild tests: %d passed, %d failed, %d skipped\n", p + np - s, f + nf, skipped
  }' "$log"
exit "$status"
