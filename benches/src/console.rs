//! Reading a QEMU guest's serial console (a socket) in benchmarks.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::bail;

/// Reads `console` line by line until one contains `want`, for at most `timeout` per line.
pub fn wait_for_line(console: &UnixStream, want: &str, timeout: Duration) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    console.set_read_timeout(Some(timeout))?;
    for line in BufReader::new(console.try_clone()?).lines() {
        if line?.contains(want) {
            return Ok(());
        }
    }
    bail!("the guest never printed {want}")
}
