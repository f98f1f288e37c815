//! `vmbuild image` and `run --image` end to end: real archives (the host's Debian mirror),
//! real dpkg in the builder VM, real mke2fs; each test has a cache of its own
//! (`XDG_CACHE_HOME`), as a separate user would.

use std::path::Path;
use std::process::{Command, Output};

fn vmbuild(cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmbuild"))
        .args(args)
        .env("XDG_CACHE_HOME", cache)
        .env_remove("SOURCE_DATE_EPOCH")
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn build_json(cache: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["image", "build", "--json"];
    all.extend_from_slice(args);
    let out = vmbuild(cache, &all);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

fn no_images_in(cache: &Path) {
    let out = vmbuild(cache, &["image", "list", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 0, "{list}");
    let images = cache.join("vmbuild/images");
    let left: Vec<_> = std::fs::read_dir(&images)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "names" && n != "requests")
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "left in the image cache: {left:?}");
}

/// Wrong input: one line, exit 2, nothing started or cached.
#[test]
fn bad_input_is_one_line_and_exit_2() {
    let cache = tempfile::tempdir().unwrap();
    let c = cache.path();
    for (args, says) in [
        (
            vec!["image", "build", "--distro", "debian-99"],
            "unknown distribution 'debian-99'",
        ),
        (
            vec![
                "image",
                "build",
                "--distro",
                "ubuntu-24.04",
                "--arch",
                "i386",
            ],
            "has no i386",
        ),
        (
            vec![
                "image",
                "build",
                "--distro",
                "debian-12",
                "--packages=gcc,-oDir=/",
            ],
            "is not a package name",
        ),
        (
            vec!["image", "build", "--distro", "debian-12", "--size", "10M"],
            "at least 64 MiB",
        ),
        (
            vec![
                "image",
                "build",
                "--distro",
                "debian-12",
                "--deb",
                "/etc/hostname",
            ],
            "not a Debian package",
        ),
        (
            vec![
                "image",
                "build",
                "--distro",
                "debian-12",
                "--mirror",
                "ftp://x/debian",
            ],
            "http:// or https://",
        ),
        (
            vec![
                "image",
                "build",
                "--distro",
                "debian-12",
                "--packages",
                "vmbuild-no-such-package",
            ],
            "unknown package 'vmbuild-no-such-package' in debian-12 (amd64)",
        ),
        (
            vec![
                "image",
                "build",
                "--distro",
                "debian-12",
                "--mirror",
                "http://127.0.0.1:9/debian",
            ],
            "cannot use the archive http://127.0.0.1:9/debian bookworm",
        ),
        (
            vec!["run", "--image", "no-such-image", "--", "true"],
            "no image named 'no-such-image'",
        ),
        (
            vec!["image", "inspect", "no-such-image"],
            "no image named 'no-such-image'",
        ),
    ] {
        let out = vmbuild(c, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(
            err.contains(says),
            "{args:?} should say {says:?}: {}",
            text(&out)
        );
        assert!(!err.contains("panicked"), "{}", text(&out));
    }
    no_images_in(c);
}

/// The promise: the same inputs, built twice by two users (two caches), give the
/// same bytes; a second build of the same request is a cache hit in well under a second;
/// the image runs commands with the run's exit codes and shares, a run never changes it,
/// and it bootstraps into a snapshot that `build` revives.
#[test]
fn a_debian_12_image_is_byte_reproducible_cached_and_runs_commands() {
    let first = tempfile::tempdir().unwrap();
    let second = tempfile::tempdir().unwrap();
    let a = build_json(first.path(), &["--distro", "debian-12", "--quiet"]);
    assert_eq!(a["cache_hit"], false, "{a}");
    let b = build_json(second.path(), &["--distro", "debian-12", "--quiet"]);
    assert_eq!(a["key"], b["key"]);
    let (pa, pb) = (
        Path::new(a["path"].as_str().unwrap()).to_owned(),
        Path::new(b["path"].as_str().unwrap()).to_owned(),
    );
    let digest = sha256(&pa);
    assert_eq!(digest, sha256(&pb), "two builds of the same inputs differ");

    let hit = build_json(first.path(), &["--distro", "debian-12", "--quiet"]);
    assert_eq!(hit["cache_hit"], true, "{hit}");
    assert!(hit["seconds"].as_f64().unwrap() < 1.0, "{hit}");

    let inspect = vmbuild(first.path(), &["image", "inspect", "debian-12"]);
    assert_eq!(inspect.status.code(), Some(0), "{}", text(&inspect));
    let info: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(info["key"], a["key"]);
    let dpkg = info["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "dpkg")
        .unwrap_or_else(|| panic!("no dpkg in {info}"));
    assert!(
        dpkg["version"].as_str().unwrap().starts_with("1.21"),
        "{dpkg}"
    );

    let xchg = tempfile::tempdir().unwrap();
    // The build's stubs are gone: no policy-rc.d, no diversions, the real
    // start-stop-daemon.
    let script = "cat /etc/debian_version; id -u; echo HOME=$HOME; \
                  test -d /proc/self && test -c /dev/null && test -w /tmp && echo fs-ok; \
                  test ! -e /usr/sbin/policy-rc.d && echo no-policy-rc.d; \
                  echo diversions=$(dpkg-divert --list | grep -c 'local diversion'); \
                  start-stop-daemon --version | head -n 1; \
                  echo from-guest > /tmp/xchg/out; rm -rf /usr/share/doc; echo scribble > /etc/motd; \
                  exit 7";
    let run = vmbuild(
        first.path(),
        &[
            "run",
            "--quiet",
            "--image",
            "debian-12",
            "--xchg",
            xchg.path().to_str().unwrap(),
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    let out = stdout(&run);
    assert_eq!(run.status.code(), Some(7), "{}", text(&run));
    assert!(out.starts_with("12."), "{}", text(&run));
    assert!(
        out.contains("\n0\nHOME=/root\nfs-ok\nno-policy-rc.d\ndiversions=0\nstart-stop-daemon"),
        "{}",
        text(&run)
    );
    assert_eq!(
        std::fs::read_to_string(xchg.path().join("out")).unwrap(),
        "from-guest\n"
    );
    assert_eq!(sha256(&pa), digest, "a run changed the image");

    // The image as a snapshot's target: booted once and suspended, then every build
    // revives it and runs in the distribution, over SSH, with xchg.
    let snapshots = tempfile::tempdir().unwrap();
    let snap = snapshots.path().join("snap");
    let boot = vmbuild(
        first.path(),
        &[
            "bootstrap",
            "--profile",
            "image",
            "--image",
            "debian-12",
            "--out",
            snap.to_str().unwrap(),
        ],
    );
    assert_eq!(boot.status.code(), Some(0), "{}", text(&boot));
    let xchg = tempfile::tempdir().unwrap();
    let build = vmbuild(
        first.path(),
        &[
            "build",
            "--snapshot",
            snap.to_str().unwrap(),
            "--xchg",
            xchg.path().to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "cat /etc/debian_version; dpkg-query -W -f '${Version}' dpkg; echo; \
             echo ${LD_LIBRARY_PATH:-clean}; echo built > /tmp/xchg/result; exit 9",
        ],
    );
    assert_eq!(build.status.code(), Some(9), "{}", text(&build));
    let out = stdout(&build);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("12."), "{}", text(&build));
    assert!(lines[1].starts_with("1.21"), "{}", text(&build));
    // vmbuild's own libraries for sshd never leak into a session.
    assert_eq!(lines[2], "clean", "{}", text(&build));
    assert_eq!(
        std::fs::read_to_string(xchg.path().join("result")).unwrap(),
        "built\n"
    );
    assert_eq!(sha256(&pa), digest, "bootstrap changed the cached image");

    // gc keeps named images; rm takes the image and its name.
    let gc = vmbuild(first.path(), &["image", "gc"]);
    assert_eq!(gc.status.code(), Some(0), "{}", text(&gc));
    assert!(pa.is_file());
    let rm = vmbuild(first.path(), &["image", "rm", "debian-12"]);
    assert_eq!(rm.status.code(), Some(0), "{}", text(&rm));
    no_images_in(first.path());
}

/// i386: a 32-bit userland on the kit's 64-bit kernel (IA32 emulation).
#[test]
fn an_i386_image_runs_32_bit_programs() {
    let cache = tempfile::tempdir().unwrap();
    build_json(
        cache.path(),
        &["--distro", "debian-12", "--arch", "i386", "--quiet"],
    );
    let run = vmbuild(
        cache.path(),
        &[
            "run",
            "--quiet",
            "--image",
            "debian-12-i386",
            "--",
            "sh",
            "-c",
            "dpkg --print-architecture; getconf LONG_BIT; linux32 uname -m; uname -m; \
             od -An -tx1 -j4 -N1 /usr/bin/true",
        ],
    );
    assert_eq!(run.status.code(), Some(0), "{}", text(&run));
    let lines: Vec<String> = stdout(&run).lines().map(|l| l.trim().to_owned()).collect();
    // ELF class 01: a 32-bit binary; the kernel stays x86_64.
    assert_eq!(
        lines,
        ["i386", "32", "i686", "x86_64", "01"],
        "{}",
        text(&run)
    );
}

/// A package whose maintainer script fails fails the build, named with dpkg's words
/// (vmTools' `|| true` would have hidden it), and nothing is cached. So does a --size the
/// packages do not fit in.
#[test]
fn a_failing_package_or_a_full_disk_fails_the_build_and_caches_nothing() {
    let cache = tempfile::tempdir().unwrap();
    let pkg = tempfile::tempdir().unwrap();
    let root = pkg.path().join("root");
    std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
    std::fs::write(
        root.join("DEBIAN/control"),
        "Package: vmbuild-test-broken\nVersion: 1.0\nArchitecture: all\n\
         Maintainer: vmbuild tests <tests@example.invalid>\nDescription: fails to configure\n",
    )
    .unwrap();
    let postinst = root.join("DEBIAN/postinst");
    std::fs::write(
        &postinst,
        "#!/bin/sh\necho 'vmbuild-test-broken: configure fails on purpose' >&2\nexit 3\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&postinst, std::fs::Permissions::from_mode(0o755)).unwrap();
    let deb = pkg.path().join("broken.deb");
    let built = Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&root)
        .arg(&deb)
        .output()
        .unwrap();
    assert!(built.status.success(), "{}", text(&built));

    let out = vmbuild(
        cache.path(),
        &[
            "image",
            "build",
            "--distro",
            "debian-12",
            "--deb",
            deb.to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        err.contains("vmbuild-test-broken failed to configure"),
        "{}",
        text(&out)
    );
    assert!(err.contains("configure fails on purpose"), "{}", text(&out));
    no_images_in(cache.path());

    let out = vmbuild(
        cache.path(),
        &["image", "build", "--distro", "debian-12", "--size", "100M"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        err.contains("do not fit in --size 100 MiB"),
        "{}",
        text(&out)
    );
    no_images_in(cache.path());
}

/// Builds an rpm from `spec` with rpmbuild (sources from `sources`) into `repo`.
fn rpmbuild(spec: &str, name: &str, sources: &Path, repo: &Path) {
    let top = sources.join("top");
    let spec_path = sources.join(format!("{name}.spec"));
    std::fs::write(&spec_path, spec).unwrap();
    let out = Command::new("rpmbuild")
        .args(["-bb", "--quiet"])
        .arg("--define")
        .arg(format!("_topdir {}", top.display()))
        .arg("--define")
        .arg(format!("_sourcedir {}", sources.display()))
        .arg("--define")
        .arg(format!("_rpmdir {}", repo.display()))
        .args([
            "--define",
            "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm",
        ])
        .args(["--define", "use_source_date_epoch_as_buildtime 1"])
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .arg(&spec_path)
        .output()
        .expect("rpmbuild (Debian package rpm; scripts/install-host-deps.sh installs it)");
    assert!(out.status.success(), "rpmbuild {name}: {}", text(&out));
}

/// A local rpm repository made here with rpmbuild and createrepo_c: a base with a
/// shell (the kit's static busybox), a package with a %post scriptlet that depends on it,
/// and one whose %post fails.
fn rpm_repo(dir: &Path) -> std::path::PathBuf {
    let kit = std::env::var_os("VMBUILD_GUEST_KIT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/var/cache/vmbuild/guest-kit".into());
    let busybox = Command::new("cpio")
        .args(["-i", "--quiet", "--to-stdout", "bin/busybox"])
        .stdin(std::fs::File::open(kit.join("initrd.img")).unwrap())
        .output()
        .unwrap();
    assert!(busybox.stdout.len() > 100_000, "no busybox in the kit");
    std::fs::write(dir.join("busybox"), &busybox.stdout).unwrap();
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    rpmbuild(
        "Name: vmbt-base\nVersion: 1.0\nRelease: 1\nSummary: a shell\nLicense: GPL-2.0\n\
         BuildArch: x86_64\nProvides: /bin/sh\n%description\nbusybox as /bin/sh\n\
         %install\nmkdir -p %{buildroot}/usr/bin %{buildroot}/etc\n\
         install -m 755 %{_sourcedir}/busybox %{buildroot}/usr/bin/busybox\n\
         for a in sh cat echo ls mkdir uname; do ln -s busybox %{buildroot}/usr/bin/$a; done\n\
         ln -s usr/bin %{buildroot}/bin\n\
         echo 'root:x:0:0:root:/root:/bin/sh' > %{buildroot}/etc/passwd\n\
         %files\n/usr/bin/*\n/bin\n/etc/passwd\n",
        "vmbt-base",
        dir,
        &repo,
    );
    rpmbuild(
        "Name: vmbt-hello\nVersion: 2.1\nRelease: 3\nSummary: hello\nLicense: MIT\n\
         BuildArch: noarch\nRequires: vmbt-base\nRequires(post): /bin/sh\n%description\nhello\n\
         %install\nmkdir -p %{buildroot}/usr/bin\n\
         printf '#!/bin/sh\\necho hello from an rpm\\n' > %{buildroot}/usr/bin/vmbt-hello\n\
         chmod 755 %{buildroot}/usr/bin/vmbt-hello\n\
         %post\nmkdir -p /var/lib/vmbt-hello && echo \"configured $1\" > /var/lib/vmbt-hello/state\n\
         %files\n/usr/bin/vmbt-hello\n",
        "vmbt-hello",
        dir,
        &repo,
    );
    rpmbuild(
        "Name: vmbt-broken\nVersion: 1\nRelease: 1\nSummary: fails\nLicense: MIT\n\
         BuildArch: noarch\nRequires: vmbt-base\nRequires(post): /bin/sh\n%description\nfails\n\
         %install\nmkdir -p %{buildroot}/usr/share/vmbt-broken\n\
         echo x > %{buildroot}/usr/share/vmbt-broken/x\n\
         %post\necho 'vmbt-broken: post fails on purpose' >&2\nexit 3\n\
         %files\n/usr/share/vmbt-broken/x\n",
        "vmbt-broken",
        dir,
        &repo,
    );
    let out = Command::new("createrepo_c")
        .arg("-q")
        .arg(&repo)
        .output()
        .expect("createrepo_c (Debian package createrepo-c)");
    assert!(out.status.success(), "createrepo_c: {}", text(&out));
    repo
}

/// The rpm installer, with real rpm packages (built here: no rpm distribution's archive
/// is reachable from these machines): dnf resolves the closure, rpm installs it in one
/// transaction in the builder VM (a Debian image with rpm, built by vmbuild itself), the
/// scriptlets run, the database is byte-reproducible, and a failing %post (which rpm
/// itself only warns about) fails the build with nothing cached.
#[test]
fn an_rpm_image_from_a_local_repository_is_reproducible_and_runs_commands() {
    let cache = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let repo = rpm_repo(work.path());
    let repo = repo.to_str().unwrap();
    let build = |packages: &str| {
        let args = [
            "--distro",
            "rpm-local",
            "--mirror",
            repo,
            "--packages",
            packages,
            "--size",
            "128M",
            "--quiet",
        ];
        build_json(cache.path(), &args)
    };
    let first = build("vmbt-hello");
    let inspect = vmbuild(cache.path(), &["image", "inspect", "rpm-local"]);
    assert_eq!(inspect.status.code(), Some(0), "{}", text(&inspect));
    let info: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let names: Vec<&str> = info["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{first}");
    assert!(
        names.contains(&"vmbt-base") && names.contains(&"vmbt-hello"),
        "{first}"
    );
    let image = first["path"].as_str().unwrap().to_owned();
    let digest = sha256(Path::new(&image));

    let run = vmbuild(
        cache.path(),
        &[
            "run",
            "--quiet",
            "--image",
            "rpm-local",
            "--",
            "sh",
            "-c",
            "vmbt-hello; cat /var/lib/vmbt-hello/state; ls /usr/lib/sysimage/rpm",
        ],
    );
    assert_eq!(run.status.code(), Some(0), "{}", text(&run));
    let lines: Vec<String> = stdout(&run).lines().map(|l| l.trim().to_owned()).collect();
    // $1 is 1 in %post on a first install; the database is sqlite, where Fedora keeps it.
    assert_eq!(
        lines[..3],
        ["hello from an rpm", "configured 1", "rpmdb.sqlite"],
        "{}",
        text(&run)
    );

    // Rebuilt from scratch: the same bytes, database and all.
    let rm = vmbuild(cache.path(), &["image", "rm", "rpm-local"]);
    assert_eq!(rm.status.code(), Some(0), "{}", text(&rm));
    let again = build("vmbt-hello");
    assert_eq!(again["cache_hit"], false, "{again}");
    assert_eq!(sha256(Path::new(again["path"].as_str().unwrap())), digest);

    let out = vmbuild(
        cache.path(),
        &[
            "image",
            "build",
            "--distro",
            "rpm-local",
            "--mirror",
            repo,
            "--packages",
            "vmbt-broken",
            "--size",
            "128M",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        err.contains("vmbt-broken-1-1.noarch failed to install"),
        "{}",
        text(&out)
    );
    assert!(err.contains("post fails on purpose"), "{}", text(&out));

    let out = vmbuild(
        cache.path(),
        &[
            "image",
            "build",
            "--distro",
            "rpm-local",
            "--mirror",
            repo,
            "--packages",
            "vmbt-nosuch",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown package 'vmbt-nosuch'"),
        "{}",
        text(&out)
    );
    // Only the good image and the builder's own are cached.
    let list = vmbuild(cache.path(), &["image", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let distros: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["distro"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(distros.len(), 2, "{list}");
}
