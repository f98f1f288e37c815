//! virtiofsd's command line on `vmbuild fs serve`, so that libvirt and virtiofsd wrapper
//! scripts can run vmbuild in its place. Every virtiofsd flag here is either done for real,
//! accepted because it names what vmbuild does anyway, or refused with one line saying
//! what to use instead; none is accepted and ignored.
//!
//! What libvirt (11.x, `src/qemu/qemu_virtiofs.c`) passes: `--print-capabilities` first
//! (to learn whether the binary takes separate options), then `--fd=N` and either
//! `--shared-dir DIR [--cache never|always] [--sandbox MODE] [--xattr]` (separate
//! options) or `-o source=DIR[,cache=..][,sandbox=..][,xattr|no_xattr][,flock|no_flock]
//! [,posix_lock|no_posix_lock]`, and `--thread-pool-size=N`, `--rlimit-nofile=N`,
//! `--log-level debug` or `-d`, and, for an unprivileged libvirt, `--uid-map`/`--gid-map`.

use std::path::PathBuf;

use clap::Args;
use virtiofs_bridge::CacheMode;

/// What `--print-capabilities` prints: the vhost-user.json back-end description libvirt
/// reads. Only what is true: options may be given separately (`--shared-dir`, `--cache`,
/// ...). Not "migrate-precopy" (the back-end has no device-state migration), nor the
/// ACL/security-label negotiation modes (neither is supported).
pub const CAPABILITIES: &str = r#"{
  "type": "fs",
  "features": [
    "separate-options"
  ]
}"#;

#[derive(Args, Debug, Default)]
#[command(next_help_heading = "virtiofsd compatibility (what each flag does is listed above)")]
pub struct VirtiofsdArgs {
    /// Print the vhost-user back-end capabilities (JSON, read by libvirt) and exit
    #[arg(long)]
    pub print_capabilities: bool,

    /// Serve on this inherited, already listening unix socket instead of --socket-path
    /// (what libvirt passes); the socket file stays the parent's to remove
    #[arg(long, value_name = "FD", allow_negative_numbers = true)]
    pub fd: Option<i64>,

    /// Legacy comma-separated options: source=DIR, cache=MODE, xattr, no_xattr, ... (repeatable)
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub compat: Vec<String>,

    /// Only `none`: vmbuild never chroots or enters namespaces
    #[arg(long, value_name = "MODE")]
    pub sandbox: Option<String>,

    /// error, warn, info, debug, trace or off: sets the log filter (RUST_LOG)
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// The same as --log-level debug
    #[arg(short = 'd')]
    pub debug: bool,

    /// Accepted: vmbuild always runs in the foreground
    #[arg(short = 'f', long)]
    pub foreground: bool,

    /// Refused: mount points in the share are not announced to the guest
    #[arg(long)]
    pub announce_submounts: bool,

    /// Accepted: what vmbuild does (mount points look like plain directories)
    #[arg(long)]
    pub no_announce_submounts: bool,

    /// Give the sockets vmbuild creates to this group (name or number)
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,

    /// Only `never`: inodes are held by O_PATH descriptors, never file handles
    #[arg(long, value_name = "WHEN")]
    pub inode_file_handles: Option<String>,

    /// Refused: vmbuild keeps the capabilities it was started with
    #[arg(long, value_name = "CAPS")]
    pub modcaps: Option<String>,

    /// Only `none`: vmbuild installs no seccomp filter
    #[arg(long, value_name = "ACTION")]
    pub seccomp: Option<String>,

    /// Refused: extended attribute names are not translated
    #[arg(long, value_name = "MAP")]
    pub xattrmap: Option<String>,

