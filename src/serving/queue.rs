//! The admission queue of one model: bounded, fair across tenants by weight,
//! with priority tiers, aging, deadlines and cancellation.
//!
//! Fairness is start-time fair queuing over tokens (a weighted fair
//! queuing discipline): each request gets a virtual start tag, the later of
//! the queue's virtual time and its tenant's previous finish tag, and a
//! finish tag `start + cost / weight`. The queue serves the smallest start
//! tag first and advances virtual time to it, so a tenant that floods the
//! queue only pushes its *own* later requests back: another tenant's request
//! is tagged near the current virtual time and is served within a few
//! requests of arriving, whatever the flood. Priority tiers come before tags; a waiting
//! request rises one tier per `aging_step` so no request starves. The queue
//! is bounded in requests and in tokens: full means refused at once. A
//! tenant's clock is kept only while it can still matter (its last finish
//! tag ahead of virtual time), so memory stays bounded by the waiting
//! requests, however many tenants came and went.
//!
//! Preempted sequences do not come back here: the worker keeps them, ahead
//! of this queue.
//!
//! Pure data structure: no threads, no async, no clock of its own (callers
//! pass `now`), so it is tested exactly.

use std::time::{Duration, Instant};

/// Scheduling tier of a request; higher is served first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    Low = 0,
    Normal = 1,
    High = 2,
}

#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub max_requests: usize,
    pub max_tokens: u64,
    /// Waiting this long raises a request one tier (so a low-priority
    /// request reaches the top tier after two steps).
    pub aging_step: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueFull {
    #[error("the model's queue holds its maximum of {0} requests")]
    Requests(usize),
    #[error("the model's queue holds its maximum of {0} tokens")]
    Tokens(u64),
    /// The model is stopping: its workers take nothing more.
    #[error("the model is shutting down; retry on another replica")]
    ShuttingDown,
}

/// One waiting request.
#[derive(Debug)]
pub struct Entry<T> {
    pub id: u64,
    pub tenant: String,
    pub priority: Priority,
    pub cost_tokens: u64,
    pub enqueued_at: Instant,
    pub deadline: Option<Instant>,
    pub item: T,
    start_tag: f64,
}

struct TenantClock {
    last_finish: f64,
}

pub struct FairQueue<T> {
    limits: QueueLimits,
    entries: Vec<Entry<T>>,
    tenants: std::collections::HashMap<String, TenantClock>,
    virtual_time: f64,
    tokens: u64,
    next_id: u64,
}

impl<T> FairQueue<T> {
    pub fn new(limits: QueueLimits) -> FairQueue<T> {
        FairQueue {
            limits,
            entries: Vec::new(),
            tenants: std::collections::HashMap::new(),
            virtual_time: 0.0,
            tokens: 0,
            next_id: 0,
        }
    }

    /// The waiting items, in no particular order.
    pub fn items(&self) -> impl Iterator<Item = &T> {
        self.entries.iter().map(|e| &e.item)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Tokens of all waiting requests.
    pub fn queued_tokens(&self) -> u64 {
        self.tokens
    }

    /// Enqueues a request, or refuses it at once if the queue is full.
    /// Returns the entry id, for cancellation.
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        tenant: &str,
        weight: u32,
        priority: Priority,
        cost_tokens: u64,
        deadline: Option<Instant>,
        now: Instant,
        item: T,
    ) -> Result<u64, (QueueFull, T)> {
        if self.entries.len() >= self.limits.max_requests {
            return Err((QueueFull::Requests(self.limits.max_requests), item));
        }
        if self.tokens.saturating_add(cost_tokens) > self.limits.max_tokens {
            return Err((QueueFull::Tokens(self.limits.max_tokens), item));
        }
        let clock = self
            .tenants
            .entry(tenant.to_owned())
            .or_insert(TenantClock { last_finish: 0.0 });
        let start_tag = clock.last_finish.max(self.virtual_time);
        clock.last_finish = start_tag + cost_tokens.max(1) as f64 / f64::from(weight.max(1));
        let id = self.next_id;
        self.next_id += 1;
        self.tokens += cost_tokens;
        self.entries.push(Entry {
            id,
            tenant: tenant.to_owned(),
            priority,
            cost_tokens,
            enqueued_at: now,
            deadline,
            item,
            start_tag,
        });
        Ok(id)
    }

