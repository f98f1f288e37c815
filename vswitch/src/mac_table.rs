//! The learning table: which port a (VLAN, MAC) was last seen on.
//!
//! Bounded: when full, the entry learned or refreshed longest ago makes room, so a flood of
//! source MACs churns the table instead of growing it or freezing it, and a host that keeps
//! talking through the flood keeps its entry. Eviction order is kept in a queue with lazy
//! deletion (an entry refreshed later leaves a stale queue slot that is skipped), so
//! learning and eviction are O(1) amortised, not a scan.

use std::collections::{HashMap, VecDeque};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::fast_hash::KeyedState;
use crate::frame::Mac;
use crate::port::PortId;

pub const DEFAULT_CAPACITY: usize = 4096;
/// The most entries a table may be given: a million is plenty for any L2 segment, and
/// the bound keeps a typo from asking for gigabytes.
pub const MAX_CAPACITY: usize = 1 << 20;
pub const DEFAULT_AGING: Duration = Duration::from_secs(300);

/// A moment as the table keeps it: nanoseconds since the process's first table. Comparing
/// two is an integer compare; comparing two `Instant`s normalises a timespec, and the
/// forwarding path compares one per frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tick(u64);

impl Tick {
    fn since(self, earlier: Tick) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl From<Instant> for Tick {
    fn from(now: Instant) -> Tick {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        let epoch = *EPOCH.get_or_init(Instant::now);
        Tick(now.saturating_duration_since(epoch).as_nanos() as u64)
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    port: PortId,
    last_seen: Tick,
    /// Generation of the queue slot that speaks for this entry.
    generation: u64,
}

/// One row of the table as the management console shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MacRow {
    pub vlan: u16,
    pub mac: String,
    pub port: PortId,
    pub age_secs: f64,
}

/// A VLAN and a MAC address in one word: what the table is keyed by.
type Key = u64;

fn key(vlan: u16, mac: &Mac) -> Key {
    let mut word = [0u8; 8];
    word[..2].copy_from_slice(&vlan.to_be_bytes());
    word[2..].copy_from_slice(mac);
    u64::from_be_bytes(word)
}

fn unkey(key: Key) -> (u16, Mac) {
    let word = key.to_be_bytes();
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&word[2..]);
    (u16::from_be_bytes([word[0], word[1]]), mac)
}

pub struct MacTable {
    entries: HashMap<Key, Entry, KeyedState>,
    order: VecDeque<(Key, u64)>,
    next_generation: u64,
    capacity: usize,
    aging: Duration,
    evictions: u64,
}

/// What learning a source address did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    New,
    Refreshed,
    /// The address was on another port before (a VM migrated, a cable moved).
    Moved {
        from: PortId,
    },
}

impl MacTable {
    pub fn new(capacity: usize, aging: Duration) -> Self {
        // Fixes the epoch of [`Tick`] before any moment this table is given.
        let _ = Tick::from(Instant::now());
        MacTable {
            entries: HashMap::with_capacity_and_hasher(capacity.min(1 << 16), KeyedState::new()),
            order: VecDeque::new(),
            next_generation: 0,
            capacity: capacity.max(1),
            aging,
            evictions: 0,
        }
    }

    pub fn learn(&mut self, vlan: u16, mac: Mac, port: PortId, now: impl Into<Tick>) -> Learned {
        let now = now.into();
        let key = key(vlan, &mac);
        let generation = self.next_generation;
        self.next_generation += 1;
        let result = match self.entries.get_mut(&key) {
            Some(e) => {
                let was = e.port;
                // Refreshing every frame would push one queue slot per frame; refresh the
                // queue position only when the entry is noticeably older: in time, or in
                // learning order (half a table of addresses learned since its slot). The
                // second keeps a host that talks from becoming the oldest when a flood of
                // new addresses fills the table faster than the clock moves.
                let stale = now.since(e.last_seen) > self.aging / 8
                    || generation - e.generation > self.capacity as u64 / 2;
                e.last_seen = now;
                e.port = port;
                if stale || was != port {
                    e.generation = generation;
                    self.order.push_back((key, generation));
                }
                if was != port {
                    Learned::Moved { from: was }
                } else {
                    Learned::Refreshed
                }
            }
            None => {
                while self.entries.len() >= self.capacity {
                    self.evict_oldest();
                }
                self.entries.insert(
                    key,
                    Entry {
                        port,
                        last_seen: now,
                        generation,
                    },
                );
                self.order.push_back((key, generation));
                Learned::New
            }
        };
        self.compact_queue();
        result
    }

    /// The port a (VLAN, MAC) lives on, unless unknown or aged out.
    pub fn lookup(&self, vlan: u16, mac: &Mac, now: impl Into<Tick>) -> Option<PortId> {
        let e = self.entries.get(&key(vlan, mac))?;
        (now.into().since(e.last_seen) <= self.aging).then_some(e.port)
    }

    /// Forgets entries older than the aging time; returns how many.
    pub fn age(&mut self, now: Instant) -> usize {
        let now = Tick::from(now);
        let before = self.entries.len();
        let aging = self.aging;
        self.entries.retain(|_, e| now.since(e.last_seen) <= aging);
        self.compact_queue();
        before - self.entries.len()
    }

