//! The memory backend: entries in this process, bounded by their size (`cache.max_bytes`), each served
//! until its TTL, the least recently used evicted first when a new entry needs the room.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::entry::Entry;
use super::key::Key;
use crate::observe::CacheMetrics;

/// A size-bounded LRU map with a TTL per entry.
pub struct Memory {
    inner: Mutex<Lru>,
    metrics: Arc<CacheMetrics>,
}

struct Lru {
    slots: HashMap<Key, Slot>,
    /// Last use → key: the first is the least recently used.
    order: BTreeMap<u64, Key>,
    clock: u64,
    bytes: u64,
    max_bytes: u64,
}

struct Slot {
    entry: Arc<Entry>,
    expires: Instant,
    used: u64,
    weight: u64,
}

impl Memory {
    pub fn new(max_bytes: u64, metrics: Arc<CacheMetrics>) -> Self {
        let lru = Lru { slots: HashMap::new(), order: BTreeMap::new(), clock: 0, bytes: 0, max_bytes };
        Self { inner: Mutex::new(lru), metrics }
    }

    fn lru(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The entry under `key`, if there is one still fresh.
    pub fn get(&self, key: &Key) -> Option<Arc<Entry>> {
        let now = Instant::now();
        let mut lru = self.lru();
        let Lru { slots, order, clock, .. } = &mut *lru;
        let slot = slots.get_mut(key)?;
        if slot.expires <= now {
            let weight = slot.weight;
            lru.remove(key);
            drop(lru);
            self.metrics.memory_changed(-1, -(weight as i64));
            return None;
        }
        order.remove(&slot.used);
        *clock += 1;
        slot.used = *clock;
        order.insert(*clock, *key);
        Some(slot.entry.clone())
    }

    /// Stores `entry` under `key` for `ttl`, evicting the least recently used entries to make room. An
    /// entry larger than the whole bound is not stored.
    pub fn put(&self, key: Key, entry: Arc<Entry>, ttl: Duration) {
        let weight = entry.weight();
        let expires = Instant::now().checked_add(ttl).unwrap_or_else(Instant::now);
        let (mut entries, mut bytes, mut evicted) = (0i64, 0i64, 0u64);
        {
            let mut lru = self.lru();
            if let Some(old) = lru.remove(&key) {
                entries -= 1;
                bytes -= old as i64;
            }
            if weight > lru.max_bytes {
                drop(lru);
                self.metrics.memory_changed(entries, bytes);
                return; // larger than the whole bound (and the stale entry is gone)
            }
            while lru.bytes + weight > lru.max_bytes {
                let Some((_, oldest)) = lru.order.pop_first() else { break };
                if let Some(old) = lru.remove(&oldest) {
                    entries -= 1;
                    bytes -= old as i64;
                    evicted += 1;
                }
            }
            lru.clock += 1;
            let used = lru.clock;
            lru.order.insert(used, key);
            lru.slots.insert(key, Slot { entry, expires, used, weight });
            lru.bytes += weight;
            entries += 1;
            bytes += weight as i64;
        }
        self.metrics.memory_changed(entries, bytes);
        self.metrics.evicted(evicted);
    }
}

impl Lru {
    /// Removes `key`, returning its weight.
    fn remove(&mut self, key: &Key) -> Option<u64> {
        let slot = self.slots.remove(key)?;
        self.order.remove(&slot.used);
        self.bytes -= slot.weight;
        Some(slot.weight)
    }
}

impl Drop for Memory {
    /// A store replaced by a reload gives its share of the gauges back.
    fn drop(&mut self) {
        let lru = self.lru();
        let (entries, bytes) = (lru.slots.len() as i64, lru.bytes as i64);
        drop(lru);
        self.metrics.memory_changed(-entries, -bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn entry(size: usize) -> Arc<Entry> {
        Arc::new(Entry {
            form: super::super::entry::Form::Json,
            content_type: Bytes::from_static(b"application/json"),
            body: Bytes::from(vec![b' '; size]),
            usage: None,
            stored_at: 0,
        })
    }

    fn key(n: u8) -> Key {
        Key([n; 32])
    }

    #[tokio::test(start_paused = true)]
    async fn never_holds_more_than_its_bound_and_evicts_the_least_recently_used() {
        let metrics = Arc::new(CacheMetrics::default());
        let memory = Memory::new(3 * entry(1000).weight(), metrics.clone());
        let hour = Duration::from_secs(3600);
        for n in 0..3 {
            memory.put(key(n), entry(1000), hour);
        }
        assert!(memory.get(&key(0)).is_some(), "0 is now the most recently used");
        memory.put(key(3), entry(1000), hour);
        assert!(memory.get(&key(1)).is_none(), "1 was the least recently used");
        assert!(memory.get(&key(0)).is_some() && memory.get(&key(3)).is_some());
        assert!(memory.lru().bytes <= 3 * entry(1000).weight());
        assert_eq!(metrics.evictions(), 1);
        memory.put(key(9), entry(10 * 1000), hour);
        assert!(memory.get(&key(9)).is_none(), "larger than the whole bound: not stored");
        assert_eq!(metrics.memory(), (3, 3 * entry(1000).weight() as i64));
        drop(memory);
        assert_eq!(metrics.memory(), (0, 0), "a dropped store gives its share back");
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_their_ttl() {
        let memory = Memory::new(1 << 20, Arc::new(CacheMetrics::default()));
        memory.put(key(1), entry(10), Duration::from_secs(60));
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(memory.get(&key(1)).is_some());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(memory.get(&key(1)).is_none());
        assert_eq!(memory.lru().bytes, 0);
    }
}
