//! Counters a share keeps while it serves: what was served, what was refused, and what was
//! malformed. Read by tests, by `vmbuild fs serve` at exit, and by benchmarks.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct ShareStats {
    requests: AtomicU64,
    /// Requests the FUSE layer could not decode or answer (truncated headers, lengths beyond
    /// the buffer, ...). The guest gets an error reply or an empty used element.
    malformed: AtomicU64,
    /// Descriptor chains that pointed outside guest memory or were otherwise unusable.
    bad_descriptors: AtomicU64,
    /// Mutating requests refused on a read-only share.
    erofs: AtomicU64,
    /// Front-end connections accepted (a QEMU restart shows up as a second one).
    connections: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub requests: u64,
    pub malformed: u64,
    pub bad_descriptors: u64,
    pub erofs: u64,
    pub connections: u64,
}

impl ShareStats {
    pub(crate) fn count_request(&self) {
        self.requests.fetch_add(1, Relaxed);
    }
    pub(crate) fn count_malformed(&self) {
        self.malformed.fetch_add(1, Relaxed);
    }
    pub(crate) fn count_bad_descriptor(&self) {
        self.bad_descriptors.fetch_add(1, Relaxed);
    }
    pub(crate) fn count_erofs(&self) {
        self.erofs.fetch_add(1, Relaxed);
    }
    pub(crate) fn count_connection(&self) {
        self.connections.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.load(Relaxed),
            malformed: self.malformed.load(Relaxed),
            bad_descriptors: self.bad_descriptors.load(Relaxed),
            erofs: self.erofs.load(Relaxed),
            connections: self.connections.load(Relaxed),
        }
    }
}

/// One readable line: `12 requests, 1 connection, 0 malformed, 0 bad descriptors, 0 refused
/// (read-only)`.
impl std::fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plural =
            |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
        write!(
            f,
            "{}, {}, {} malformed, {}, {} refused (read-only)",
            plural(self.requests, "request", "requests"),
            plural(self.connections, "connection", "connections"),
            self.malformed,
            plural(self.bad_descriptors, "bad descriptor", "bad descriptors"),
            self.erofs
        )
    }
}

#[cfg(test)]
mod tests {
    use super::StatsSnapshot;

    #[test]
    fn a_snapshot_reads_as_one_line() {
        let s = StatsSnapshot {
            requests: 12,
            connections: 1,
            ..Default::default()
        };
        assert_eq!(
            s.to_string(),
            "12 requests, 1 connection, 0 malformed, 0 bad descriptors, 0 refused (read-only)"
        );
    }
}
