# vmbuild image builder, the part every recipe shares (the recipe is appended to it).
# The log, the progress lines on the user's terminal (fd 3), and the failure report the
# host reads: $XCHG/failure holds KIND, SUMMARY, then the failed step's last words.
set -u
X=$XCHG
LOG=$X/build.log
STEP=$X/step.log
exec 3>&2 >>"$LOG" 2>&1
say() {
	if [ "${QUIET:-0}" != 1 ]; then
		[ "${TTY:-0}" = 1 ] && printf '\r\033[K' >&3
		echo "vmbuild image build: $*" >&3
	fi
	read -r up _ </proc/uptime
	echo "== ${up} s (uptime): $*"
}
live() {
	[ "${QUIET:-0}" != 1 ] && [ "${TTY:-0}" = 1 ] && printf '\r\033[Kvmbuild image build: %s' "$*" >&3
}
# fail KIND SUMMARY: report for the host (which prints it) and stop. A full disk is the
# image's --size, whatever step ran into it.
fail() {
	kind=$1
	if grep -q "No space left on device" "$LOG" "$STEP" 2>/dev/null; then
		kind=disk
	fi
	{
		echo "$kind"
		echo "$2"
		[ -s "$STEP" ] && tail -n 25 "$STEP"
	} >"$X/failure"
	[ "${TTY:-0}" = 1 ] && printf '\r\033[K' >&3
	sync
	exit 1
}
# The end of a build: the host takes root.tar only with this mark.
finish() {
	read -r up _ </proc/uptime
	echo "== ${up} s (uptime): done"
	echo ok >"$X/result"
	sync
}
