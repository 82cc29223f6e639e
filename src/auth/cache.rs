//! A short-lived, bounded cache of key lookups, so the hot path stays off the
//! database.
//!
//! An entry lives `ttl` at most, which bounds how long another node keeps
//! accepting a key revoked (or a tenant suspended) elsewhere. Changes made on
//! this node evict at once through [`ChangeListener`]. Unknown key ids are
//! cached too, so garbage keys cannot hammer the database. Past its TTL an
//! entry is kept a while longer (the stale window) for the one case where
//! an old answer beats none: the database is unreachable. Hand-written
//! rather than a cache crate because the rules that matter are these few:
//! a hard TTL, a hard size bound, and invalidate-everything on tenant change.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::tenancy::{ChangeListener, KeyForAuth};

/// A looked-up key: `None` when no such key exists.
pub type Lookup = Option<Arc<KeyForAuth>>;

pub struct KeyCache {
    ttl: Duration,
    stale_window: Duration,
    capacity: usize,
    entries: RwLock<HashMap<String, (Instant, Lookup)>>,
}

impl KeyCache {
    pub fn new(ttl: Duration, capacity: usize) -> KeyCache {
        KeyCache {
            ttl,
            stale_window: Duration::ZERO,
            capacity: capacity.max(1),
            entries: RwLock::new(HashMap::new()),
        }
    }

    /// Keeps entries `window` past their TTL for [`KeyCache::get_stale`].
    pub fn with_stale_window(mut self, window: Duration) -> KeyCache {
        self.stale_window = window;
        self
    }

    /// The cached lookup for `key_id`, fresh or within the stale window:
    /// only for when the database cannot answer.
    pub fn get_stale(&self, key_id: &str) -> Option<Lookup> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let (at, lookup) = entries.get(key_id)?;
        (at.elapsed() < self.ttl + self.stale_window).then(|| lookup.clone())
    }

    /// The cached lookup for `key_id`, if fresh.
    pub fn get(&self, key_id: &str) -> Option<Lookup> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let (at, lookup) = entries.get(key_id)?;
        (at.elapsed() < self.ttl).then(|| lookup.clone())
    }

    pub fn put(&self, key_id: &str, lookup: Lookup) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= self.capacity {
            let keep = self.ttl + self.stale_window;
            entries.retain(|_, (at, _)| at.elapsed() < keep);
            if entries.len() >= self.capacity {
                // Everything is fresh and the cache is full: start over rather
                // than grow. Costs one database round trip per key.
                entries.clear();
            }
        }
        entries.insert(key_id.to_owned(), (Instant::now(), lookup));
    }

    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ChangeListener for KeyCache {
    fn tenant_changed(&self, _tenant_id: &str) {
        // Tenant changes are rare admin actions; dropping everything is
        // simple and cannot miss a key of that tenant.
        self.entries
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn key_changed(&self, key_id: &str) {
        self.entries
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_and_the_size_stays_bounded() {
        let cache = KeyCache::new(Duration::from_millis(30), 3);
        cache.put("a", None);
        assert!(cache.get("a").is_some(), "fresh entry");
        std::thread::sleep(Duration::from_millis(40));
        assert!(cache.get("a").is_none(), "expired entry");
        for id in ["b", "c", "d", "e", "f"] {
            cache.put(id, None);
            assert!(cache.len() <= 3);
        }
    }

    #[test]
    fn changes_evict() {
        let cache = KeyCache::new(Duration::from_secs(60), 10);
        cache.put("a", None);
        cache.put("b", None);
        cache.key_changed("a");
        assert!(cache.get("a").is_none());
        assert!(cache.get("b").is_some());
        cache.tenant_changed("t");
        assert!(cache.is_empty());
    }

    #[test]
    fn stale_entries_answer_only_when_asked_for_stale() {
        let cache =
            KeyCache::new(Duration::from_millis(20), 10).with_stale_window(Duration::from_secs(60));
        cache.put("k", None);
        std::thread::sleep(Duration::from_millis(30));
        assert!(cache.get("k").is_none(), "expired for normal use");
        assert!(cache.get_stale("k").is_some(), "kept for an outage");
        let strict = KeyCache::new(Duration::from_millis(20), 10);
        strict.put("k", None);
        std::thread::sleep(Duration::from_millis(30));
        assert!(strict.get_stale("k").is_none(), "no window, nothing stale");
    }
}
