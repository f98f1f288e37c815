//! A keyed hash for the forwarding path's small integer keys (port numbers, and a VLAN and
//! MAC address packed into one `u64`).
//!
//! std's default SipHash-1-3 costs about as much per frame as the rest of a table lookup.
//! A guest chooses its source MACs, so an unkeyed fast hash (FxHash) would let it fill
//! the table with colliding addresses and slow every port down; this one is a folded
//! 64×64→128-bit multiply with two per-table random keys (the construction of foldhash
//! and aHash's fallback), which keeps the keys out of a guest's reach while costing a
//! multiply per lookup.

use std::hash::{BuildHasher, Hasher};

/// Makes [`KeyedHasher`]s that share one random key pair.
#[derive(Clone, Copy, Debug)]
pub struct KeyedState {
    k0: u64,
    k1: u64,
}

impl KeyedState {
    /// Fresh keys from std's per-process random SipHash keys (no extra dependency).
    pub fn new() -> Self {
        let s = std::collections::hash_map::RandomState::new();
        let k0 = s.hash_one(0x5eed_u64);
        let k1 = s.hash_one(0xfeed_u64) | 1;
        KeyedState { k0, k1 }
    }
}

impl Default for KeyedState {
    fn default() -> Self {
        Self::new()
    }
}

impl BuildHasher for KeyedState {
    type Hasher = KeyedHasher;

    fn build_hasher(&self) -> KeyedHasher {
        KeyedHasher {
            state: self.k0,
            k1: self.k1,
        }
    }
}

pub struct KeyedHasher {
    state: u64,
    k1: u64,
}

#[inline]
fn folded_multiply(a: u64, b: u64) -> u64 {
    let full = u128::from(a) * u128::from(b);
    (full as u64) ^ ((full >> 64) as u64)
}

impl Hasher for KeyedHasher {
    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.state = folded_multiply(self.state ^ n, self.k1);
    }

    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    /// Any other key type: eight bytes at a time (not used on the forwarding path).
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    #[inline]
    fn finish(&self) -> u64 {
        // One more round so that keys differing only in high bits spread over the low
        // bits hashbrown uses for buckets.
        folded_multiply(self.state, self.k1.rotate_left(23) | 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn keys_that_differ_in_one_byte_spread_over_the_low_bits() {
        let s = KeyedState::new();
        // 4096 MACs differing only in their last two bytes, as a flood would make them.
        let low: HashSet<u64> = (0..4096u64).map(|n| s.hash_one(n << 48) & 0xfff).collect();
        assert!(low.len() > 2400, "only {} of 4096 buckets used", low.len());
    }

    #[test]
    fn two_tables_hash_differently() {
        let (a, b) = (KeyedState::new(), KeyedState::new());
        assert_ne!(a.hash_one(42u64), b.hash_one(42u64));
    }
}
