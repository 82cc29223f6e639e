//! One usage record per admitted request, whatever its end.

use serde::{Deserialize, Serialize};

/// What one request consumed. Token counts come from the tokenizer; device
/// time and energy from the emulated NPU's cost model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageEvent {
    /// Client idempotency key or a UUIDv7: unique per tenant, for all time.
    pub request_id: String,
    pub tenant_id: String,
    pub key_id: String,
    pub model: String,
    pub device_profile: String,
    pub prompt_tokens: u32,
    /// Prompt tokens served from the prefix cache (a part of `prompt_tokens`). Absent in
    /// spool records written before context caching: 0.
    #[serde(default)]
    pub cached_prompt_tokens: u32,
    pub completion_tokens: u32,
    pub queue_time_us: u64,
    pub ttft_us: u64,
    pub total_time_us: u64,
    pub device_time_us: u64,
    pub energy_mj: u64,
    pub mean_power_mw: u64,
    /// "eos", "stop", "length", "cancelled", "deadline_exceeded" or "error".
    pub finish_reason: String,
    pub started_at_us: i64,
    pub finished_at_us: i64,
}

/// Microseconds in an hour, the rollup granularity.
pub const HOUR_US: i64 = 3_600_000_000;

impl UsageEvent {
    pub fn hour_us(&self) -> i64 {
        self.finished_at_us.div_euclid(HOUR_US) * HOUR_US
    }
}
