# The rpm recipe. Runs as root in a throwaway VM whose root is a Debian image with rpm
# (the kit has no rpm), so that whoever runs `vmbuild image build` needs no root: the
# scriptlets run chrooted in the new root, in a VM of their own, never on the host.
#
#   /build (read-only)  this script; rpms/ (every package); rpms.list (their file names)
#   $XCHG (read-write)  build.log; at the end root.tar, or `failure` (kind, summary,
#                       rpm's words)
#   $SCRATCH            a blank ext4 file system for the new root (/dev/vdb)
#
# Environment: EPOCH (SOURCE_DATE_EPOCH: the clock, the rpm database's install times,
# and every newer mtime in the result), DBPATH (the rpm database in the new root),
# TTY=1 when the user's stderr is a terminal, QUIET=1 for no progress lines.
#
# The recipe is what mock and dnf --installroot do: an empty database, then one rpm
# transaction for every package, so rpm orders them by their Requires(pre/post) and runs
# each scriptlet in the new root. Services are not started: a systemd scriptlet in a
# chroot only presets units. Every rpm error fails the build.
T=/target
LC_ALL=C
HOME=/root
# rpm >= 4.18 takes the install times in its database from it: the same packages give the
# same database.
SOURCE_DATE_EPOCH=$EPOCH
export LC_ALL HOME SOURCE_DATE_EPOCH

rpm_t() {
	rpm --root "$T" --dbpath "$DBPATH" --define "_db_backend sqlite" "$@"
}

# rpm_install TOTAL FILES...: one transaction; rpm's hash lines count progress.
rpm_install() {
	total=$1
	shift
	: >"$STEP"
	st=$(
		{
			# --force-debian: the builder's rpm is Debian's, which would warn that
			# it is not Debian's package manager.
			rpm_t --force-debian --install --verbose --hash --nosignature "$@" </dev/null 2>&1
			echo "exit $?"
		} | {
			n=0
			st=1
			while IFS= read -r line; do
				case "$line" in
				"exit "*) st=${line#exit } ;;
				*)
					echo "$line" >>"$STEP"
					# One line of hash marks per package, after rpm's own
					# Verifying and Preparing lines.
					case "$line" in
					Verifying* | Preparing* | Updating* | Cleaning*) ;;
					*"##"*)
						n=$((n + 1))
						name=$(echo "$line" | sed 's/^ *\([0-9]*:\)\{0,1\}\([^ ]*\).*/\2/')
						live "installing $n/$total $name"
						;;
					esac
					;;
				esac
			done
			echo "$st"
		}
	)
	cat "$STEP"
	return "$st"
}

# The kind of a failed step: a full disk is the image's --size, a failed scriptlet or
# a conflict is the packages'.
install_failed() {
	if grep -q -e "No space left on device" -e "more space on the" "$STEP" 2>/dev/null; then
		fail disk "the image's file system is full"
	fi
	pkg=$(sed -n 's/.*%[a-z]*(\([^)]*\)) scriptlet failed.*/\1/p' "$STEP" | head -n 1)
	if [ -n "$pkg" ]; then
		fail package "$pkg failed to install (its scriptlet failed)"
	fi
	if grep -q -e "conflicts with" -e "Failed dependencies" "$STEP"; then
		fail package "rpm refused the packages: $(grep -m 1 -e 'conflicts with' -e 'needed by' "$STEP" | sed 's/^[[:space:]]*//')"
	fi
	fail internal "rpm --install failed"
}

date -s "@$EPOCH" >/dev/null || fail internal "cannot set the clock to $EPOCH"
mkdir -p "$T"
mount -t ext4 "$SCRATCH" "$T" || fail internal "cannot mount the scratch disk"
mkdir -p "$T/proc" "$T/sys" "$T/dev"
mount -t proc proc "$T/proc"
mount -t sysfs sysfs "$T/sys"
mount -o bind /dev "$T/dev"

rpm_t --initdb || fail internal "rpm --initdb failed"
n=$(wc -l </build/rpms.list)
say "installing $n packages"
rpm_install "$n" $(sed 's|^|/build/rpms/|' /build/rpms.list) || install_failed
# rpm counts a failed %post or %posttrans as a warning and exits 0; the package is then
# installed but not set up, and the image would hide it.
if grep -q "scriptlet failed" "$STEP"; then
	install_failed
fi

say "checking the package database"
: >"$STEP"
got=$(rpm_t --query --all | wc -l)
if [ "$got" -ne "$n" ]; then
	rpm_t --query --all >"$STEP"
	fail audit "rpm installed $got of the $n packages"
fi
if ! rpm_t --verify --all --nofiles --noscripts >"$STEP" 2>&1; then
	cat "$STEP"
	fail audit "rpm --verify found broken dependencies"
fi

umount "$T/dev" "$T/sys" "$T/proc"
# What records when or how the image was built rather than what is in it; a database
# left open would leave its journal.
rm -rf "$T/tmp/"* "$T/var/tmp/"* "$T/var/cache/dnf/"* "$T/var/log/dnf"*
rm -f "$T$DBPATH/"*-shm "$T$DBPATH/"*-wal

say "packing the file system"
# Sorted, numeric, times clamped to EPOCH: the same files give the same bytes.
tar --create --file=- --sort=name --numeric-owner --format=pax \
	--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
	--mtime="@$EPOCH" --clamp-mtime --one-file-system --exclude=./lost+found \
	-C "$T" . >"$X/root.tar" || fail internal "cannot pack the file system (tar)"
umount "$T"
finish
