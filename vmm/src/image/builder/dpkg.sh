# The dpkg recipe. Runs as root in a throwaway VM on the guest kit (busybox), so
# that whoever runs `vmbuild image build` needs no root: maintainer scripts chown, mknod
# and chroot in a VM of their own, never on the host.
#
#   /build (read-only)  this script; stage/*.tar (the required packages' files, made on
#                       the host with dpkg-deb --fsys-tarfile); debs/ (every package,
#                       its data.tar uncompressed on the host); core.list, required.list,
#                       extra.list (package file names, in install order)
#   $XCHG (read-write)  build.log; at the end root.tar, or `failure` (kind, summary,
#                       dpkg's words)
#   $SCRATCH            a blank ext4 file system for the new root (/dev/vda)
#
# Environment: EPOCH (SOURCE_DATE_EPOCH: the clock, and every newer mtime in the
# result), MIRROR, SUITE, COMPONENTS (the image's apt sources), USR_LINKS (the merged-/usr
# links), TTY=1 when the user's stderr is a terminal, QUIET=1 for no progress lines,
# UNPACK_ONLY=1 for a root with every package's files and nothing configured (stage/
# then holds every package; no dpkg runs): a builder's own root, whose programs need
# their files and libraries only.
#
# The recipe is debootstrap's second stage (dpkg --unpack, then --configure --pending,
# with services kept from starting), except that every dpkg error fails the build, and
# the result is a sorted tar with clamped times for `mke2fs -d` on the host.
# Every program in the new root is called by its path: a bare name would be busybox's
# applet of that name (busybox prefers its applets, and re-executes itself outside
# the chroot).
T=/target
DEBS=/var/cache/vmbuild-debs
# Maintainer scripts ask nothing and run in the C locale.
DEBIAN_FRONTEND=noninteractive
DEBCONF_NONINTERACTIVE_SEEN=true
LC_ALL=C
HOME=/root
export DEBIAN_FRONTEND DEBCONF_NONINTERACTIVE_SEEN LC_ALL HOME

# The kind of a failed step: a full disk is the image's --size, not a package's fault.
step_failed() {
	if grep -q "No space left on device" "$STEP" 2>/dev/null; then
		fail disk "the image's file system is full"
	fi
	# dpkg names the package whose maintainer script failed, or the archive it could not
	# unpack.
	pkg=$(sed -n 's/^dpkg: error processing \(package\|archive\) \([^ ]*\).*/\2/p' "$STEP" | tail -n 1)
	if [ -n "$pkg" ]; then
		fail package "${pkg##*/} failed to $1"
	fi
	fail internal "$1 failed"
}

# dpkg_run WHAT TOTAL ARGS...: dpkg in the new root; its status lines count progress.
# --force-unsafe-io: no fsync per unpacked file, as debootstrap and mmdebstrap build (a
# build that fails throws the scratch disk away; one that succeeds is packed from it).
dpkg_run() {
	what=$1
	total=$2
	shift 2
	: >"$STEP"
	st=$(
		{
			chroot "$T" /usr/bin/dpkg --force-unsafe-io --status-fd 9 "$@" 9>&1 >>"$STEP" 2>&1 </dev/null
			echo "exit $?"
		} | {
			n=0
			st=1
			while read -r a b c; do
				case "$a" in
				processing:)
					n=$((n + 1))
					[ "$n" -le "$total" ] && live "$what $n/$total ${c##*/}"
					;;
				exit) st=$b ;;
				esac
			done
			echo "$st"
		}
	)
	cat "$STEP"
	return "$st"
}

debs() {
	sed "s|^|$DEBS/|" "/build/$1"
}

date -s "@$EPOCH" >/dev/null || fail internal "cannot set the clock to $EPOCH"
mkdir -p "$T"
mount -t ext4 "$SCRATCH" "$T" || fail internal "cannot mount the scratch disk"

say "unpacking the required packages' files"
for d in $USR_LINKS; do
	mkdir -p "$T/usr/$d"
	ln -s "usr/$d" "$T/$d"
done
while read -r t; do
	tar -x -p --numeric-owner -f "/build/stage/$t" -C "$T" || fail internal "cannot extract $t"
done </build/stage.list
mkdir -p "$T/var/lib/dpkg/info" "$T/var/lib/dpkg/updates" "$T/proc" "$T/sys" "$T/dev" "$T$DEBS"
: >"$T/var/lib/dpkg/status"
[ -e "$T/var/lib/dpkg/available" ] || : >"$T/var/lib/dpkg/available"
[ -e "$T/usr/bin/awk" ] || ln -s mawk "$T/usr/bin/awk"
[ -e "$T/etc/localtime" ] || ln -s /usr/share/zoneinfo/UTC "$T/etc/localtime"