    /// Only `never`: POSIX ACLs are not served
    #[arg(long, value_name = "WHEN", num_args = 0..=1, require_equals = true,
          default_missing_value = "always")]
    pub posix_acl: Option<String>,

    /// Only `never`: security labels are not served
    #[arg(long, value_name = "WHEN", num_args = 0..=1, require_equals = true,
          default_missing_value = "always")]
    pub security_label: Option<String>,

    /// Refused: the guest clears setuid/setgid bits itself (KILLPRIV_V2 is never offered)
    #[arg(long)]
    pub killpriv_v2: bool,

    /// Accepted: what vmbuild does
    #[arg(long)]
    pub no_killpriv_v2: bool,

    /// Offer the guest a writeback cache on read-write shares (its writes reach the host
    /// when a file is closed or synced, not as they are made)
    #[arg(long)]
    pub writeback: bool,

    /// Accepted: vmbuild always honours O_DIRECT
    #[arg(long)]
    pub allow_direct_io: bool,

    /// Refused: logs go to stderr
    #[arg(long)]
    pub syslog: bool,

    /// Set the open-file limit (soft and hard) to N before serving; 0 leaves it unchanged
    #[arg(long, value_name = "N")]
    pub rlimit_nofile: Option<u64>,

    /// Refused: no ID mapping (run privileged: libvirt's qemu:///system)
    #[arg(long, value_name = "MAP")]
    pub uid_map: Vec<String>,

    /// Refused: no ID mapping (run privileged: libvirt's qemu:///system)
    #[arg(long, value_name = "MAP")]
    pub gid_map: Vec<String>,

    /// Refused: no ID translation
    #[arg(long, value_name = "MAP")]
    pub translate_uid: Vec<String>,

    /// Refused: no ID translation
    #[arg(long, value_name = "MAP")]
    pub translate_gid: Vec<String>,
}

/// What the virtiofsd flags asked for, once checked.
#[derive(Debug, Default, PartialEq)]
pub struct Compat {
    /// `-o source=DIR`
    pub source: Option<PathBuf>,
    /// `-o cache=MODE`
    pub cache: Option<CacheMode>,
    /// `-o xattr` / `-o no_xattr`
    pub xattr: Option<bool>,
    /// The RUST_LOG filter for `--log-level`, `-d`, `-o log_level=`, `-o debug`.
    pub log_filter: Option<&'static str>,
    pub socket_group: Option<libc::gid_t>,
    /// `--rlimit-nofile N` with N > 0.
    pub rlimit_nofile: Option<u64>,
    /// `--writeback`, `-o writeback`: the guest's writeback cache on read-write shares
    /// (off by default, as in virtiofsd).
    pub writeback: bool,
}

/// One line for a virtiofsd flag vmbuild does not do.
fn refuse(flag: &str, why: &str) -> String {
    format!("{flag} is not supported: {why}")
}

impl VirtiofsdArgs {
    /// Checks the virtiofsd flags; the error is one line for an exit 2.
    pub fn check(&self) -> Result<Compat, String> {
        let mut c = Compat::default();
        if let Some(fd) = self.fd {
            if fd < 0 || fd > i64::from(i32::MAX) {
                return Err(format!("--fd {fd}: not a file descriptor number"));
            }
        }
        if let Some(mode) = &self.sandbox {
            sandbox(mode)?;
        }
        if let Some(level) = &self.log_level {
            c.log_filter = Some(log_filter(level)?);
        }
        if self.debug {
            c.log_filter = Some(log_filter("debug")?);
        }
        if self.announce_submounts {
            return Err(refuse(
                "--announce-submounts",
                "mount points inside the share look to the guest like plain directories \
                 (drop it, or say --no-announce-submounts)",
            ));
        }
        if let Some(g) = &self.socket_group {
            c.socket_group = Some(group(g)?);
        }
        if let Some(w) = &self.inode_file_handles {
            if w != "never" {
                return Err(refuse(
                    &format!("--inode-file-handles={w}"),
                    "inodes are held by O_PATH descriptors (use --inode-file-handles=never)",
                ));
            }
        }
        if self.modcaps.is_some() {
            return Err(refuse(
                "--modcaps",
                "vmbuild keeps the capabilities it was started with (start it with the ones you want)",
            ));
        }
        if let Some(s) = &self.seccomp {
            if s != "none" {
                return Err(refuse(
                    &format!("--seccomp {s}"),
                    "vmbuild installs no seccomp filter (use --seccomp none)",
                ));
            }
        }
        if self.xattrmap.is_some() {
            return Err(refuse(
                "--xattrmap",
                "extended attribute names are passed through as they are",
            ));
        }
        for (flag, value) in [
            ("--posix-acl", &self.posix_acl),
            ("--security-label", &self.security_label),
        ] {
            if let Some(v) = value {
                if v != "never" {
                    return Err(refuse(
                        &format!("{flag}={v}"),
                        &format!("not served (use {flag}=never)"),
                    ));
                }
            }
        }
        if self.killpriv_v2 {
            return Err(refuse(
                "--killpriv-v2",
                "the guest clears setuid/setgid bits itself (--no-killpriv-v2, the default)",
            ));
        }
        c.writeback = self.writeback;
        if self.syslog {
            return Err(refuse(
                "--syslog",
                "logs go to stderr (pipe them to logger(1); libvirt keeps them in its log)",
            ));
        }
        c.rlimit_nofile = self.rlimit_nofile.filter(|&n| n > 0);
        for (flag, maps) in [
            ("--uid-map", &self.uid_map),
            ("--gid-map", &self.gid_map),
            ("--translate-uid", &self.translate_uid),
            ("--translate-gid", &self.translate_gid),
        ] {
            if !maps.is_empty() {
                return Err(refuse(
                    flag,
                    "guest IDs are host IDs (run it privileged, e.g. libvirt's qemu:///system)",
                ));
            }
        }
        for list in &self.compat {
            for opt in split_options(list) {
                legacy_option(&opt, &mut c)?;
            }
        }
        Ok(c)
    }
}

