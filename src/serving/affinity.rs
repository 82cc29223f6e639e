//! Cache-affinity routing among one model's workers: which worker holds which cached prefix
//! blocks, and the rule that sends a request to the worker holding the longest cached run of
//! its prompt unless that worker is too much busier than the least loaded one.
//!
//! The rule is the SGLang router's, in our pull design: a job whose prompt has a cached
//! prefix somewhere is marked, when queued, for the worker holding its longest cached run
//! (ties: the least loaded of them) if that worker's load is within `cache_affinity_margin`
//! of the least loaded worker's, and for the least loaded worker otherwise. A job with no
//! cached prefix is not marked: the first worker with room takes it. Other workers leave a
//! marked job to its worker until the worker's load exceeds theirs by more than the margin;
//! then whoever is free takes it, so an affinity never holds a request back from an idle
//! device for long. A worker's load is the sequences it runs plus the queued jobs marked
//! for it. Fairness across tenants is kept: each worker still takes the first job of the fair
//! order among those it may take.
//!
//! It must not know KV pools or tenants: workers report the addresses they gained and lost.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::model::prefix::BlockHash;

/// Most workers a model may have for affinity bookkeeping (one bit each).
pub const MAX_AFFINITY_WORKERS: usize = 64;

pub(crate) struct Affinity {
    /// For each cached block address, the workers holding it (bit `w` for worker `w`).
    holders: Mutex<HashMap<BlockHash, u64>>,
    workers: usize,
    margin: usize,
}

impl Affinity {
    pub fn new(workers: usize, margin: usize) -> Self {
        Self {
            holders: Mutex::new(HashMap::new()),
            workers: workers.min(MAX_AFFINITY_WORKERS),
            margin,
        }
    }

    /// Worker `worker` now caches `added` and no longer caches `removed`.
    pub fn record(&self, worker: usize, added: &[BlockHash], removed: &[BlockHash]) {
        if worker >= self.workers || (added.is_empty() && removed.is_empty()) {
            return;
        }
        let bit = 1u64 << worker;
        let mut holders = self.holders.lock().unwrap_or_else(|e| e.into_inner());
        for hash in removed {
            if let Some(mask) = holders.get_mut(hash) {
                *mask &= !bit;
                if *mask == 0 {
                    holders.remove(hash);
                }
            }
        }
        for hash in added {
            *holders.entry(*hash).or_insert(0) |= bit;
        }
    }

    /// The worker a job with these prompt block addresses should wait for, if any cached
    /// prefix of it exists: the holder of its longest cached run (least loaded among equals)
    /// within the margin of the least loaded worker, else the least loaded worker.
    /// `loads[w]` is worker `w`'s load.
    pub fn prefer(&self, hashes: &[BlockHash], loads: &[usize]) -> Option<usize> {
        let n = self.workers.min(loads.len());
        if n < 2 || hashes.is_empty() {
            return None;
        }
        let mut deepest = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
        {
            let holders = self.holders.lock().unwrap_or_else(|e| e.into_inner());
            let mut depth = 0;
            for hash in hashes {
                let mask = holders.get(hash).copied().unwrap_or(0) & deepest;
                if mask == 0 {
                    break;
                }
                deepest = mask;
                depth += 1;
            }
            if depth == 0 {
                return None;
            }
        }
        let best = (0..n)
            .filter(|w| deepest & (1u64 << w) != 0)
            .min_by_key(|&w| loads[w])?;
        let least = (0..n).min_by_key(|&w| loads[w])?;
        if loads[best] <= loads[least] + self.margin {
            Some(best)
        } else {
            Some(least)
        }
    }

    /// Whether `worker` may take a job marked for `preferred`: its own, or the marked
    /// worker is now busier than `worker` by more than the margin.
    pub fn may_take(&self, worker: usize, preferred: usize, loads: &[usize]) -> bool {
        let load = |w: usize| loads.get(w).copied().unwrap_or(0);
        worker == preferred || load(preferred) > load(worker) + self.margin
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::prefix::PrefixHasher;

    #[test]
    fn the_longest_holder_wins_within_the_margin() {
        let h = PrefixHasher::new("m");
        let prompt: Vec<u32> = (0..64).collect();
        let chain = h.chain("t", &prompt, 16); // 4 blocks
        let a = Affinity::new(3, 2);
        assert_eq!(a.prefer(&chain, &[0, 0, 0]), None, "nobody holds it");
        a.record(0, &chain[..1], &[]);
        a.record(2, &chain[..3], &[]);
        assert_eq!(a.prefer(&chain, &[0, 0, 0]), Some(2), "deepest holder");
        assert_eq!(
            a.prefer(&chain, &[1, 0, 3]),
            Some(1),
            "3 > 0 + 2: too busy, the least loaded takes it"
        );
        assert_eq!(a.prefer(&chain, &[1, 1, 3]), Some(2), "3 <= 1 + 2");
        // Others leave its jobs to it until it is busier than they by more than the margin.
        assert!(!a.may_take(1, 2, &[0, 1, 3]), "3 <= 1 + 2");
        assert!(a.may_take(1, 2, &[0, 0, 3]), "3 > 0 + 2");
        assert!(a.may_take(2, 2, &[0, 0, 9]));
        a.record(2, &[], &chain[..3]);
        assert_eq!(
            a.prefer(&chain, &[0, 0, 3]),
            Some(0),
            "worker 0 still holds block 0"
        );
    }
}