    fn effective_tier(&self, entry: &Entry<T>, now: Instant) -> u64 {
        let waited = now.saturating_duration_since(entry.enqueued_at);
        let steps = if self.limits.aging_step.is_zero() {
            0
        } else {
            (waited.as_nanos() / self.limits.aging_step.as_nanos()) as u64
        };
        (entry.priority as u64 + steps).min(Priority::High as u64)
    }

    /// Removes and returns the requests `gone` picks (a deadline passed, a
    /// client left), freeing their places at once.
    pub fn take_where(&mut self, gone: impl Fn(&Entry<T>) -> bool) -> Vec<Entry<T>> {
        let mut taken = Vec::new();
        let mut i = 0;
        while i < self.entries.len() {
            if gone(&self.entries[i]) {
                let entry = self.entries.swap_remove(i);
                self.tokens -= entry.cost_tokens;
                taken.push(entry);
            } else {
                i += 1;
            }
        }
        taken
    }

    /// Tenants with a clock (for tests of the bound).
    pub fn tenant_clocks(&self) -> usize {
        self.tenants.len()
    }

    /// Drops the clocks that no longer matter. Idle (nothing waits), virtual
    /// time moves to the largest finish tag served, as start-time fair
    /// queuing defines it for an idle server, and every clock goes. Busy, a
    /// clock whose last finish is not ahead of virtual time tags the
    /// tenant's next request exactly as no clock does; those go once clocks
    /// outnumber waiting requests by a margin (amortized).
    fn prune_clocks(&mut self) {
        if self.entries.is_empty() {
            let latest = self.tenants.values().map(|c| c.last_finish);
            self.virtual_time = latest.fold(self.virtual_time, f64::max);
            self.tenants.clear();
        } else if self.tenants.len() > 2 * self.entries.len() + 64 {
            let now = self.virtual_time;
            self.tenants.retain(|_, clock| clock.last_finish > now);
        }
    }

