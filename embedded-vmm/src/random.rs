//! Random bytes from the kernel (generation IDs, memory file names), read from
//! `/dev/urandom`, which never blocks once the host has booted.

use std::io::Read;

pub fn bytes<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut out = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut out)?;
    Ok(out)
}