    /// Forgets everything learned on `port` (it was removed).
    pub fn forget_port(&mut self, port: PortId) {
        self.entries.retain(|_, e| e.port != port);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    pub fn rows(&self, now: Instant) -> Vec<MacRow> {
        let now = Tick::from(now);
        let mut rows: Vec<MacRow> = self
            .entries
            .iter()
            .map(|(key, e)| {
                let (vlan, mac) = unkey(*key);
                MacRow {
                    vlan,
                    mac: crate::frame::format_mac(&mac),
                    port: e.port,
                    age_secs: now.since(e.last_seen).as_secs_f64(),
                }
            })
            .collect();
        rows.sort_by(|a, b| (a.vlan, &a.mac).cmp(&(b.vlan, &b.mac)));
        rows
    }

    fn evict_oldest(&mut self) {
        while let Some((key, generation)) = self.order.pop_front() {
            if self
                .entries
                .get(&key)
                .is_some_and(|e| e.generation == generation)
            {
                self.entries.remove(&key);
                self.evictions += 1;
                return;
            }
        }
        // The queue always speaks for every live entry; if it ran dry, drop any entry.
        if let Some(key) = self.entries.keys().next().copied() {
            self.entries.remove(&key);
            self.evictions += 1;
        }
    }

    /// Keeps the queue from growing without bound through stale slots.
    fn compact_queue(&mut self) {
        if self.order.len() > 4 * self.capacity + 64 {
            let entries = &self.entries;
            self.order.retain(|(key, generation)| {
                entries
                    .get(key)
                    .is_some_and(|e| e.generation == *generation)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u32) -> Mac {
        let b = n.to_be_bytes();
        [2, 0, b[0], b[1], b[2], b[3]]
    }

    #[test]
    fn learns_looks_up_and_moves() {
        let mut t = MacTable::new(16, DEFAULT_AGING);
        let now = Instant::now();
        assert_eq!(t.learn(1, mac(1), 3, now), Learned::New);
        assert_eq!(t.lookup(1, &mac(1), now), Some(3));
        assert_eq!(t.lookup(2, &mac(1), now), None, "VLANs are separate tables");
        assert_eq!(t.learn(1, mac(1), 3, now), Learned::Refreshed);
        assert_eq!(t.learn(1, mac(1), 5, now), Learned::Moved { from: 3 });
        assert_eq!(t.lookup(1, &mac(1), now), Some(5));
    }

    #[test]
    fn entries_age_out() {
        let mut t = MacTable::new(16, Duration::from_secs(10));
        let t0 = Instant::now();
        t.learn(1, mac(1), 1, t0);
        t.learn(1, mac(2), 1, t0 + Duration::from_secs(8));
        let later = t0 + Duration::from_secs(11);
        assert_eq!(t.lookup(1, &mac(1), later), None);
        assert_eq!(t.lookup(1, &mac(2), later), Some(1));
        assert_eq!(t.age(later), 1);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_flood_keeps_the_table_bounded_and_evicts_the_oldest() {
        let mut t = MacTable::new(4096, DEFAULT_AGING);
        let t0 = Instant::now();
        // A busy host learned first and keeps talking.
        t.learn(1, mac(0), 7, t0);
        for i in 1..100_000u32 {
            let now = t0 + Duration::from_micros(u64::from(i));
            t.learn(1, mac(i), 1, now);
            if i % 1000 == 0 {
                t.learn(1, mac(0), 7, now + Duration::from_secs(60));
            }
            assert!(t.len() <= 4096);
        }
        assert_eq!(t.len(), 4096);
        assert!(t.evictions() >= 100_000 - 4096 - 1);
        assert_eq!(
            t.lookup(1, &mac(99_999), t0 + Duration::from_secs(1)),
            Some(1)
        );
        assert_eq!(t.lookup(1, &mac(5), t0 + Duration::from_secs(1)), None);
        assert!(t.order.len() <= 4 * 4096 + 64 + 1);
    }

    /// All within one instant, as a flood is: a host that keeps talking is never evicted.
    #[test]
    fn a_host_that_keeps_talking_survives_a_flood() {
        let mut t = MacTable::new(4096, DEFAULT_AGING);
        let now = Instant::now();
        t.learn(1, mac(0), 7, now);
        for i in 1..100_000u32 {
            t.learn(1, mac(i), 1, now);
            if i % 1000 == 0 {
                assert_eq!(t.lookup(1, &mac(0), now), Some(7), "evicted by {i} others");
                assert_eq!(t.learn(1, mac(0), 7, now), Learned::Refreshed);
            }
        }
        assert_eq!(t.len(), 4096);
        assert!(t.order.len() <= 4 * 4096 + 64 + 1);
    }

    #[test]
    fn rows_give_back_the_vlan_and_address_learned() {
        let mut t = MacTable::new(16, DEFAULT_AGING);
        let now = Instant::now();
        t.learn(4094, [0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54], 9, now);
        t.learn(1, mac(1), 2, now);
        let rows = t.rows(now);
        assert_eq!(
            (rows[0].vlan, rows[0].mac.as_str(), rows[0].port),
            (1, "02:00:00:00:00:01", 2)
        );
        assert_eq!(
            (rows[1].vlan, rows[1].mac.as_str(), rows[1].port),
            (4094, "fe:dc:ba:98:76:54", 9)
        );
    }

    #[test]
    fn forgetting_a_port() {
        let mut t = MacTable::new(16, DEFAULT_AGING);
        let now = Instant::now();
        t.learn(1, mac(1), 1, now);
        t.learn(1, mac(2), 2, now);
        t.forget_port(1);
        assert_eq!(t.lookup(1, &mac(1), now), None);
        assert_eq!(t.lookup(1, &mac(2), now), Some(2));
    }
}