    /// The next request to serve: highest effective tier, then smallest
    /// start tag, then arrival order. `fits` lets the caller skip requests
    /// it cannot start now (e.g. too big for the step's remaining budget).
    pub fn pop_where(
        &mut self,
        now: Instant,
        fits: impl Fn(&Entry<T>) -> bool,
    ) -> Option<Entry<T>> {
        let best = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| fits(e))
            .max_by(|(_, a), (_, b)| {
                self.effective_tier(a, now)
                    .cmp(&self.effective_tier(b, now))
                    .then(b.start_tag.total_cmp(&a.start_tag))
                    .then(b.id.cmp(&a.id))
            })
            .map(|(i, _)| i)?;
        let entry = self.entries.swap_remove(best);
        self.tokens -= entry.cost_tokens;
        self.virtual_time = self.virtual_time.max(entry.start_tag);
        self.prune_clocks();
        Some(entry)
    }

    pub fn pop(&mut self, now: Instant) -> Option<Entry<T>> {
        self.pop_where(now, |_| true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(max_requests: usize) -> FairQueue<&'static str> {
        FairQueue::new(QueueLimits {
            max_requests,
            max_tokens: 1_000_000,
            aging_step: Duration::from_secs(3600),
        })
    }

    #[test]
    fn a_flood_from_one_tenant_does_not_starve_another() {
        let now = Instant::now();
        let mut q = queue(1000);
        for _ in 0..200 {
            q.push("a", 1, Priority::Normal, 100, None, now, "a")
                .expect("room");
        }
        for _ in 0..10 {
            q.push("b", 1, Priority::Normal, 100, None, now, "b")
                .expect("room");
        }
        let order: Vec<&str> = std::iter::from_fn(|| q.pop(now).map(|e| e.item)).collect();
        let last_b = order.iter().rposition(|t| *t == "b").expect("b served");
        // B's 10 requests interleave with A's: all served within the first 21.
        assert!(
            last_b < 21,
            "B's last request was served at position {last_b}"
        );
        assert_eq!(order.len(), 210);
    }

    #[test]
    fn weights_share_service_in_proportion() {
        let now = Instant::now();
        let mut q = queue(1000);
        for _ in 0..300 {
            q.push("heavy", 3, Priority::Normal, 10, None, now, "heavy")
                .expect("room");
            q.push("light", 1, Priority::Normal, 10, None, now, "light")
                .expect("room");
        }
        let first: Vec<&str> = (0..200)
            .filter_map(|_| q.pop(now).map(|e| e.item))
            .collect();
        let heavy = first.iter().filter(|t| **t == "heavy").count();
        assert!((145..=155).contains(&heavy), "weight 3:1 gave {heavy}/200");
    }

    #[test]
    fn tiers_come_first_and_aging_lifts_the_waiting() {
        let start = Instant::now();
        let mut q = FairQueue::new(QueueLimits {
            max_requests: 10,
            max_tokens: 1000,
            aging_step: Duration::from_secs(10),
        });
        q.push("t", 1, Priority::Low, 1, None, start, "old-low")
            .expect("room");
        let later = start + Duration::from_secs(5);
        q.push("u", 1, Priority::High, 1, None, later, "high")
            .expect("room");
        q.push("v", 1, Priority::Normal, 1, None, later, "normal")
            .expect("room");
        assert_eq!(q.pop(later).expect("one").item, "high");
        // After 20 s the low request has aged two tiers, to the top.
        let much_later = start + Duration::from_secs(20);
        assert_eq!(q.pop(much_later).expect("one").item, "old-low");
        assert_eq!(q.pop(much_later).expect("one").item, "normal");
    }

    #[test]
    fn a_full_queue_refuses_at_once_and_gives_the_item_back() {
        let now = Instant::now();
        let mut q = FairQueue::new(QueueLimits {
            max_requests: 2,
            max_tokens: 150,
            aging_step: Duration::from_secs(1),
        });
        q.push("t", 1, Priority::Normal, 100, None, now, "one")
            .expect("room");
        let (why, item) = q
            .push("t", 1, Priority::Normal, 100, None, now, "two")
            .expect_err("over the token cap");
        assert_eq!((why, item), (QueueFull::Tokens(150), "two"));
        q.push("t", 1, Priority::Normal, 10, None, now, "two")
            .expect("room");
        let (why, _) = q
            .push("t", 1, Priority::Normal, 1, None, now, "three")
            .expect_err("over the request cap");
        assert_eq!(why, QueueFull::Requests(2));
    }

    #[test]
    fn deadlines_and_cancellation_free_their_place() {
        let now = Instant::now();
        let mut q = queue(10);
        let soon = Some(now + Duration::from_millis(10));
        q.push("t", 1, Priority::Normal, 5, soon, now, "expiring")
            .expect("room");
        q.push("t", 1, Priority::Normal, 7, None, now, "cancelled")
            .expect("room");
        q.push("t", 1, Priority::Normal, 9, None, now, "kept")
            .expect("room");
        assert_eq!(q.queued_tokens(), 21);
        let later = now + Duration::from_millis(20);
        let expired = q.take_where(|e| e.deadline.is_some_and(|d| d <= later));
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].item, "expiring");
        let cancelled = q.take_where(|e| e.item == "cancelled");
        assert_eq!(cancelled.len(), 1);
        assert_eq!(q.queued_tokens(), 9);
        assert_eq!(q.pop(now).expect("one").item, "kept");
        assert!(q.is_empty());
    }

    #[test]
    fn tenant_clocks_stay_bounded_and_fairness_holds_while_they_are_pruned() {
        let now = Instant::now();
        let mut q: FairQueue<String> = FairQueue::new(QueueLimits {
            max_requests: 1000,
            max_tokens: u64::MAX,
            aging_step: Duration::from_secs(3600),
        });
        // 100,000 tenants come, send one request each, and leave.
        for t in 0..100_000 {
            q.push(
                &format!("t{t}"),
                1,
                Priority::Normal,
                10,
                None,
                now,
                String::new(),
            )
            .expect("room");
            q.pop(now).expect("served");
            assert!(
                q.tenant_clocks() <= 2 * q.len() + 65,
                "{}",
                q.tenant_clocks()
            );
        }
        // A flooding tenant still only pushes itself back.
        for _ in 0..100 {
            q.push(
                "flood",
                1,
                Priority::Normal,
                10,
                None,
                now,
                "flood".to_owned(),
            )
            .expect("room");
        }
        q.push(
            "late",
            1,
            Priority::Normal,
            10,
            None,
            now,
            "late".to_owned(),
        )
        .expect("room");
        let order: Vec<String> = std::iter::from_fn(|| q.pop(now).map(|e| e.item)).collect();
        let late = order.iter().position(|t| t == "late").expect("served");
        assert!(late <= 1, "the newcomer waited behind {late} of the flood");
    }
}