fn sandbox(mode: &str) -> Result<(), String> {
    match mode {
        "none" => Ok(()),
        "chroot" | "namespace" => Err(refuse(
            &format!("--sandbox {mode}"),
            "vmbuild does not chroot, enter namespaces or filter syscalls; it serves the \
             share with its own rights (use --sandbox none)",
        )),
        other => Err(format!(
            "--sandbox {other}: unknown mode (virtiofsd has namespace, chroot and none; vmbuild does none)"
        )),
    }
}

/// virtiofsd's log levels as a RUST_LOG filter. `info` is vmbuild's default: its own
/// notices and the libraries' warnings.
fn log_filter(level: &str) -> Result<&'static str, String> {
    Ok(match level {
        "off" => "off",
        "error" | "err" => "error",
        "warn" => "warn",
        "info" => "warn,vmbuild=info,virtiofs_bridge=info",
        "debug" => "debug",
        "trace" => "trace",
        other => {
            return Err(format!(
                "--log-level {other}: unknown level (use error, warn, info, debug, trace or off)"
            ))
        }
    })
}

fn group(name: &str) -> Result<libc::gid_t, String> {
    if let Ok(gid) = name.parse::<libc::gid_t>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(format!("--socket-group {name}: no such group")),
        Err(e) => Err(format!("--socket-group {name}: {e}")),
    }
}

/// Splits a `-o` list at commas; `,,` is a literal comma (libvirt escapes commas in paths
/// that way).
fn split_options(list: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = list.chars().peekable();
    while let Some(ch) = chars.next() {
        if ch == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                out.last_mut().unwrap().push(',');
            } else {
                out.push(String::new());
            }
        } else {
            out.last_mut().unwrap().push(ch);
        }
    }
    out.retain(|o| !o.is_empty());
    out
}

