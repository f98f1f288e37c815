//! The open-file limit, raised to what the host allows.
//!
//! A share holds one `O_PATH` descriptor per file the guest has looked up (the
//! passthrough engine names files by descriptor, so no path can be swapped under it), so a
//! guest that walks a store of a few thousand files needs a few thousand descriptors, on
//! top of the store's open files and every socket. The soft limit many hosts start
//! processes with is 1,024 (the hard limit is often far higher); a walk past it failed
//! with "Too many open files", in the guest and in the xchg share beside it. Like
//! virtiofsd, vmbuild raises its soft limit to the hard limit at start. It uses no
//! `select(2)`, the one reason to keep descriptors below 1,024; the QEMUs it starts
//! inherit the limit, as they would raise it themselves.

/// Raises the soft RLIMIT_NOFILE to the hard limit; a failure is logged, never fatal
/// (the old limit still works for small shares).
pub fn raise() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    if limit.rlim_cur >= limit.rlim_max {
        return;
    }
    let from = limit.rlim_cur;
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit(2) reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        tracing::debug!(
            "could not raise the open-file limit from {from}: {}",
            std::io::Error::last_os_error()
        );
    } else {
        tracing::debug!("open-file limit raised from {from} to {}", limit.rlim_max);
    }
}