if [ "${UNPACK_ONLY:-0}" != 1 ]; then
	mount -t proc proc "$T/proc"
	mount -t sysfs sysfs "$T/sys"
	mount -o bind /dev "$T/dev"
	mount -o bind /build/debs "$T$DEBS"

	# Services never start while the image is filled: invoke-rc.d asks policy-rc.d (101:
	# forbidden); start-stop-daemon and initctl are diverted to stubs that do nothing.
	say "installing the core packages"
	while read -r f; do
		case "$f" in mawk_*) rm -f "$T/usr/bin/awk" ;; esac
		dpkg_run installing 1 --force-depends --install "$DEBS/$f" || step_failed install
	done </build/core.list

	printf '#!/bin/sh\nexit 101\n' >"$T/usr/sbin/policy-rc.d"
	chmod 755 "$T/usr/sbin/policy-rc.d"
	SSD=$(chroot "$T" /usr/bin/dpkg-query -L dpkg </dev/null | grep '/start-stop-daemon$' | head -n 1)
	[ -n "$SSD" ] || fail internal "dpkg has no start-stop-daemon"
	for f in "$SSD" /sbin/initctl; do
		chroot "$T" /usr/bin/dpkg-divert --quiet --local --rename --add "$f" </dev/null || fail internal "cannot divert $f"
		printf '#!/bin/sh\necho "vmbuild image build: $0 $* (a stub: no services while building)" >&2\nexit 0\n' >"$T$f"
		chmod 755 "$T$f"
	done

	n=$(wc -l </build/required.list)
	say "unpacking the $n required packages"
	dpkg_run unpacking "$n" --force-depends --unpack $(debs required.list) || step_failed unpack
	say "configuring the $n required packages"
	dpkg_run configuring "$n" --configure --pending --force-configure-any --force-depends ||
		step_failed configure

	n=$(wc -l </build/extra.list)
	if [ "$n" -gt 0 ]; then
		say "unpacking $n more packages"
		dpkg_run unpacking "$n" --unpack $(debs extra.list) || step_failed unpack
		say "configuring $n more packages"
		dpkg_run configuring "$n" --configure --pending || step_failed configure
	fi

	say "checking the package database"
	: >"$STEP"
	chroot "$T" /usr/bin/dpkg --audit >"$STEP" 2>&1
	if [ -s "$STEP" ]; then
		cat "$STEP"
		fail audit "dpkg --audit found packages that are not fully installed"
	fi
	if ! chroot "$T" /usr/bin/apt-get check -q >"$STEP" 2>&1; then
		cat "$STEP"
		fail audit "apt-get check found broken dependencies"
	fi

	for f in "$SSD" /sbin/initctl; do
		rm -f "$T$f"
		chroot "$T" /usr/bin/dpkg-divert --quiet --local --rename --remove "$f" || fail internal "cannot remove the diversion of $f"
	done
	rm -f "$T/usr/sbin/policy-rc.d"

	printf 'deb %s %s %s\n' "$MIRROR" "$SUITE" "$COMPONENTS" >"$T/etc/apt/sources.list"
	# What records when or how the image was built rather than what is in it.
	rm -f "$T/var/log/dpkg.log" "$T/var/log/alternatives.log" "$T/var/log/apt/"*.log \
		"$T/var/cache/ldconfig/aux-cache" "$T/var/lib/dpkg/"*-old "$T/var/cache/debconf/"*-old \
		"$T/var/cache/apt/"*.bin
	rm -rf "$T/tmp/"* "$T/var/tmp/"* "$T/var/lib/apt/lists/"*_*
	umount "$T$DEBS" "$T/dev" "$T/sys" "$T/proc"
	rmdir "$T$DEBS"
else
	rmdir "$T$DEBS"
fi

say "packing the file system"
# Sorted, numeric, times clamped to EPOCH: the same files give the same bytes.
chroot "$T" /usr/bin/tar --create --file=- --sort=name --numeric-owner --format=pax \
	--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
	--mtime="@$EPOCH" --clamp-mtime --one-file-system --exclude=./lost+found \
	-C / . >"$X/root.tar" || fail internal "cannot pack the file system (tar)"
umount "$T"
finish
