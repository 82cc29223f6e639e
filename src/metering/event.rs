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
    pub finish_reason: FinishReason,
    pub started_at_us: i64,
    pub finished_at_us: i64,
}

/// How a metered request ended, by the names usage records, exports and the
/// database use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced its end-of-sequence token.
    Eos,
    /// A stop sequence matched.
    Stop,
    /// `max_tokens` (or the context window) was reached.
    Length,
    /// The client went away.
    Cancelled,
    DeadlineExceeded,
    Error,
}

impl std::str::FromStr for FinishReason {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        [
            FinishReason::Eos,
            FinishReason::Stop,
            FinishReason::Length,
            FinishReason::Cancelled,
            FinishReason::DeadlineExceeded,
            FinishReason::Error,
        ]
        .into_iter()
        .find(|r| r.as_str() == name)
        .ok_or_else(|| format!("unknown finish reason {name:?}"))
    }
}

impl FinishReason {
    /// A stored or received name read back. Every writer of usage writes one
    /// of the six names; anything else is a damaged value and reads as an
    /// error end rather than failing a whole export.
    pub fn from_stored(name: &str) -> FinishReason {
        name.parse().unwrap_or(FinishReason::Error)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::DeadlineExceeded => "deadline_exceeded",
            FinishReason::Error => "error",
        }
    }
}

/// Microseconds in an hour, the rollup granularity.
pub const HOUR_US: i64 = 3_600_000_000;

impl UsageEvent {
    pub fn hour_us(&self) -> i64 {
        self.finished_at_us.div_euclid(HOUR_US) * HOUR_US
    }
}