/// One option of virtiofsd's legacy `-o` list.
fn legacy_option(opt: &str, c: &mut Compat) -> Result<(), String> {
    let (key, value) = match opt.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (opt, None),
    };
    match (key, value) {
        ("source", Some(dir)) => c.source = Some(PathBuf::from(dir)),
        ("cache", Some(mode)) => {
            c.cache = Some(
                mode.parse::<CacheMode>()
                    .map_err(|e| format!("-o cache={mode}: {e}"))?,
            )
        }
        ("sandbox", Some(mode)) => sandbox(mode)?,
        ("log_level", Some(level)) => c.log_filter = Some(log_filter(level)?),
        ("debug", None) => c.log_filter = Some(log_filter("debug")?),
        ("xattr", None) => c.xattr = Some(true),
        ("no_xattr", None) => c.xattr = Some(false),
        // What vmbuild does anyway: locks stay in the guest (the lock requests are
        // answered ENOSYS, so the guest kernel keeps them local), READDIRPLUS is used,
        // O_DIRECT honoured, no KILLPRIV_V2, no ACLs or labels, mount points not
        // announced.
        ("writeback", None) => c.writeback = true,
        ("no_writeback", None) => c.writeback = false,
        ("no_flock" | "no_posix_lock" | "readdirplus" | "allow_direct_io"
        | "no_killpriv_v2" | "no_posix_acl" | "no_security_label" | "no_announce_submounts", None) => {}
        ("flock" | "posix_lock", None) => {
            return Err(refuse(
                &format!("-o {key}"),
                "locks stay inside the guest and are not taken on the host (drop it, or say no_flock / no_posix_lock)",
            ))
        }
        ("no_readdirplus" | "no_allow_direct_io" | "killpriv_v2" | "posix_acl"
        | "security_label" | "announce_submounts", None) => {
            return Err(refuse(
                &format!("-o {key}"),
                "vmbuild cannot switch this behaviour (see `vmbuild fs serve --help`)",
            ))
        }
        ("modcaps" | "xattrmap" | "timeout", Some(_)) => {
            return Err(refuse(
                &format!("-o {key}="),
                "see `vmbuild fs serve --help` (for timeout=, use cache=)",
            ))
        }
        _ => {
            return Err(format!(
                "-o {opt}: unknown option (vmbuild knows source=, cache=, sandbox=, log_level=, \
                 debug, xattr, no_xattr, no_flock, no_posix_lock and the virtiofsd defaults)"
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(o: &str) -> Result<Compat, String> {
        VirtiofsdArgs {
            compat: vec![o.into()],
            ..Default::default()
        }
        .check()
    }

    #[test]
    fn legacy_options_as_libvirt_writes_them() {
        let c = check("source=/srv/a,,b,cache=none,sandbox=none,no_xattr,no_flock,no_posix_lock")
            .unwrap();
        assert_eq!(c.source, Some(PathBuf::from("/srv/a,b")));
        assert_eq!(c.cache, Some(CacheMode::Never));
        assert_eq!(c.xattr, Some(false));
        assert!(check("source=/x,posix_lock")
            .unwrap_err()
            .contains("-o posix_lock is not supported"));
        assert!(check("source=/x,sandbox=namespace")
            .unwrap_err()
            .contains("--sandbox none"));
        let e = check("source=/x,frobnicate").unwrap_err();
        assert!(e.starts_with("-o frobnicate: unknown option"), "{e}");
    }

    #[test]
    fn flags_are_done_accepted_or_refused_never_ignored() {
        let ok = VirtiofsdArgs {
            log_level: Some("debug".into()),
            sandbox: Some("none".into()),
            seccomp: Some("none".into()),
            inode_file_handles: Some("never".into()),
            posix_acl: Some("never".into()),
            no_killpriv_v2: true,
            no_announce_submounts: true,
            allow_direct_io: true,
            foreground: true,
            socket_group: Some("0".into()),
            rlimit_nofile: Some(4096),
            ..Default::default()
        }
        .check()
        .unwrap();
        assert_eq!(ok.log_filter, Some("debug"));
        assert_eq!(ok.socket_group, Some(0));
        assert_eq!(ok.rlimit_nofile, Some(4096));
        for refused in [
            VirtiofsdArgs {
                announce_submounts: true,
                ..Default::default()
            },
            VirtiofsdArgs {
                sandbox: Some("namespace".into()),
                ..Default::default()
            },
            VirtiofsdArgs {
                modcaps: Some("+sys_admin".into()),
                ..Default::default()
            },
            VirtiofsdArgs {
                killpriv_v2: true,
                ..Default::default()
            },
            VirtiofsdArgs {
                syslog: true,
                ..Default::default()
            },
            VirtiofsdArgs {
                uid_map: vec![":0:1000:1:".into()],
                ..Default::default()
            },
            VirtiofsdArgs {
                log_level: Some("loud".into()),
                ..Default::default()
            },
        ] {
            let e = refused.check().unwrap_err();
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn writeback_is_off_unless_asked_for_and_the_last_word_wins() {
        let check = |writeback: bool, options: &[&str]| {
            VirtiofsdArgs {
                writeback,
                compat: options.iter().map(|o| o.to_string()).collect(),
                ..Default::default()
            }
            .check()
            .unwrap()
            .writeback
        };
        assert!(!check(false, &[]), "virtiofsd's default");
        assert!(check(true, &[]));
        assert!(check(false, &["writeback"]));
        assert!(!check(true, &["no_writeback"]));
        assert!(check(false, &["no_writeback,writeback"]));
    }
}
