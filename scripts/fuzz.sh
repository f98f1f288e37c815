#!/usr/bin/env bash
# Fuzzes vmbuild's parsers with cargo-fuzz (libFuzzer, AddressSanitizer, debug
# assertions): every target, or the ones named, for N minutes each, one after another.
#
#   scripts/fuzz.sh                         # every target, 5 minutes each
#   scripts/fuzz.sh --minutes 1 ninep switch
#   scripts/fuzz.sh --seconds 90 --merge    # and keep what found new coverage
#
# Targets: virtio_fs ninep switch virtqueue vhost_user snapshot_files (see fuzz-harness).
# Seeds come from fuzz/corpus/<target>/ (committed; replayed by `cargo test`); what the
# run finds goes to fuzz/corpus-new/<target>/ (not committed); --merge adds the inputs of
# new coverage to fuzz/corpus/<target>/. A crash leaves its input in
# fuzz/artifacts/<target>/: add it to fuzz/regressions/<target>/ with the fix, and the
# replay tests keep it found. Logs: fuzz/logs/<target>.log. Needs a nightly toolchain
# and cargo-fuzz (`cargo install cargo-fuzz`). On a shared machine, run it under a lock:
# `flock /tmp/cargo.lock scripts/fuzz.sh ...`.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

ALL=(virtio_fs ninep switch virtqueue vhost_user snapshot_files)
seconds=300
merge=0
targets=()
while (($#)); do
  case $1 in
    --minutes) seconds=$(($2 * 60)); shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --merge) merge=1; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
((${#targets[@]})) || targets=("${ALL[@]}")
for t in "${targets[@]}"; do
  [[ " ${ALL[*]} " == *" $t "* ]] || { echo "fuzz.sh: no target '$t' (${ALL[*]})" >&2; exit 2; }
done

# The harnesses' shares, in a directory removed at the end even when a crash aborted a
# target before it could clean up after itself.
VMBUILD_FUZZ_TMP=$(mktemp -d -t vmbuild-fuzz-run.XXXXXX)
export VMBUILD_FUZZ_TMP
trap 'rm -rf "$VMBUILD_FUZZ_TMP"' EXIT

# -a: debug assertions (integer overflow is a crash, as in `cargo test`).
cargo +nightly fuzz build -a
mkdir -p logs
summary=()
status=0
for t in "${targets[@]}"; do
  mkdir -p "corpus-new/$t" "artifacts/$t" "corpus/$t"
  echo "[fuzz] $t for ${seconds}s"
  rc=0
  # One job, one worker: the machines this runs on have two cores and other work.
  cargo +nightly fuzz run -a "$t" "corpus-new/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -jobs=1 -workers=1 -timeout=30 -rss_limit_mb=3072 \
    -malloc_limit_mb=512 -print_final_stats=1 -artifact_prefix="artifacts/$t/" >/dev/null 2>&1 || rc=$?
  mv -f fuzz-0.log "logs/$t.log" 2>/dev/null || true
  log="logs/$t.log"
  execs=$(grep -a 'stat::number_of_executed_units' "$log" | tail -1 | awk '{print $2}')
  last=$(grep -aE '^#[0-9]+.*(cov|ft):' "$log" | tail -1)
  cov=$(sed -n 's/.*cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.*ft: \([0-9]*\).*/\1/p' <<<"$last")
  crashes=$(find "artifacts/$t" -type f | wc -l)
  if ((rc != 0)) || grep -aqE 'ERROR: (libFuzzer|AddressSanitizer)|panicked at' "$log"; then
    status=1
    echo "[fuzz] $t FOUND something: see $log and artifacts/$t/" >&2
  fi
  summary+=("$(printf '%-15s %12s %8s %8s %8s' "$t" "${execs:-?}" "${cov:-?}" "${ft:-?}" "$crashes")")
  if ((merge)); then
    cargo +nightly fuzz run -a "$t" "corpus/$t" "corpus-new/$t" -- -merge=1 \
      -timeout=30 -rss_limit_mb=3072 >/dev/null 2>&1 || true
  fi
done
printf '%-15s %12s %8s %8s %8s\n' target executions cov ft crashes
printf '%s\n' "${summary[@]}"
exit $status
