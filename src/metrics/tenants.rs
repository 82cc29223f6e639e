//! Tokens per tenant for `/metrics`, with a bounded number of series: the
//! first [`MAX_TENANT_SERIES`] tenants a process meters get a series of
//! their own, every later one is counted under `_other` (no slug can take
//! that form), so a vendor with many small tenants cannot blow up the
//! scrape. Dashboards pick the top ten with `topk`.
//!
//! Knows tenants only by slug; fed by the metering sink as each job's usage
//! leaves serving.

use std::collections::HashMap;
use std::sync::Mutex;

/// Most tenants with a series of their own on one replica.
pub const MAX_TENANT_SERIES: usize = 1000;

/// The label of the tenants past [`MAX_TENANT_SERIES`].
pub const OTHER_TENANTS: &str = "_other";

/// Tokens metered for one tenant since the process started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantTokenCounts {
    pub prompt: u64,
    pub cached_prompt: u64,
    pub completion: u64,
}

#[derive(Debug, Default)]
pub struct TenantTokens {
    counts: Mutex<HashMap<String, TenantTokenCounts>>,
}

impl TenantTokens {
    pub fn add(&self, tenant: &str, prompt: u32, cached_prompt: u32, completion: u32) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let key = if counts.contains_key(tenant) || counts.len() < MAX_TENANT_SERIES {
            tenant
        } else {
            OTHER_TENANTS
        };
        let entry = match counts.get_mut(key) {
            Some(entry) => entry,
            None => counts.entry(key.to_owned()).or_default(),
        };
        entry.prompt += u64::from(prompt);
        entry.cached_prompt += u64::from(cached_prompt);
        entry.completion += u64::from(completion);
    }

    /// Every series, by tenant slug.
    pub fn snapshot(&self) -> Vec<(String, TenantTokenCounts)> {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<_> = counts.iter().map(|(k, v)| (k.clone(), *v)).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_past_the_cap_share_one_series_and_nothing_is_lost() {
        let tokens = TenantTokens::default();
        for t in 0..MAX_TENANT_SERIES + 50 {
            tokens.add(&format!("tenant-{t}"), 10, 2, 5);
        }
        tokens.add("tenant-0", 1, 0, 1);
        let snapshot = tokens.snapshot();
        assert_eq!(snapshot.len(), MAX_TENANT_SERIES + 1);
        let other = snapshot
            .iter()
            .find(|(k, _)| k == OTHER_TENANTS)
            .expect("other");
        assert_eq!(other.1.prompt, 500);
        let total: u64 = snapshot.iter().map(|(_, c)| c.prompt).sum();
        assert_eq!(total, 10 * (MAX_TENANT_SERIES as u64 + 50) + 1);
        let first = snapshot.iter().find(|(k, _)| k == "tenant-0").expect("t0");
        assert_eq!(first.1.completion, 6);
    }
}
