//! Shared pieces of vmbuild's benchmarks: finding the peers, running them as processes
//! that cannot outlive the benchmark, and reporting ratios.

pub mod console;
pub mod host;
pub mod peers;
pub mod report;
